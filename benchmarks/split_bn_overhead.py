#!/usr/bin/env python
"""Cost of SplitBatchNorm against nn.BatchNorm2d: forward + backward of one layer.

Times each candidate way of normalising ``num_splits`` groups separately, in NCHW and
channels_last, back to back with plain BatchNorm2d on the same tensor:

- ``module``: ``SplitBatchNorm`` as shipped (``native-view`` for NCHW, ``chunks`` for
  channels_last);
- ``transpose``: the earlier implementation, reshape → transpose → reshape to lay contiguous
  chunks side by side along channels, native BN, and the inverse (two copies each way);
- ``chunks-cat``: native BN on each contiguous batch chunk, then one ``torch.cat`` (what
  SplitBatchNorm runs for channels_last under torch.compile);
- ``native-view``: native BN on the free interleaved view ``x.view(n // s, s * c, h, w)``
  (channels_last input is converted to NCHW first and back after);
- ``chunks``: ``chunked_batch_norm``, native BN per contiguous chunk written into slices of one
  output, native backward per chunk joined by one ``cat``.

Next to the times, each row has the candidate's counted cost relative to BatchNorm2d: bytes
moved and aten ops of the same forward + backward on the meta device (``benchmarks/cost.py``,
the GPU proxy for memory-bound work), which does not depend on the machine or its load.

``--dtype bf16`` feeds a bf16 tensor under bf16 autocast, as a convolution's output would be.
Each repeat times ``--iters`` steps of BatchNorm2d and then of the candidate; the table gives the
median ms over repeats and the median of the per-repeat ratios (so load changes between repeats
cancel out). JSON: ``{"device", "device_name", "torch", "config", "rows": [{format, impl,
ms_bn2d, ms_split, ratio, bytes_ratio, ops_ratio}]}``; with ``--resnet50``, ``"resnet50": {format:
{layers, ms_bn2d, ms_split, ms_split_compiled, ratio, ratio_compiled}}`` in place of ``rows``.

    python benchmarks/split_bn_overhead.py --device cpu --json split_bn.json
"""

import collections
import statistics

import common
import torch
import torch.nn.functional as F
import torchvision
from cost import FORMATS, bn_layer_cost
from torch import nn

from moco_d2.pretrain.split_bn import SplitBatchNorm, chunked_batch_norm


