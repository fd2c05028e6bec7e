#!/usr/bin/env python
"""MoCo pretraining throughput: img/s and peak memory for an arch, batch and device, AMP off/on.

Times full training steps (query+key forward, InfoNCE, backward, SGD, queue update) on random
images, so the numbers exclude JPEG decoding and augmentation; compare them with the img/s the
training bar shows to see whether data loading is the bottleneck. Peak memory is the CUDA
allocator's peak on GPU; on CPU it is the process's peak RSS so far (so it only grows across the
AMP off/on runs). Prints a table, writes JSON.

    python benchmarks/pretrain_throughput.py -a resnet50 -b 32 --device cuda --json out.json
"""

import argparse
import json
import platform
import resource
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

from moco_d2.pretrain import MoCo
from moco_d2.pretrain.engine import autocast_context
from moco_d2.pretrain.main import resolve_bn_splits
from moco_d2.training.distributed import resolve_device


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-a", "--arch", default="resnet50")
    p.add_argument("-b", "--batch-size", default=32, type=int, help="images per step (one process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--crop-size", default=224, type=int)
    p.add_argument(
        "--amp", default="both", choices=["off", "on", "both"], help="bf16 autocast runs"
    )
    p.add_argument(
        "--bn-splits", default=None, type=int, help="default: as pretrain_moco.py with one process"
    )
    p.add_argument("--moco-k", default=65536, type=int)
    p.add_argument("--warmup", default=3, type=int, help="untimed steps first")
    p.add_argument("--iters", default=10, type=int, help="timed steps")
    p.add_argument("--json", default="pretrain_throughput.json", help="where to write the results")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, device, amp):
    """One configuration: steps/s → img/s, and peak memory (GPU allocator, or RSS on CPU)."""
    torch.manual_seed(0)
    splits = resolve_bn_splits(args.bn_splits, args.batch_size, distributed=False)
    K = args.moco_k - args.moco_k % args.batch_size
    model = MoCo(torchvision.models.__dict__[args.arch], K=K, bn_splits=splits).to(device)
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], 0.03, momentum=0.9, weight_decay=1e-4
    )
    im_q = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    im_k = torch.randn_like(im_q)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast_context(device, amp):
            logits, labels = model(im_q, im_k)
            loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "gpu_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"
    return {
        "arch": args.arch,
        "batch": args.batch_size,
        "crop": args.crop_size,
        "amp": amp,
        "bn_splits": splits,
        "K": K,
        "img_per_s": args.batch_size * args.iters / elapsed,
        "peak_mem_gib": peak / 2**30,
        "peak_mem_kind": kind,
    }


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    runs = {"off": [False], "on": [True], "both": [False, True]}[args.amp]
    results = [measure(args, device, amp) for amp in runs]
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print(
        f"device: {device} ({name}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{'arch':<10} {'batch':>5} {'crop':>4} {'amp':>5} {'img/s':>9} {'peak GiB':>9}")
    for r in results:
        print(
            f"{r['arch']:<10} {r['batch']:>5} {r['crop']:>4} {'bf16' if r['amp'] else 'fp32':>5} "
            f"{r['img_per_s']:>9.1f} {r['peak_mem_gib']:>9.2f}"
        )
    with open(args.json, "w") as f:
        json.dump(
            {
                "device": str(device),
                "device_name": name,
                "torch": torch.__version__,
                "results": results,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
