#!/usr/bin/env python
"""The three feeds of MoCo v2's aug+ views side by side: DALI end to end, and each feed alone.

The feeds: ``released`` (PIL in the DataLoader workers), this project's path
(``--augment-on device`` with ``--decode-on loader`` or ``device``) and NVIDIA DALI
(``dali_feed.py``), all over the same folder and the tool's list of its files. The project's
two paths end to end are ``pretrain_throughput.py``'s; this script adds:

- ``dali``: the DALI feed into the training step of ``pretrain_throughput.py``'s fast mode (the
  tool's defaults for the device, ``--amp`` on CUDA; the same model, optimizer and step, built by
  the tool's setup functions) through the same epoch clock: ``img_per_s`` and
  ``epoch_overhead_s`` as there, and ``main_process_cpu_ms_per_img``, the training process's CPU
  per image in the steady window. DALI runs no worker processes, so that is all its host CPU
  (its threads included); the loader paths add their workers' ``host_ms_per_img``.
- ``feeds``: each feed alone, no model: images per second until both views are on the device
  (synced), and the training process's CPU ms per image. For the loader paths that is the tool's
  loader and what its step does before the model (decode, ``DeviceAugment``). The first
  ``max(--warmup, -j)`` batches are not timed (the workers' prefetched batches would count as
  free), the next ``max(--iters, 2 * -j)`` are.

Where DALI is missing or fails, ``dali_error`` says why and the other feeds are measured all the
same; the exit status stays 0. The JSON is rewritten as each part finishes.

    python benchmarks/feed_throughput.py --device cpu -a resnet18 --crop-size 64 -b 16 -j 2
"""

import argparse
import dataclasses
import sys
import tempfile
import time

import common
import pretrain_throughput as bench
import torch

MODES = ("dali", "feeds")
FEEDS = ("released", "fast_decode_loader", "fast_decode_device", "dali")


def modes(text):
    chosen = [m for m in text.split(",") if m]
    if not chosen or any(m not in MODES for m in chosen):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {MODES}")
    return chosen


def parse_args(argv):
    p = common.parser(__doc__, "feed_throughput.json")
    bench.add_run_arguments(p)
    p.add_argument("--modes", default="dali,feeds", type=modes, help="dali, feeds or both")
    return p.parse_args(argv)


def batch_counts(args):
    """(untimed, timed) batches of a feed alone."""
    return max(args.warmup, args.workers), max(args.iters, 2 * args.workers)


def dali_views(args, device, folder, steps, channels_last):
    """The DALI feed of ``folder``'s files, ``steps`` batches per pass, in the step's memory
    format."""
    import dali_feed

    return dali_feed.DaliTwoViews(
        common.image_paths(folder), args.batch_size, args.crop_size, device, args.workers, steps,
        bench.SEED, channels_last,
    )  # fmt: skip


class AsLoader:
    """``views`` as the tool's loader yields batches, ``(images, item worker CPU s, skipped)``,
    the worker CPU 0: DALI's threads count in the training process's CPU."""

    def __init__(self, views, batch):
        self.views, self.zeros = views, torch.zeros(batch, dtype=torch.float64)

    def __len__(self):
        return len(self.views)

    def __iter__(self):
        for images in self.views:
            yield images, self.zeros, self.zeros


def dali_end_to_end(args, device, folder):
    """DALI into the fast mode's step, epochs timed as in ``pretrain_throughput.py``."""
    tool, model, opt = bench.build(args, device, True, folder)
    clock = bench.EpochClock(device)
    views = dali_views(args, device, folder, args.e2e_iters, tool.channels_last)
    clock.batches = AsLoader(views, args.batch_size)
    for _ in range(args.e2e_epochs):
        common.train_epoch(model, clock, opt, device, tool, sync_every_step=False)
    img_per_s, overhead, main_ms = clock.report(args.batch_size, args.e2e_iters)
    keys = ("amp", "channels_last", "compile", "bn_splits")
    return {
        "img_per_s": img_per_s,
        "epoch_overhead_s": overhead,
        "main_process_cpu_ms_per_img": main_ms,
        "steps_per_epoch": args.e2e_iters,
        **{key: getattr(tool, key) for key in keys},
    }


