#!/usr/bin/env python
"""Counted cost of the one-GPU MoCo v2 step, and the milliseconds it predicts on an H100/H200.

Nothing here is timed. Every aten op that does work is counted with the bytes it reads and
writes (`benchmarks/cost.py`), on the ``meta`` device at full size, so it runs on any
CPU in seconds. Rows:

- ``bn/...``: forward + backward of one BN layer on (64, 256, 28, 28) bf16 activations with fp32
  parameters: ``nn.BatchNorm2d`` and ``SplitBatchNorm(8)`` per memory format, eager; with
  ``--compile`` also both compiled, counted by inductor (its CPU backend, which needs a C++
  compiler; the fusion decisions that set the bytes are those of its GPU backend);
- ``augment/...``: one view of 256 uint8 crops at 224 px through ``DeviceAugment``, aug+ and v1;
- ``decode crops``: the two views that ``--decode-on device`` cuts and resizes from each of 256
  decoded 500x375 images (the nvJPEG decode itself is not an aten op);
- ``step/...``: the whole fast step of ``tools/pretrain_moco.py`` with its CUDA defaults
  (ResNet-50, 224 px, batch 256, K 65536, channels_last, the bf16 step of ``--amp``): both
  views augmented, the MoCo forward and backward, SGD, the momentum update and the queue, at
  ``--bn-splits 8`` and ``1``.

Predicted milliseconds use a stated model, not a measurement: a memory-bound op moves its bytes
at ``MEM_EFFICIENCY`` of the GPU's HBM bandwidth and costs ``LAUNCH_US`` more; convolutions and
matrix products run their FLOPs at a fraction of the dense bf16 peak fitted to one measured
figure, the plain-BN bf16 channels_last step at 3,158 img/s on one H200 (docs/speed.md).

    python benchmarks/step_cost.py --json step_cost.json
    python benchmarks/step_cost.py --compile --json step_cost.json   # + compiled BN rows
"""

import platform
import sys
import tempfile

import common
import torch
from cost import (
    AUGMENT_SHAPE,
    BN_SHAPE,
    FORMATS,
    augment_cost,
    bn_layer_cost,
    compiled_bn_layer_cost,
    decode_crop_cost,
    fast_step_cost,
)
from torch import nn

from moco_d2.pretrain.split_bn import SplitBatchNorm

# HBM bandwidth (bytes/s) and dense bf16 peak (FLOP/s), from the vendors' data sheets.
GPUS = {"H100 SXM": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}
MEM_EFFICIENCY = 0.7  # of the HBM bandwidth, for large elementwise and reduction kernels
LAUNCH_US = 4.0  # per kernel: launch and the gap between dependent kernels
SPLITS = 8
# The fit point: the plain-BN bf16 channels_last step (views given) measured on one H200.
MEASURED_GPU, MEASURED_IMG_PER_S, STEP_BATCH = "H200", 3158.0, 256
# (name, --bn-splits, channels_last, augmented); the first is the fit point
STEPS = (
    ("step/channels_last/bn-splits 1", 1, True, False),
    ("step/channels_last/bn-splits 8", SPLITS, True, False),
    ("step/nchw/bn-splits 1", 1, False, False),
    ("step/nchw/bn-splits 8", SPLITS, False, False),
    ("fast step (+ augment)/channels_last/bn-splits 8", SPLITS, True, True),
    ("fast step (+ augment)/nchw/bn-splits 8", SPLITS, False, True),
)


def predicted_ms(bytes_moved: float, ops: int, gpu: str) -> float:
    """Memory-bound work on ``gpu`` under the stated model."""
    bandwidth, _ = GPUS[gpu]
    return 1e3 * bytes_moved / (bandwidth * MEM_EFFICIENCY) + ops * LAUNCH_US / 1e3


def row(name: str, ops: int, bytes_moved: int, reference_bytes: int, syncs: int = 0) -> dict:
    return {
        "part": name,
        "ops": ops,
        "bytes": bytes_moved,
        "passes": bytes_moved / reference_bytes,
        "syncs": syncs,
        **{f"ms_{gpu}": predicted_ms(bytes_moved, ops, gpu) for gpu in GPUS},
    }


def bn_rows(compiled: bool) -> list[dict]:
    """Plain and split BN per format; ``passes`` in full-size bf16 tensors."""
    c = BN_SHAPE[1]
    reference = 2 * torch.Size(BN_SHAPE).numel()
    rows = []
    for fmt_name, fmt in FORMATS.items():
        for name, module in (("BatchNorm2d", nn.BatchNorm2d), ("SplitBatchNorm(8)", None)):
            layer = module(c) if module else SplitBatchNorm(c, SPLITS)
            count = bn_layer_cost(layer, fmt)
            rows.append(row(f"bn/{fmt_name}/{name}", count.ops, count.bytes, reference))
            if compiled:
                layer = module(c) if module else SplitBatchNorm(c, SPLITS)
                kernels = compiled_bn_layer_cost(layer, fmt)
                part = f"bn/{fmt_name}/{name} compiled"
                rows.append(row(part, kernels.kernels, kernels.bytes, reference))
    return rows


