#!/usr/bin/env python
"""MoCo pretraining throughput, end to end, released recipe against the fast path in one run.

Two modes on the same device and the same folder of JPEGs:

- ``released``: fp32, PIL augmentation in the DataLoader workers, a host sync every step, the
  per-parameter momentum loop and per-parameter SGD: what the released main_moco.py does.
- ``fast``: bf16 autocast (on CUDA where supported; fp32 on CPU), ``--augment-on device``, the
  sync-free step, foreach momentum update, fused (CUDA) or foreach SGD, channels-last on CUDA,
  optionally torch.compile.

For each mode: end-to-end img/s (decode → augment → step), img/s of the step alone on tensors
already on the device, host CPU ms per image spent in the data pipeline (CPU time of each
item's decode, crop and, on the loader path, PIL augmentation, measured inside the workers; the
fast mode's device augmentation is device work and is reported separately as
``device_augment_ms_per_img``), peak memory, GFLOPs per image, TFLOP/s and MFU.

GFLOPs per image: fvcore's FlopCountAnalysis of the encoder (trunk + projection head) at the
crop size counts one multiply-add as one flop; ×2 gives FLOPs; a training image costs the query
forward, the key forward and the query backward (≈ 2 forwards): 4 forwards in all. The
queue logits (128 × K multiply-adds per image) are left out.

    python benchmarks/pretrain_throughput.py --device cpu -a resnet18 --crop-size 64 --json out.json
"""

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from moco_d2.pretrain import MoCo
from moco_d2.pretrain.augment import TwoCropsTransform, moco_augmentation
from moco_d2.pretrain.builder import build_encoder
from moco_d2.pretrain.data import TolerantImageFolder
from moco_d2.pretrain.device_augment import DeviceAugment, TwoCropsLoader
from moco_d2.pretrain.engine import train_one_epoch
from moco_d2.pretrain.health import last_stage_positions
from moco_d2.pretrain.main import compile_encoders, resolve_bn_splits, sgd_kernel
from moco_d2.training.amp import bf16_supported
from moco_d2.training.distributed import resolve_device

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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="folder of JPEGs (default: generate them)")
    p.add_argument("--num-images", default=512, type=int, help="JPEGs to generate without --data")
    p.add_argument("-a", "--arch", default="resnet50")
    p.add_argument("-b", "--batch-size", default=64, type=int, help="images per step")
    p.add_argument("-j", "--workers", default=min(16, os.cpu_count() or 1), type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--crop-size", default=224, type=int)
    p.add_argument("--bn-splits", default=None, type=int, help="default: as pretrain_moco.py")
    p.add_argument("--moco-k", default=65536, type=int)
    p.add_argument("--warmup", default=3, type=int, help="untimed steps first")
    p.add_argument("--iters", default=20, type=int, help="timed steps of the step alone")
    p.add_argument("--e2e-iters", default=20, type=int, help="timed end-to-end steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast mode's model")
    p.add_argument("--json", default="pretrain_throughput.json", help="where to write results")
    return p.parse_args(argv)


def photo_like(rng, width=500, height=375):
    """A 'photograph': 1/f colour noise (natural-image spectrum), a few soft shapes, grain."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height)) ** 1.1
    channels = []
    base = rng.standard_normal((height, width // 2 + 1)) + 1j * rng.standard_normal(
        (height, width // 2 + 1)
    )
    for _ in range(3):
        tint = rng.standard_normal((height, width // 2 + 1)) * 0.3
        channels.append(np.fft.irfft2((base + tint) * amplitude, s=(height, width)))
    img = np.stack(channels, axis=-1)
    img = (img - img.mean()) / (img.std() + 1e-8) * 45 + rng.uniform(80, 170, 3)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(rng.integers(2, 6)):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
        mask = 1 / (1 + np.exp((np.hypot(yy - cy, xx - cx) - r) / 3))
        img += mask[..., None] * rng.uniform(-60, 60, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_jpeg_folder(root, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "photos"), exist_ok=True)
    for i in range(n):
        photo_like(rng).save(os.path.join(root, "photos", f"{i:05d}.jpg"), quality=90)
    return root


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedDataset(Dataset):
    """``dataset``'s items with the CPU seconds spent producing each (decode, crop, and on the
    loader path the PIL augmentations) in place of the target, which training ignores."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        start = time.thread_time()
        images, _, skipped = self.dataset[index]
        return images, torch.tensor(time.thread_time() - start, dtype=torch.float64), skipped


