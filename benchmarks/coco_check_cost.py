#!/usr/bin/env python
"""Time and memory of train_net's pre-launch COCO check on a file the size of train2017's.

Writes a synthetic instances file shaped like ``instances_train2017.json`` (at ``--scale 1``:
118,287 images, 860,001 polygon annotations, about 450 MB; the images are empty files) to a
temporary folder, deleted afterwards, and measures, each in a fresh process:

- ``check``: the pre-launch check as ``train_net`` runs it (``preflight.check_datasets``, with
  MODEL.MASK_ON): it streams the file;
- ``json_load``: ``json.load`` of the file, what the check did before streaming and what
  pycocotools does in every training process;
- ``load``: ``DatasetCatalog.get``, the loader each training process runs (``--modes`` to skip);
- ``sha256``: hashing the file, as ``run_trials`` does for its fingerprint.

Each row: wall seconds, resident memory (RSS) before, at peak and after (the process's own
imports are the "before"), and the increment at peak over before.

    python benchmarks/coco_check_cost.py --scale 0.1 --json coco_check_cost.json
"""

import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import common

import moco_d2.detection  # noqa: F401  (compat shims before detectron2 is imported)

MODES = ("check", "json_load", "load", "sha256")
FULL_IMAGES, FULL_ANNOTATIONS = 118287, 860001
DATASET = "coco_check_cost"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def measure(mode: str, json_file: str, image_root: str) -> dict:
    """Run one mode in this process; the caller starts a fresh process per mode."""
    import argparse as ap

    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog

    from moco_d2.detection import preflight
    from moco_d2.detection.data.coco import register_coco

    register_coco(DATASET, image_root, json_file)
    cfg = get_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, cfg.MODEL.MASK_ON = (DATASET,), (), True
    before = _rss_mb()
    start = time.perf_counter()
    if mode == "check":
        preflight.check_datasets(cfg, ap.Namespace(eval_only=False))
    elif mode == "json_load":
        with open(json_file) as f:
            data = json.load(f)
        del data
    elif mode == "load":
        dicts = DatasetCatalog.get(DATASET)
        del dicts
    else:
        common.sha256_of(json_file)
    seconds = time.perf_counter() - start
    gc.collect()
    return {
        "mode": mode,
        "seconds": seconds,
        "rss_before_mb": before,
        "rss_peak_mb": _peak_mb(),
        "rss_after_mb": _rss_mb(),
        "peak_increment_mb": _peak_mb() - before,
    }


def _child(mode: str, json_file: str, image_root: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, json_file, image_root]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(scale: float, modes: list[str], keep_dir: str | None = None) -> dict:
    from moco_d2.detection.data.synthetic_coco import write_sized_annotations

    num_images = max(1, round(FULL_IMAGES * scale))
    num_annotations = max(1, round(FULL_ANNOTATIONS * scale))
    with tempfile.TemporaryDirectory(dir=keep_dir) as root:
        json_file = os.path.join(root, "instances_train2017.json")
        image_root = os.path.join(root, "train2017")
        start = time.perf_counter()
        write_sized_annotations(json_file, image_root, num_images, num_annotations)
        write_seconds = time.perf_counter() - start
        size = os.path.getsize(json_file)
        rows = [_child(mode, json_file, image_root) for mode in modes]
    return {
        "scale": scale,
        "images": num_images,
        "annotations": num_annotations,
        "file_bytes": size,
        "write_seconds": write_seconds,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "rows": rows,
    }


def print_report(report: dict) -> None:
    keys = ("mode", "seconds", "rss_before_mb", "rss_peak_mb", "rss_after_mb")
    common.print_table(
        ["mode", "seconds", "RSS before MB", "RSS peak MB", "RSS after MB", "peak - before MB"],
        [[*(row[k] for k in keys), row["peak_increment_mb"]] for row in report["rows"]],
        f"{report['images']} images, {report['annotations']} annotations, "
        f"{report['file_bytes'] / 1e6:.0f} MB (scale {report['scale']}), "
        f"{report['cpu_count']} CPUs",
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(measure(*argv[1:4])))
        return 0
    parser = common.parser(__doc__, "coco_check_cost.json")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of train2017's size")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {MODES}")
    parser.add_argument("--tmp-dir", default=None, help="where the temporary folder goes")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not args.scale > 0:
        parser.error(f"unknown mode(s) {unknown}" if unknown else "--scale must be positive")
    report = run(args.scale, modes, args.tmp_dir)
    print_report(report)
    common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