def augment_rows() -> list[dict]:
    """One view; ``passes`` in full-size fp32 batches."""
    reference = 4 * torch.Size(AUGMENT_SHAPE).numel()
    rows = []
    for aug_plus, name in ((True, "aug+"), (False, "v1")):
        torch.manual_seed(0)
        count = augment_cost(aug_plus)
        rows.append(row(f"augment/{name}", count.ops, count.bytes, reference, count.syncs))
    count = decode_crop_cost()
    part = "decode crops (2 views of 256 decoded 500x375 JPEGs)"
    rows.append(row(part, count.ops, count.bytes, 2 * reference, count.syncs))
    return rows


def step_ms(step, gpu: str, compute_efficiency: float) -> float:
    """Memory-bound ops as :func:`predicted_ms`, plus the convolutions' and matrix products'
    FLOPs at ``compute_efficiency`` of the dense bf16 peak."""
    _, peak = GPUS[gpu]
    memory = predicted_ms(step.count.bytes - step.compute_bytes, step.count.ops, gpu)
    return memory + 1e3 * step.flops / (peak * compute_efficiency)


def step_rows() -> tuple[list[dict], float]:
    """The steps of :data:`STEPS`, and the compute efficiency fitted on the first."""
    with tempfile.TemporaryDirectory() as folder:
        common.make_jpeg_folder(folder, 2, size=(32, 32))
        steps = [(name, fast_step_cost(folder, s, channels_last=cl, augmented=a))
                 for name, s, cl, a in STEPS]  # fmt: skip
    fit = steps[0][1]
    _, peak = GPUS[MEASURED_GPU]
    measured_ms = 1e3 * STEP_BATCH / MEASURED_IMG_PER_S
    memory_ms = predicted_ms(fit.count.bytes - fit.compute_bytes, fit.count.ops, MEASURED_GPU)
    efficiency = fit.flops / (peak * (measured_ms - memory_ms) / 1e3)
    rows = []
    for name, step in steps:
        r = row(name, step.count.ops, step.count.bytes, 1, step.count.syncs)
        r.pop("passes")
        r.update({f"ms_{gpu}": step_ms(step, gpu, efficiency) for gpu in GPUS})
        r["img_per_s"] = {gpu: 1e3 * STEP_BATCH / r[f"ms_{gpu}"] for gpu in GPUS}
        r.update(tflop=step.flops / 1e12, compute_bytes=step.compute_bytes)
        rows.append(r)
    return rows, efficiency


def print_table(rows: list[dict]) -> None:
    gpus = list(GPUS)
    header = ["part", "aten ops", "GB", "passes", "syncs", *(f"ms {g}" for g in gpus)]
    common.print_table(
        header,
        [[r["part"], r["ops"], r["bytes"] / 1e9, r.get("passes"), r["syncs"],
          *(r[f"ms_{g}"] for g in gpus)] for r in rows],
    )  # fmt: skip


def main(argv=None) -> int:
    p = common.parser(__doc__, "step_cost.json")
    p.add_argument("--compile", action="store_true", help="also count the compiled BN layers")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    parts = bn_rows(args.compile) + augment_rows()
    steps, efficiency = step_rows()
    print_table(parts + steps)
    bn1, bn8 = steps[0]["ms_H200"], steps[1]["ms_H200"]
    print(
        f"convolutions and matrix products at {efficiency:.1%} of the bf16 peak (fitted: "
        f"{STEPS[0][0]} = {MEASURED_IMG_PER_S:,.0f} img/s on one {MEASURED_GPU}); predicted "
        f"step at --bn-splits {SPLITS} / 1, channels_last: {bn1 / bn8:.2f}x"
    )
    rows = parts + steps
    result = {
        "counted_on": f"meta device; {platform.machine()} host, torch {torch.__version__}",
        "model": {
            "gpus": {g: {"hbm_bytes_per_s": bw, "bf16_flops": pk} for g, (bw, pk) in GPUS.items()},
            "mem_efficiency": MEM_EFFICIENCY,
            "launch_us": LAUNCH_US,
            "compute_efficiency": efficiency,
            "fitted_on": {
                "step": STEPS[0][0],
                "gpu": MEASURED_GPU,
                "img_per_s": MEASURED_IMG_PER_S,
            },
        },
        "rows": rows,
    }
    print("predictions from counts (stated model), not measurements")
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