class TimedLoader:
    """Yields ``loader``'s batches; marks the start of the timed window after ``warmup``
    batches (device synced first) and sums the per-image pipeline CPU time."""

    def __init__(self, loader, warmup, device):
        self.loader, self.warmup, self.device = loader, warmup, device
        self.start = None
        self.pipeline_cpu_s = 0.0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        for i in range(len(self.loader)):
            if i == self.warmup:
                sync(self.device)
                self.start = time.perf_counter()
            batch = next(it)
            if isinstance(batch[1], torch.Tensor) and batch[1].dtype == torch.float64:
                self.pipeline_cpu_s += float(batch[1].sum())
            yield batch


def build(args, device, fast):
    torch.manual_seed(0)
    encoder = torchvision.models.__dict__[args.arch]
    splits = resolve_bn_splits(
        args.bn_splits,
        args.batch_size,
        False,
        last_stage_positions(encoder, args.crop_size),
        args.crop_size,
    )
    K = args.moco_k - args.moco_k % args.batch_size
    model = MoCo(encoder, K=K, bn_splits=splits, foreach_momentum=fast).to(device)
    channels_last = fast and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        0.03,
        momentum=0.9,
        weight_decay=1e-4,
        **(sgd_kernel(device) if fast else {"foreach": False}),
    )
    if fast and args.compile:
        compile_encoders(model)
    return model, model, opt, channels_last, splits, K


def step_only(args, device, fast, train_model, opt, channels_last, amp):
    """img/s of forward + backward + SGD + momentum + queue on normalised device tensors."""
    shape = (args.batch_size, 3, args.crop_size, args.crop_size)
    views = [torch.randn(shape, device=device) for _ in range(2)]
    on_device = [(views, None, torch.zeros(1, dtype=torch.long))] * (args.warmup + args.iters)
    timed = TimedLoader(on_device, args.warmup, device)
    _timed_epoch(train_model, timed, opt, device, amp, channels_last, fast)
    return args.batch_size * args.iters / (time.perf_counter() - timed.start)


def _timed_epoch(train_model, timed, opt, device, amp, channels_last, fast, augment=None):
    """One pass of the real training loop over ``timed``, with the mode's step settings."""
    train_one_epoch(
        train_model,
        timed,
        opt,
        0,
        device,
        0.03,
        amp=amp,
        print_freq=len(timed),
        show_progress=False,
        augment=augment,
        channels_last=channels_last,
        sync_every_step=not fast,
    )
    sync(device)


def device_augment_ms(args, device):
    crops = torch.randint(
        0, 256, (args.batch_size, 3, args.crop_size, args.crop_size), dtype=torch.uint8
    ).to(device)
    aug = DeviceAugment(True)
    for _ in range(2):
        aug(crops)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        aug(crops)
    sync(device)
    return (time.perf_counter() - start) / (5 * args.batch_size) * 1e3


