"""Repeat the detection transfer with different seeds and report mean ± std, as the MoCo papers
do (5 trials). Each trial is a ``train_net`` process writing ``OUTPUT/trial_<k>``: one with its
metrics is done, one with a checkpoint is resumed, so the same command finishes a half-done set.

Trials of different runs never mix: the set's fingerprint (the weights' sha256, the merged
config but OUTPUT_DIR and SEED, each dataset's split file's sha256) is written first to
``OUTPUT/trials_fingerprint.json``; a rerun that differs from it is refused unless ``--restart``.
"""

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from moco_d2.cli import ArgumentParser, positive_int
from moco_d2.detection.data.coco import (
    add_coco_dataset_argument,
    check_coco_tree,
    register_coco_datasets,
)
from moco_d2.detection.data.voc import read_split, split_file
from moco_d2.detection.evaluation import (
    COCO_METRIC_NAMES,
    METRIC_NAMES,
    METRICS_FILE,
    METRICS_FILES,
)
from moco_d2.detection.train_net import COMMAND, load_config
from moco_d2.errors import UserError
from moco_d2.io import atomic_write_json, atomic_write_text, remove_stale_temporaries, sha256_of
from moco_d2.published import VOC_DETECTION

logger = logging.getLogger("moco_d2.detection.trials")

SUMMARY_JSON = "trials_summary.json"
SUMMARY_MD = "trials_summary.md"
FINGERPRINT_JSON = "trials_fingerprint.json"


def trial_metrics_path(directory: str) -> str:
    """The metrics file a finished trial wrote (VOC or COCO); the VOC name if there is none."""
    for name in METRICS_FILES.values():
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return os.path.join(directory, METRICS_FILE)


def _metric(value: Any) -> float | None:
    """A metric as written by train_net: a number, or null where it is undefined."""
    return None if value is None else float(value)


def read_trial_metrics(path: str) -> dict:
    """The (single) test dataset's metrics in one trial's file: ``{"AP", "AP50", "AP75"}``
    for VOC; for COCO box ``AP`` ... ``APl`` and, for Mask R-CNN, a ``"segm"`` block of the same.
    An undefined metric (null in the file) is None.
    """
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read trial metrics {path}: {e}") from None
    if len(metrics) != 1:
        raise UserError(f"{path}: expected one test dataset, found {sorted(metrics)}")
    (values,) = metrics.values()
    names = COCO_METRIC_NAMES if "APs" in values else METRIC_NAMES
    try:
        trial = {name: _metric(values[name]) for name in names}
        if "segm" in values:
            trial["segm"] = {name: _metric(values["segm"][name]) for name in COCO_METRIC_NAMES}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: missing or bad metric {e}") from None
    return trial


def fingerprint(config_file: str, opts: Sequence[str]) -> dict[str, Any]:
    """What makes two sets of trials comparable: the weights' content, every config value
    except OUTPUT_DIR and SEED (which differ per trial by design), and the datasets."""
    import yaml

    cfg = load_config(argparse.Namespace(config_file=config_file, opts=list(opts)))
    config = yaml.safe_load(cfg.dump())
    config.pop("OUTPUT_DIR", None)
    config.pop("SEED", None)
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights:
        if not os.path.isfile(weights):
            raise UserError(f"MODEL.WEIGHTS file not found: {weights!r}")
        weights_id = sha256_of(weights)
    else:
        weights_id = weights or None
    return {"weights_sha256": weights_id, "config": config, "datasets": dataset_identity(cfg)}


def _split_file(name: str) -> str | None:
    """The file that lists a registered dataset's images: VOC's ImageSets/Main/<split>.txt,
    COCO's annotation json; None for a name that is not registered (train_net refuses it)
    or a dataset of another kind. A missing file is the loaders' own one-line error."""
    if name not in DatasetCatalog.list():
        return None
    metadata = MetadataCatalog.get(name)
    if metadata.get("evaluator_type") == "pascal_voc":
        read_split(metadata.dirname, metadata.split)
        return split_file(metadata.dirname, metadata.split)
    if metadata.get("json_file"):
        check_coco_tree(metadata.image_root, metadata.json_file)
        return metadata.json_file
    return None


