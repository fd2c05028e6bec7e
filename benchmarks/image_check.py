#!/usr/bin/env python
"""Cost of checking a dataset's images before ``train_net`` launches, per image and scaled to
VOC07+12 trainval (16,551 images), for three depths of check on the same synthetic JPEGs:

- ``header``: ``Image.open`` and the size and EXIF orientation from the header (what
  ``moco_d2.detection.images.check_images`` does);
- ``verify``: the same plus ``Image.verify()`` (for JPEG, Pillow checks nothing more);
- ``decode``: a full decode (``Image.load()``), the only one that finds damaged pixel data.

    python benchmarks/image_check.py --images 300 --json image_check.json
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

VOC_TRAIN_IMAGES = 16551


def header(path: str) -> None:
    with Image.open(path) as image:
        image.size, image.getexif().get(0x0112)


def verify(path: str) -> None:
    with Image.open(path) as image:
        image.size, image.getexif().get(0x0112)
        image.verify()


def decode(path: str) -> None:
    with Image.open(path) as image:
        image.load()


def write_images(folder: str, count: int, size: tuple[int, int], seed: int) -> list[str]:
    """JPEGs of VOC's typical size, of smooth noise so they compress like photographs."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.BILINEAR)
        path = os.path.join(folder, f"{i:06d}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return paths


def time_check(check, paths: list[str], repeats: int) -> float:
    """Best of ``repeats`` passes, in ms per image (the files are in the page cache)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            check(path)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(paths)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="image_check.json", help="where to write results")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(folder, args.images, (args.width, args.height), seed=0)
        rows = {
            name: time_check(check, paths, args.repeats)
            for name, check in (("header", header), ("verify", verify), ("decode", decode))
        }
    print(f"{'check':8} {'ms/image':>9} {'s for VOC07+12 trainval':>24} {'x header':>9}")
    for name, ms in rows.items():
        voc_s = ms * VOC_TRAIN_IMAGES / 1000
        print(f"{name:8} {ms:9.3f} {voc_s:24.1f} {ms / rows['header']:9.1f}")
    out = {
        "ms_per_image": rows,
        "voc_trainval_seconds": {k: v * VOC_TRAIN_IMAGES / 1000 for k, v in rows.items()},
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"processor": platform.processor(), "cpus": os.cpu_count()},
    }
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