def end_to_end(args, device, fast, train_model, opt, channels_last, amp, data):
    if fast:
        dataset = TolerantImageFolder(data, load=TwoCropsLoader(args.crop_size))
        augment = DeviceAugment(True)
    else:
        transform = TwoCropsTransform(moco_augmentation(True, args.crop_size))
        dataset = TolerantImageFolder(data, transform)
        augment = None
    steps = args.warmup + args.e2e_iters
    images = steps * args.batch_size
    sampler = RandomSampler(dataset, replacement=True, num_samples=images)
    loader = DataLoader(
        TimedDataset(dataset),
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    timed = TimedLoader(loader, args.warmup, device)
    _timed_epoch(train_model, timed, opt, device, amp, channels_last, fast, augment)
    elapsed = time.perf_counter() - timed.start
    return args.batch_size * args.e2e_iters / elapsed, timed.pipeline_cpu_s / images * 1e3


def gflops_per_image(args):
    from fvcore.nn import FlopCountAnalysis

    model = build_encoder(torchvision.models.__dict__[args.arch], 128, mlp=True).eval()
    counter = FlopCountAnalysis(model, torch.zeros(1, 3, args.crop_size, args.crop_size))
    counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return 2 * 4 * counter.total() / 1e9  # FMA = 2 FLOPs; q fwd + k fwd + bwd (2 fwd)


def peak_tflops(name):
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def measure(args, device, fast, data, gflops, peak):
    model, train_model, opt, channels_last, splits, K = build(args, device, fast)
    # bf16 autocast on CUDA only: CPUs without native bf16 units run it slower than fp32
    amp = fast and device.type == "cuda" and bf16_supported(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = step_only(args, device, fast, train_model, opt, channels_last, amp)
    e2e, host_ms = end_to_end(args, device, fast, train_model, opt, channels_last, amp, data)
    if device.type == "cuda":
        peak_mem, kind = torch.cuda.max_memory_allocated(device), "gpu_allocated"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kind = "process_rss_so_far"
    tflops = gflops * e2e / 1e3
    result = {
        "img_per_s": e2e,
        "step_img_per_s": step,
        "host_ms_per_img": host_ms,
        "peak_mem_bytes": int(peak_mem),
        "peak_mem_kind": kind,
        "gflops_per_img": gflops,
        "tflops": tflops,
        "step_tflops": gflops * step / 1e3,
        "mfu": tflops / peak if peak else None,
        "step_mfu": gflops * step / 1e3 / peak if peak else None,
        "amp_bf16": amp,
        "augment_on": "device" if fast else "loader",
        "channels_last": channels_last,
        "compile": bool(fast and args.compile),
        "bn_splits": splits,
        "K": K,
    }
    if fast:
        result["device_augment_ms_per_img"] = device_augment_ms(args, device)
    del model, train_model, opt
    return result


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_jpeg_folder(tmp, args.num_images)
        peak = peak_tflops(name) if device.type == "cuda" else None
        gflops = gflops_per_image(args)
        results = {
            mode: measure(args, device, mode == "fast", data, gflops, peak)
            for mode in ("released", "fast")
        }
    ratio = results["fast"]["img_per_s"] / results["released"]["img_per_s"]
    print(
        f"device: {name}, torch {torch.__version__}, {args.arch} at {args.crop_size} px, "
        f"batch {args.batch_size}, -j {args.workers}, {gflops:.2f} GFLOPs/img"
    )
    print(
        f"{'mode':<9} {'img/s':>8} {'step img/s':>11} {'host ms/img':>12} {'peak MiB':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6}"
    )
    for mode, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{mode:<9} {r['img_per_s']:>8.1f} {r['step_img_per_s']:>11.1f} "
            f"{r['host_ms_per_img']:>12.2f} {r['peak_mem_bytes'] / 2**20:>9.0f} "
            f"{r['tflops']:>8.3f} {mfu:>6}"
        )
    host_ratio = results["fast"]["host_ms_per_img"] / results["released"]["host_ms_per_img"]
    print(f"fast/released: {ratio:.2f}x end to end; host ms per image x{host_ratio:.2f}")
    out = {
        "device": str(device),
        "device_name": name,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "released": results["released"],
        "fast": results["fast"],
        "ratio_img_per_s": ratio,
        "ratio_host_ms_per_img": host_ratio,
    }
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