def dataset_identity(cfg: Any) -> dict[str, dict[str, str | None]]:
    """The sha256 of each DATASETS.TRAIN/TEST split file, by dataset name: the same names on
    another DETECTRON2_DATASETS tree, with other images or boxes, are other trials."""
    return {
        key.lower(): {name: (path := _split_file(name)) and sha256_of(path) for name in names}
        for key, names in (("TRAIN", cfg.DATASETS.TRAIN), ("TEST", cfg.DATASETS.TEST))
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found


def claim_output_dir(output_dir: str, current: dict[str, Any], restart: bool) -> None:
    """Record ``current`` as the set's fingerprint, refusing to mix with other trials."""
    path = os.path.join(output_dir, FINGERPRINT_JSON)
    earlier_trials = (
        [d for d in sorted(os.listdir(output_dir)) if d.startswith("trial_")]
        if os.path.isdir(output_dir)
        else []
    )
    if restart:
        for name in earlier_trials:
            shutil.rmtree(os.path.join(output_dir, name))
        for name in (SUMMARY_JSON, SUMMARY_MD, FINGERPRINT_JSON):
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        earlier_trials = []
    fix = "use a new --output-dir, or --restart to discard the earlier trials"
    if os.path.isfile(path):
        with open(path) as f:
            try:
                earlier = json.load(f)
            except ValueError:
                earlier = None
        if isinstance(earlier, dict) and "datasets" not in earlier:
            raise UserError(
                f"{output_dir} holds trials fingerprinted without their datasets (an older "
                f"version; see {path}), so they cannot be told apart from trials on other "
                f"data: {fix}"
            )
        if earlier != json.loads(json.dumps(current)):
            changed = (
                _differences(earlier, current) if isinstance(earlier, dict) else ["unreadable"]
            )
            raise UserError(
                f"{output_dir} holds trials of other settings ({', '.join(changed[:5])} "
                f"differ{', …' if len(changed) > 5 else ''}; see {path}): {fix}"
            )
        return
    if earlier_trials:
        raise UserError(
            f"{output_dir} holds trials ({', '.join(earlier_trials)}) without a "
            f"{FINGERPRINT_JSON}, so they cannot be told apart from this run: {fix}"
        )
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(current, path)


def run_trial(
    config_file: str,
    output_dir: str,
    seed: int,
    num_gpus: int,
    opts: Sequence[str],
    coco_datasets: Sequence[Sequence[str]] = (),
) -> None:
    """One fine-tuning + evaluation in its own process (fresh detectron2 state per trial)."""
    resume = os.path.isfile(os.path.join(output_dir, "last_checkpoint"))
    command = [*COMMAND, "--config-file", config_file, "--num-gpus", str(num_gpus)]
    command += ["--resume"] if resume else []
    command += [part for dataset in coco_datasets for part in ("--coco-dataset", *dataset)]
    command += list(opts) + ["OUTPUT_DIR", output_dir, "SEED", str(seed)]
    logger.info("%s trial in %s (seed %d)", "resuming" if resume else "starting", output_dir, seed)
    if subprocess.run(command).returncode != 0:
        raise UserError(f"trial in {output_dir} failed (see its log.txt); rerun to resume it")


def summarize(per_trial: list[dict]) -> dict:
    """Mean and sample standard deviation (n-1) of each metric over the ``n`` trials where it
    is defined (None when it is in none); box metrics at the top level and, when the trials
    have masks, a ``"segm"`` block of the same."""
    summary = {}
    for name in (name for name in per_trial[0] if name != "segm"):
        values = [trial[name] for trial in per_trial if trial[name] is not None]
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        summary[name] = {"mean": mean, "std": std, "n": len(values)}
    if "segm" in per_trial[0]:
        summary["segm"] = summarize([trial["segm"] for trial in per_trial])
    return summary


def _columns(per_trial: list[dict]) -> list[tuple[str, str | None, str]]:
    """``(header, block, metric)`` per table column: box metrics, then mask ones if any."""
    box = [name for name in per_trial[0] if name != "segm"]
    if "segm" not in per_trial[0]:
        return [(name, None, name) for name in box]
    masks = [(f"mask {name}", "segm", name) for name in per_trial[0]["segm"]]
    return [(f"box {name}", None, name) for name in box] + masks


def format_markdown(per_trial: list[dict], summary: dict, reference: str | None) -> str:
    """One row per trial and the mean ± std; the published VOC row only for VOC trials."""
    columns = _columns(per_trial)

    def cells(values: dict, fmt: Callable[[Any], str]) -> str:
        return " | ".join(
            fmt(values[name] if block is None else values[block][name])
            for _, block, name in columns
        )

    lines = [
        "| run | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for index, trial in enumerate(per_trial):
        lines.append(
            f"| trial {index} | "
            + cells(trial, lambda v: "n/a" if v is None else f"{v:.2f}")
            + " |"
        )

    def mean_std(v: dict) -> str:
        if v["mean"] is None:
            return "n/a"
        partial = f" ({v['n']} of {len(per_trial)})" if v["n"] < len(per_trial) else ""
        return f"**{v['mean']:.2f} ± {v['std']:.2f}**{partial}"

    lines.append(f"| **mean ± std ({len(per_trial)} trials)** | " + cells(summary, mean_std) + " |")
    if reference and set(per_trial[0]) == set(METRIC_NAMES):
        published = VOC_DETECTION[reference]
        lines.append(
            f"| published: {reference} (5 trials) | "
            + " | ".join(f"{published[m]:.1f}" for m in METRIC_NAMES)
            + " |"
        )
    return "\n".join(lines) + "\n"


def run_trials(
    config_file: str,
    output_dir: str,
    num_trials: int,
    first_seed: int = 0,
    num_gpus: int = 1,
    opts: Sequence[str] = (),
    reference: str | None = None,
    restart: bool = False,
    coco_datasets: Sequence[Sequence[str]] = (),
) -> tuple[dict[str, Any], str]:
    """Run (or finish) ``num_trials`` trials and write the summary; return it.
    ``coco_datasets``: the ``--coco-dataset`` entries, registered here and in every trial."""
    register_coco_datasets(coco_datasets)
    current = fingerprint(config_file, opts)
    claim_output_dir(output_dir, current, restart)
    remove_stale_temporaries(output_dir)
    per_trial = []
    for index in range(num_trials):
        directory = os.path.join(output_dir, f"trial_{index}")
        metrics_path = trial_metrics_path(directory)
        if os.path.isfile(metrics_path):
            logger.info("trial %d already done: %s", index, metrics_path)
        else:
            run_trial(config_file, directory, first_seed + index, num_gpus, opts, coco_datasets)
            metrics_path = trial_metrics_path(directory)
        per_trial.append(read_trial_metrics(metrics_path))
    summary = summarize(per_trial)
    markdown = format_markdown(per_trial, summary, reference)
    result = {
        "config_file": config_file,
        "seeds": [first_seed + i for i in range(num_trials)],
        "trials": per_trial,
        "summary": summary,
        "reference": reference,
        "fingerprint": current,
    }
    atomic_write_json(result, os.path.join(output_dir, SUMMARY_JSON))
    atomic_write_text(markdown, os.path.join(output_dir, SUMMARY_MD))
    return result, markdown


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Fine-tune and evaluate the same weights N times with different seeds; "
        "report mean ± std of AP, AP50, AP75 (VOC) or box and mask AP, AP50, AP75, APs, APm, "
        "APl (COCO); rerun to resume a half-done set."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--num-trials", type=positive_int, default=5)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="trial k uses SEED first_seed + k"
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="per trial")
    parser.add_argument(
        "--output-dir",
        required=True,
        help="trial_<k>/ folders and trials_summary.{json,md} go here",
    )
    parser.add_argument(
        "--reference",
        choices=sorted(VOC_DETECTION),
        default="MoCo v2 200ep",
        help="published VOC row printed for comparison (VOC trials only)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="delete the trials already in --output-dir and start the set over",
    )
    add_coco_dataset_argument(parser)
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides passed to every trial, e.g. MODEL.WEIGHTS w.pkl",
    )
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config_file):
        raise UserError(f"config file not found: {args.config_file}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logger(name="moco_d2")
    run = (args.config_file, args.output_dir, args.num_trials, args.first_seed, args.num_gpus)
    _, markdown = run_trials(*run, args.opts, args.reference, args.restart, args.coco_dataset)
    print(markdown, end="")
    print(f"summary written to {os.path.join(args.output_dir, SUMMARY_MD)} and {SUMMARY_JSON}")
    return 0