def loader_feed(args, device, folder, fast, decode_on=None):
    """(batches, prepare) of the tool's loader for the released or the fast mode: one epoch of
    the untimed and timed batches, and the tool's way from a batch to the views on the device."""
    tool = bench.tool_args(argparse.Namespace(**{**vars(args), "decode_on": decode_on}), device,
                           folder, fast)  # fmt: skip
    data = common.train_data(tool, tool.data)
    items = bench.TimedItems(data.dataset, sum(batch_counts(args)) * args.batch_size)
    data = dataclasses.replace(data, dataset=items)
    loader = common.train_loader(data, tool, device, across_epochs=False)
    common.seed_epoch(bench.SEED, 0)
    return loader.epoch(0), lambda batch: common.views_on_device(data, batch[0], tool, device)


def feed_alone(batches, prepare, device, args):
    """img/s and training-process CPU ms per image of ``batches`` made ready by ``prepare``."""
    warmup, timed = batch_counts(args)
    it = iter(batches)
    for _ in range(warmup):
        prepare(next(it))
    common.sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(timed):
        prepare(next(it))
    common.sync(device)
    images = timed * args.batch_size
    return {
        "img_per_s": images / (time.perf_counter() - start),
        "main_process_cpu_ms_per_img": (time.process_time() - cpu) / images * 1e3,
    }


def feed(name, args, device, folder):
    """The feed ``name`` of :data:`FEEDS` alone (:func:`feed_alone`)."""
    if name == "dali":  # in the fast mode's memory format, as end to end
        channels_last = bench.tool_args(args, device, folder, True).channels_last
        views = dali_views(args, device, folder, sum(batch_counts(args)), channels_last)
        return feed_alone(views, lambda views: views, device, args)
    decode_on = {"fast_decode_loader": "loader", "fast_decode_device": "device"}.get(name)
    return feed_alone(*loader_feed(args, device, folder, name != "released", decode_on), device,
                      args)  # fmt: skip


def dali_missing():
    """Why DALI cannot be imported here, or None."""
    try:
        import dali_feed  # noqa: F401
    except ImportError as e:
        return f"DALI not installed ({e})"
    return None


def headline(out):
    """The key figures in one line (the GPU check's summary shows it)."""
    fmt, parts = common.fmt, []
    if out.get("dali"):
        d = out["dali"]
        parts.append(
            f"DALI end to end {fmt(d['img_per_s'])} img/s, main CPU "
            f"{fmt(d['main_process_cpu_ms_per_img'])} ms/img"
        )
    if out.get("feeds"):
        alone = ", ".join(f"{k} {fmt(v['img_per_s'])}" for k, v in out["feeds"].items() if v)
        parts.append(f"alone img/s: {alone}")
    if out.get("dali_error"):
        parts.append(out["dali_error"])
    return "; ".join(parts)


def print_report(out):
    if out.get("dali"):
        d = out["dali"]
        common.print_table(
            ["feed", "img/s", "epoch +s", "main ms/img", "bn-splits", "bf16"],
            [["dali", d["img_per_s"], d["epoch_overhead_s"], d["main_process_cpu_ms_per_img"],
              d["bn_splits"], d["amp"]]],
            "end to end, the fast mode's step:",
        )  # fmt: skip
    if out.get("feeds"):
        rows = [[k, v["img_per_s"], v["main_process_cpu_ms_per_img"]]
                for k, v in out["feeds"].items() if v]  # fmt: skip
        common.print_table(["feed", "img/s", "main ms/img"], rows, "each feed alone, no model:")
    if out.get("dali_error"):
        print(out["dali_error"])


def save(args, out):
    common.write_json(args.json, {**out, "summary": headline(out)})


def peer(out, measure):
    """``measure()`` of the DALI feed, or None with ``out["dali_error"]`` saying why it failed:
    the peer's failure is a finding of the benchmark, not its error."""
    try:
        return measure()
    except Exception as e:
        out["dali_error"] = f"DALI failed: {type(e).__name__}: {e}"
        return None


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = common.device(args.device)
    out = {**common.machine(device), "config": common.config(args), "dali_error": dali_missing()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or common.make_jpeg_folder(tmp, args.num_images)
        if "dali" in args.modes and not out["dali_error"]:
            out["dali"] = peer(out, lambda: dali_end_to_end(args, device, folder))
            save(args, out)
        if "feeds" in args.modes:
            out["feeds"] = {}
            for name in FEEDS:
                if name != "dali":
                    out["feeds"][name] = feed(name, args, device, folder)
                elif not out["dali_error"]:
                    out["feeds"][name] = peer(out, lambda: feed("dali", args, device, folder))
                save(args, out)
    print_report(out)
    save(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
