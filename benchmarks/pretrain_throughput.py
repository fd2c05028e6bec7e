#!/usr/bin/env python
"""MoCo pretraining throughput, end to end, released recipe against the fast path in one run.

Both modes are built by the functions ``tools/pretrain_moco.py`` builds its runs with, from the
tool's own parser (through ``benchmarks/common.py``), so that the defaults cannot drift; they
run through the tool's loader and its training loop on one process:

- ``released``: what the released main_moco.py does on one process: plain BatchNorm over the
  batch (``--bn-splits 1``), fp32, ``--augment-on loader`` (PIL in the workers), a host sync
  every step, the per-parameter momentum loop, per-parameter SGD, and workers restarted every
  epoch.
- ``fast``: the tool's defaults for the device plus ``--amp`` (bf16 autocast) where the device
  is CUDA with bf16 (fp32 on CPU, where bf16 autocast is slower without native bf16 units) and
  ``--augment-on device`` (the default on CUDA, chosen on CPU too), ``--decode-on`` as the tool's
  default (device on CUDA) or as ``--decode-on`` says; channels-last on CUDA, the
  default ``--bn-splits``, one set of workers for the whole run, the sync-free step, foreach
  momentum and fused/foreach SGD (``--compile`` adds torch.compile).

The end-to-end pass runs ``--e2e-epochs`` epochs of ``--e2e-iters`` steps each (the folder is
read as a dataset of ``--e2e-iters`` batches, cycling over its files). Epoch 0 warms up (workers
start, autotuning, compilation) and is not timed. Per mode:

- ``img_per_s``: images per second end to end in the steady part of the timed epochs: from the
  end of each epoch's first step to the end of its last (the device synced at both ends);
- ``epoch_overhead_s``: what an epoch boundary costs on top of a step: the wall time from the
  end of the last step of epoch e to the end of the first step of epoch e+1, minus the median
  steady step time, median over the boundaries. It holds the restart of the workers and the
  refill of the pipeline (released), and what the training loop does between epochs;
- ``step_img_per_s``: the step alone on tensors already on the device (``fast`` also reports
  ``step_img_per_s_bn_splits_1``, the same step with plain BN, so the cost of the shuffle-BN
  emulation is visible);
- host CPU ms per image spent in the data pipeline (CPU time of each item's decode, crop and,
  on the loader path, PIL augmentation, measured inside the workers; the fast mode's device
  augmentation is device work and is reported separately as ``device_augment_ms_per_img``);
- ``main_process_cpu_ms_per_img``: CPU time of the training process itself per image in the
  steady window: the host side of the step (kernel launches, and with ``--decode-on device`` the
  host share of nvJPEG's decoding); on a CPU device it is the whole step. The host cost of the
  GPU path is this plus ``host_ms_per_img``;
- peak memory, GFLOPs per image, TFLOP/s and MFU.

GFLOPs per image: fvcore's FlopCountAnalysis of the encoder (trunk + projection head) at the
crop size counts one multiply-add as one flop; ×2 gives FLOPs; a training image costs the query
forward, the key forward and the query backward (≈ 2 forwards): 4 forwards in all. The
queue logits (128 × K multiply-adds per image) are left out.

``--modes`` picks what runs: ``released`` and ``fast`` (above), ``steps`` (the fast step alone
in the variants that decide the CUDA defaults) and ``augment`` (``DeviceAugment`` ms per image
and view). The JSON is rewritten as each part finishes, so a run stopped early keeps what it
measured; its ``summary`` is the key figures in one line.

    python benchmarks/pretrain_throughput.py --device cpu -a resnet18 --crop-size 64 --json out.json
"""

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time

import common
import torch
from torch.utils.data import Dataset

SEED = 0
MODES = ("released", "fast")
STEPS = "steps"  # the fast step alone in STEP_VARIANTS
AUGMENT = "augment"  # DeviceAugment alone
LR = 0.03

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (V100: fp16, no bf16).
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("V100", 125.0),
]
# The step alone in the settings that decide the CUDA defaults: (--bn-splits, None for the
# tool's default; --compile; channels_last)
STEP_VARIANTS = (
    (None, False, True),
    (1, False, True),
    (None, True, True),
    (1, True, True),
    (None, False, False),
    (1, False, False),
)