def transpose_bn(bn, x):
    n, c, h, w = x.shape
    s = bn.num_splits
    grouped = x.reshape(s, n // s, c, h, w).transpose(0, 1).reshape(n // s, s * c, h, w)
    out = F.batch_norm(
        grouped, None, None, bn.weight.repeat(s), bn.bias.repeat(s), True, 0.0, bn.eps
    )
    return out.reshape(n // s, s, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def chunks_cat_bn(bn, x):
    chunks = x.chunk(bn.num_splits)
    return torch.cat(
        [F.batch_norm(g, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for g in chunks]
    )


def is_channels_last(x):
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def native_view_bn(bn, x):
    n, c, h, w = x.shape
    s = bn.num_splits
    view = x.contiguous().view(n // s, s * c, h, w)
    out = F.batch_norm(view, None, None, bn.weight.repeat(s), bn.bias.repeat(s), True, 0.0, bn.eps)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return out.view(n, c, h, w).contiguous(memory_format=fmt)


def chunks_bn(bn, x):
    return chunked_batch_norm(x, bn.weight, bn.bias, None, None, bn.num_splits, 0.0, bn.eps)[0]


IMPLS = {
    "module": lambda bn, x: bn(x),
    "transpose": transpose_bn,
    "chunks-cat": chunks_cat_bn,
    "native-view": native_view_bn,
    "chunks": chunks_bn,
}


def parse_args(argv):
    p = common.parser(__doc__, "split_bn_overhead.json")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument(
        "--shape", type=int, nargs=4, default=[64, 256, 28, 28], metavar=("N", "C", "H", "W")
    )
    p.add_argument("--num-splits", type=int, default=8)
    p.add_argument("--impl", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    p.add_argument("--format", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    p.add_argument("--iters", type=int, default=10, help="forward+backward steps per timing")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--resnet50",
        type=int,
        nargs=2,
        metavar=("BATCH", "CROP"),
        help="instead: every BN layer of a ResNet-50 at this batch and crop, summed",
    )
    p.add_argument("--compile", action="store_true", help="with --resnet50: SplitBN compiled too")
    args = p.parse_args(argv)
    if args.shape[0] % args.num_splits:
        p.error(f"batch {args.shape[0]} is not divisible by --num-splits {args.num_splits}")
    return args


def step_ms(fn, x, grad, iters, device, amp):
    """ms of one forward + backward of ``fn``, the mean of ``iters``."""

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = fn(x)
        out.backward(grad)

    return common.seconds(step, device, iters) * 1000 / iters


def measure(args, device, fmt, impl):
    amp = args.dtype == "bf16"
    dtype = torch.bfloat16 if amp else torch.float32
    torch.manual_seed(0)
    x = torch.randn(args.shape, device=device, dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    x.requires_grad_()
    grad = torch.randn_like(x)
    bn = nn.BatchNorm2d(args.shape[1], device=device)
    split = SplitBatchNorm(args.shape[1], args.num_splits, device=device)
    fn = IMPLS[impl]
    plain = (bn, lambda t: bn(t))
    candidate = (split, lambda t: fn(split, t))
    for _ in range(args.warmup):
        for _module, f in (plain, candidate):
            step_ms(f, x, grad, 1, device, amp)
    plain_ms, split_ms, ratios = [], [], []
    for _ in range(args.repeats):
        plain_ms.append(step_ms(plain[1], x, grad, args.iters, device, amp))
        split_ms.append(step_ms(candidate[1], x, grad, args.iters, device, amp))
        ratios.append(split_ms[-1] / plain_ms[-1])
    c = args.shape[1]
    shape = tuple(args.shape)
    plain_count = bn_layer_cost(nn.BatchNorm2d(c), FORMATS[fmt], shape, dtype)
    split_count = bn_layer_cost(SplitBatchNorm(c, args.num_splits), FORMATS[fmt], shape, dtype, fn)
    return {
        "format": fmt,
        "impl": impl,
        "ms_bn2d": statistics.median(plain_ms),
        "ms_split": statistics.median(split_ms),
        "ratio": statistics.median(ratios),
        "bytes_ratio": split_count.bytes / plain_count.bytes,
        "ops_ratio": split_count.ops / plain_count.ops,
    }


def resnet50_bn_shapes(batch: int, crop: int) -> collections.Counter:
    """The input shape of each of a ResNet-50's 53 BatchNorm layers: shape -> layers."""
    shapes = collections.Counter()
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda _m, inputs, _out: shapes.update([inputs[0].shape]))
    model(torch.empty(batch, 3, crop, crop, device="meta"))
    return shapes


def median_ms(fn, x, grad, args, device, amp):
    for _ in range(args.warmup):
        step_ms(fn, x, grad, 1, device, amp)
    return statistics.median(
        step_ms(fn, x, grad, args.iters, device, amp) for _ in range(args.repeats)
    )


def resnet50_rows(args, device):
    """Per format: forward + backward ms of every BN layer of a ResNet-50 summed, BatchNorm2d
    against SplitBatchNorm eager (and compiled, one compilation per distinct shape)."""
    amp = args.dtype == "bf16"
    dtype = torch.bfloat16 if amp else torch.float32
    shapes = resnet50_bn_shapes(*args.resnet50)
    results = {}
    for fmt in args.format:
        total = collections.Counter()
        for shape, layers in shapes.items():
            x = torch.randn(shape, device=device, dtype=dtype)
            x = x.contiguous(memory_format=FORMATS[fmt]).requires_grad_()
            grad = torch.randn_like(x)
            c = shape[1]
            candidates = {
                "ms_bn2d": nn.BatchNorm2d(c, device=device),
                "ms_split": SplitBatchNorm(c, args.num_splits, device=device),
            }
            if args.compile:
                torch._dynamo.reset()  # one compilation per shape, no recompile limit
                split = SplitBatchNorm(c, args.num_splits, device=device)
                candidates["ms_split_compiled"] = torch.compile(split, dynamic=False)
            for key, module in candidates.items():
                total[key] += layers * median_ms(module, x, grad, args, device, amp)
        row = {"format": fmt, "layers": sum(shapes.values()), **total}
        row["ratio"] = total["ms_split"] / total["ms_bn2d"]
        if args.compile:
            row["ratio_compiled"] = total["ms_split_compiled"] / total["ms_bn2d"]
        results[fmt] = row
    return results


def main(argv=None):
    args = parse_args(argv)
    device = common.device(args.device)
    out = {**common.machine(device), "config": common.config(args)}
    if args.resnet50:
        out["resnet50"] = resnet50_rows(args, device)
        print_resnet50(args, out["resnet50"])
        out["summary"] = "; ".join(
            f"{fmt} x{r['ratio']:.2f}"
            + (f", compiled x{r['ratio_compiled']:.2f}" if "ratio_compiled" in r else "")
            for fmt, r in out["resnet50"].items()
        )
    else:
        out["rows"] = [
            measure(args, device, fmt, impl) for fmt in args.format for impl in args.impl
        ]
        threads = torch.get_num_threads()
        print(
            f"{out['device_name']}, {args.dtype}, {tuple(args.shape)}, {args.num_splits} splits, "
            f"{threads} threads"
        )
        keys = ("format", "impl", "ms_bn2d", "ms_split", "ratio", "bytes_ratio", "ops_ratio")
        header = ("format", "impl", "ms BN2d", "ms SplitBN", "ratio", "bytes x", "ops x")
        common.print_table(header, [[r[k] for k in keys] for r in out["rows"]])
    common.write_json(args.json, out)
    return out


def print_resnet50(args, rows):
    batch, crop = args.resnet50
    title = f"ResNet-50 at batch {batch}, {crop} px: its 53 BN layers, {args.dtype}, fwd + bwd"
    header = ("format", "ms BN2d", "ms SplitBN", "compiled", "ratio", "compiled")
    keys = ("ms_bn2d", "ms_split", "ms_split_compiled", "ratio", "ratio_compiled")
    common.print_table(header, [[fmt, *(r.get(k) for k in keys)] for fmt, r in rows.items()], title)


if __name__ == "__main__":
    main()