def at_least(minimum):
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def modes(text):
    known = (*MODES, STEPS, AUGMENT)
    chosen = [m for m in text.split(",") if m]
    if not chosen or any(m not in known for m in chosen):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {known}")
    return chosen


def add_run_arguments(p):
    """The data, model and step-count flags, shared with feed_throughput.py."""
    p.add_argument("--data", default=None, help="folder of JPEGs (default: generate them)")
    p.add_argument("--num-images", default=512, type=int, help="JPEGs to generate without --data")
    p.add_argument("-a", "--arch", default="resnet50")
    p.add_argument("-b", "--batch-size", default=64, type=int, help="images per step")
    p.add_argument("-j", "--workers", default=min(16, os.cpu_count() or 1), type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--crop-size", default=224, type=int)
    p.add_argument("--bn-splits", default=None, type=int, help="fast mode (default: the tool's)")
    p.add_argument(
        "--decode-on",
        default=None,
        choices=["loader", "device"],
        help="fast mode's JPEG decoding (default: the tool's: device on CUDA, else loader)",
    )
    p.add_argument("--moco-k", default=65536, type=int)
    p.add_argument("--warmup", default=3, type=int, help="untimed steps before the step alone")
    p.add_argument("--iters", default=10, type=int, help="timed steps of the step alone")
    p.add_argument("--e2e-iters", default=10, type=at_least(2), help="steps per end-to-end epoch")
    p.add_argument(
        "--e2e-epochs", default=3, type=at_least(3), help="end-to-end epochs, the first untimed"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the fast mode's model")


def parse_args(argv):
    p = common.parser(__doc__, "pretrain_throughput.json")
    add_run_arguments(p)
    p.add_argument(
        "--modes",
        default="released,fast",
        type=modes,
        help="comma-separated parts to run (default: released,fast; e.g. 'fast' with "
        "--decode-on loader to compare the decode paths; 'steps': the fast step alone with "
        "--bn-splits 8 and 1, eager and compiled, channels_last and NCHW; 'augment': "
        "DeviceAugment alone)",
    )
    return p.parse_args(argv)


def tool_args(args, device, data, fast, bn_splits=None):
    """The config of ``tools/pretrain_moco.py`` for this mode, resolved for one process;
    ``bn_splits`` (fast mode) overrides ``--bn-splits``."""
    K = args.moco_k - args.moco_k % args.batch_size
    argv = [data, "-a", args.arch, "-b", str(args.batch_size), "-j", str(args.workers)]
    argv += ["--crop-size", str(args.crop_size), "--moco-k", str(K), "--lr", str(LR)]
    argv += ["--epochs", str(args.e2e_epochs), "--seed", str(SEED), "--device", str(device)]
    if not fast:
        argv += ["--bn-splits", "1", "--augment-on", "loader", "--no-channels-last"]
    else:
        argv += ["--augment-on", "device"]
        if args.decode_on is not None:
            argv += ["--decode-on", args.decode_on]
        # bf16 autocast on CUDA only: CPUs without native bf16 units run it slower than fp32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            argv.append("--amp")
        if bn_splits or args.bn_splits:
            argv += ["--bn-splits", str(bn_splits or args.bn_splits)]
        if args.compile:
            argv.append("--compile")
        if getattr(args, "channels_last", None) is not None:
            argv.append("--channels-last" if args.channels_last else "--no-channels-last")
    return common.pretrain_run(argv, device)


class TimedItems(Dataset):
    """``dataset`` read as ``length`` items (cycling over it), each with the CPU seconds spent
    producing it (decode, crop, and on the loader path the PIL augmentations) in place of the
    target, which training ignores."""

    def __init__(self, dataset, length):
        self.dataset, self.length = dataset, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        start = time.thread_time()
        images, _, skipped = self.dataset[index % len(self.dataset)]
        return images, torch.tensor(time.thread_time() - start, dtype=torch.float64), skipped


class TimedLoader:
    """Yields ``loader``'s batches; marks the start of the timed window after ``warmup``
    batches (device synced first)."""

    def __init__(self, loader, warmup, device):
        self.loader, self.warmup, self.device = loader, warmup, device
        self.start = None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.warmup:
                common.sync(self.device)
                self.start = time.perf_counter()
            yield batch


class EpochClock:
    """Yields the batches of the epoch set in ``batches``; records, device synced, when the
    epoch's first step and its last step ended, and sums the per-image pipeline CPU time that
    the items carry."""

    def __init__(self, device):
        self.device = device
        self.batches = None
        self.first_done, self.done = [], []
        self.cpu_first_done, self.cpu_done = [], []
        self.pipeline_cpu_s = 0.0
        self.images = 0

    def _now(self):
        common.sync(self.device)
        return time.perf_counter()

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        it = iter(self.batches)
        for i in range(len(self.batches)):
            if i == 1:
                self.first_done.append(self._now())
                self.cpu_first_done.append(time.process_time())
            images, seconds, skipped = next(it)
            self.pipeline_cpu_s += float(seconds.sum())
            self.images += len(seconds)
            yield images, seconds, skipped
        self.done.append(self._now())
        self.cpu_done.append(time.process_time())

    def report(self, batch, steps):
        """(steady img/s, epoch overhead s, training-process CPU ms per image) of the epochs
        after the first (see the module)."""
        steady = [d - f for f, d in zip(self.first_done[1:], self.done[1:])]
        step_s = statistics.median(steady) / (steps - 1)
        boundaries = [f - d for d, f in zip(self.done, self.first_done[1:])]
        images = batch * (steps - 1) * len(steady)
        cpu = sum(d - f for f, d in zip(self.cpu_first_done[1:], self.cpu_done[1:]))
        return images / sum(steady), statistics.median(boundaries) - step_s, cpu / images * 1e3


def step_only(args, device, fast, model, opt, tool):
    """img/s of forward + backward + SGD + momentum + queue on normalised device tensors."""
    shape = (args.batch_size, 3, args.crop_size, args.crop_size)
    views = [torch.randn(shape, device=device) for _ in range(2)]
    on_device = [(views, None, torch.zeros(1, dtype=torch.long))] * (args.warmup + args.iters)
    timed = TimedLoader(on_device, args.warmup, device)
    common.train_epoch(model, timed, opt, device, tool, sync_every_step=not fast)
    return args.batch_size * args.iters / (time.perf_counter() - timed.start)


def device_augment_ms(args, device, repeats=5):
    """``DeviceAugment`` ms per image and view on a batch of uint8 crops."""
    shape = (args.batch_size, 3, args.crop_size, args.crop_size)
    crops = torch.randint(0, 256, shape, dtype=torch.uint8).to(device)
    aug = common.device_augment()
    common.seconds(lambda: aug(crops), device, repeats=2)
    return common.seconds(lambda: aug(crops), device, repeats) / (repeats * args.batch_size) * 1e3


def end_to_end(args, device, fast, model, opt, tool):
    """Steady img/s, epoch overhead (s), the workers' and the training process's host CPU ms
    per image over the tool's loader and epoch loop (see the module)."""
    data = common.train_data(tool, tool.data)
    timed = TimedItems(data.dataset, args.e2e_iters * args.batch_size)
    data = dataclasses.replace(data, dataset=timed)
    loader = common.train_loader(data, tool, device, across_epochs=fast)
    clock = EpochClock(device)
    for epoch in range(args.e2e_epochs):
        common.seed_epoch(SEED, epoch)
        clock.batches = loader.epoch(epoch)
        common.train_epoch(model, clock, opt, device, tool, not fast, data)
    img_per_s, overhead, main_ms = clock.report(args.batch_size, args.e2e_iters)
    return img_per_s, overhead, clock.pipeline_cpu_s / clock.images * 1e3, main_ms


def build(args, device, fast, data, bn_splits=None):
    """The mode's config, model and optimizer, as the tool builds them."""
    tool = tool_args(args, device, data, fast, bn_splits)
    return (tool, *common.build_run(tool, device, released=not fast))


def step_variants(args, device, data, gflops, variants=STEP_VARIANTS):
    """The fast mode's step alone (:func:`step_only`) per variant, each built as the tool builds
    it, with the seconds of its first step (where ``--compile`` compiles)."""
    rows = []
    for bn_splits, compiled, channels_last in variants:
        variant = argparse.Namespace(**{**vars(args), "compile": compiled})
        variant.channels_last = channels_last
        tool, model, opt = build(variant, device, True, data, bn_splits)
        one = argparse.Namespace(**{**vars(args), "warmup": 0, "iters": 1})
        start = time.perf_counter()
        step_only(one, device, True, model, opt, tool)
        first_s = time.perf_counter() - start
        rate = step_only(args, device, True, model, opt, tool)
        rows.append(
            {
                "bn_splits": tool.bn_splits,
                "compile": compiled,
                "channels_last": tool.channels_last,
                "amp_bf16": tool.amp,
                "step_img_per_s": rate,
                "first_step_s": first_s,
                "step_tflops": gflops * rate / 1e3,
            }
        )
        del model, opt
    return rows


def gflops_per_image(args):
    from fvcore.nn import FlopCountAnalysis

    model = common.encoder(args.arch).eval()
    counter = FlopCountAnalysis(model, torch.zeros(1, 3, args.crop_size, args.crop_size))
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return 2 * 4 * counter.total() / 1e9  # FMA = 2 FLOPs; q fwd + k fwd + bwd (2 fwd)


def peak_tflops(name):
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def measure(args, device, fast, data, gflops, peak):
    tool, model, opt = build(args, device, fast, data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = step_only(args, device, fast, model, opt, tool)
    e2e, overhead, host_ms, main_ms = end_to_end(args, device, fast, model, opt, tool)
    if device.type == "cuda":
        peak_mem, kind = torch.cuda.max_memory_allocated(device), "gpu_allocated"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kind = "process_rss_so_far"
    del model, opt
    tflops = gflops * e2e / 1e3
    result = {
        "img_per_s": e2e,
        "epoch_overhead_s": overhead,
        "step_img_per_s": step,
        "host_ms_per_img": host_ms,
        "main_process_cpu_ms_per_img": main_ms,
        "peak_mem_bytes": int(peak_mem),
        "peak_mem_kind": kind,
        "gflops_per_img": gflops,
        "tflops": tflops,
        "step_tflops": gflops * step / 1e3,
        "mfu": tflops / peak if peak else None,
        "step_mfu": gflops * step / 1e3 / peak if peak else None,
        "amp_bf16": tool.amp,
        "augment_on": tool.augment_on,
        "decode_on": tool.decode_on,
        "channels_last": tool.channels_last,
        "compile": tool.compile,
        "bn_splits": tool.bn_splits,
        "workers_kept_across_epochs": fast,
        "steps_per_epoch": args.e2e_iters,
        "K": tool.moco_k,
    }
    if fast:
        result["device_augment_ms_per_img"] = device_augment_ms(args, device)
        if tool.bn_splits == 1:
            result["step_img_per_s_bn_splits_1"] = step
        else:
            tool, model, opt = build(args, device, fast, data, bn_splits=1)
            result["step_img_per_s_bn_splits_1"] = step_only(args, device, fast, model, opt, tool)
            del model, opt
    return result


def print_report(out, modes_run):
    """The tables of what ran, and the ratios."""
    if modes_run:
        header = ["mode", "img/s", "epoch +s", "step img/s", "bn-splits", "host ms/img"]
        header += ["main ms/img", "decode", "peak MiB", "TFLOP/s", "MFU"]
        keys = ("img_per_s", "epoch_overhead_s", "step_img_per_s", "bn_splits")
        keys += ("host_ms_per_img", "main_process_cpu_ms_per_img", "decode_on")
        rows = []
        for mode in modes_run:
            r = out[mode]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else None
            extra = [r["peak_mem_bytes"] / 2**20, r["tflops"], mfu]
            rows.append([mode, *(r[k] for k in keys), *extra])
        common.print_table(header, rows)
    if "fast" in out:
        fast = out["fast"]
        bn1 = fast["step_img_per_s_bn_splits_1"]
        print(
            f"fast step with --bn-splits 1: {common.fmt(bn1)} img/s; bn-splits "
            f"{fast['bn_splits']} runs at {fast['step_img_per_s'] / bn1:.2f}x of it"
        )
    if "ratio_img_per_s" in out:
        print(
            f"fast/released: {out['ratio_img_per_s']:.2f}x end to end; host ms per image "
            f"x{out['ratio_host_ms_per_img']:.2f}"
        )
    if out.get(STEPS):
        rows = [
            [v["bn_splits"], v["compile"], "channels_last" if v["channels_last"] else "nchw",
             v["step_img_per_s"], v["first_step_s"]]
            for v in out[STEPS]
        ]  # fmt: skip
        header = ["bn-splits", "compile", "format", "img/s", "first step s"]
        common.print_table(header, rows, "the fast step alone:")
    if "augment_ms_per_img_view" in out:
        print(f"DeviceAugment: {common.fmt(out['augment_ms_per_img_view'])} ms per image and view")


def headline(out):
    """The key figures of what ran, in one line (the GPU check's summary shows it)."""
    fmt, parts = common.fmt, []
    for mode in (m for m in MODES if m in out):
        r = out[mode]
        host = r["host_ms_per_img"] + r["main_process_cpu_ms_per_img"]
        parts.append(
            f"{mode} {fmt(r['img_per_s'])} img/s (decode {r['decode_on']}, host+main CPU "
            f"{fmt(host)} ms/img)"
        )
    if "ratio_img_per_s" in out:
        parts.append(f"fast/released x{out['ratio_img_per_s']:.2f}")
    for v in out.get(STEPS, []):
        how = f"{'compiled' if v['compile'] else 'eager'} {'cl' if v['channels_last'] else 'nchw'}"
        parts.append(f"bn-splits {v['bn_splits']} {how} {fmt(v['step_img_per_s'])} img/s")
    if "augment_ms_per_img_view" in out:
        parts.append(f"DeviceAugment {fmt(out['augment_ms_per_img_view'])} ms/img/view")
    return "; ".join(parts)


def save(args, out):
    common.write_json(args.json, {**out, "summary": headline(out)})


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = common.device(args.device)
    out = {**common.machine(device), "config": common.config(args)}
    out["peak_bf16_tflops"] = peak_tflops(out["device_name"]) if device.type == "cuda" else None
    trains = set(args.modes) - {AUGMENT}
    gflops = gflops_per_image(args) if trains else None
    print(
        f"device: {out['device_name']}, torch {torch.__version__}, {args.arch} at "
        f"{args.crop_size} px, batch {args.batch_size}, -j {args.workers}, "
        f"{common.fmt(gflops)} GFLOPs/img",
        flush=True,
    )
    modes_run = [m for m in MODES if m in args.modes]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or (common.make_jpeg_folder(tmp, args.num_images) if trains else None)
        for mode in modes_run:
            out[mode] = measure(args, device, mode == "fast", data, gflops, out["peak_bf16_tflops"])
            save(args, out)
        if STEPS in args.modes:
            out[STEPS] = []
            for variant in STEP_VARIANTS:
                out[STEPS] += step_variants(args, device, data, gflops, [variant])
                save(args, out)
    if AUGMENT in args.modes:
        out["augment_ms_per_img_view"] = device_augment_ms(args, device)
    if len(modes_run) == 2:
        fast, released = out["fast"], out["released"]
        out["ratio_img_per_s"] = fast["img_per_s"] / released["img_per_s"]
        out["ratio_host_ms_per_img"] = fast["host_ms_per_img"] / released["host_ms_per_img"]
    print_report(out, modes_run)
    save(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
