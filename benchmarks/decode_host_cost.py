#!/usr/bin/env python
"""Host CPU ms per image of the DataLoader worker's item: ``--decode-on loader`` against
``--decode-on device``.

The loader item decodes the JPEG with PIL and makes the two RandomResizedCrop views
(:class:`TwoCropsLoader`); the device item only reads the file, parses the header and draws
the two boxes (:class:`EncodedTwoCrops`), and its decoding runs on the training device. Both
are timed with ``time.thread_time`` around each item inside one thread, as
``benchmarks/pretrain_throughput.py`` does in its workers, on generated 500×375 JPEGs at
quality 90 (or ``--data``), over ``--rounds`` passes (the median pass is reported).

    python benchmarks/decode_host_cost.py --num-images 64 --json decode_host_cost.json
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from moco_d2.pretrain.data import scan_image_folder
from moco_d2.pretrain.device_augment import TwoCropsLoader
from moco_d2.pretrain.device_decode import EncodedTwoCrops
from moco_d2.utils.fileio import atomic_write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_throughput import make_jpeg_folder  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="image folder (default: generate JPEGs)")
    p.add_argument("--num-images", default=64, type=int, help="JPEGs to generate without --data")
    p.add_argument("--crop-size", default=224, type=int)
    p.add_argument("--rounds", default=3, type=int, help="passes over the images per path")
    p.add_argument("--json", default="decode_host_cost.json", help="where to write results")
    return p.parse_args(argv)


def host_ms_per_image(load, paths, rounds):
    """Median over ``rounds`` passes of the mean thread CPU ms per item."""
    passes = []
    for r in range(rounds):
        torch.manual_seed(r)
        total = 0.0
        for path in paths:
            start = time.thread_time()
            load(path)
            total += time.thread_time() - start
        passes.append(1000 * total / len(paths))
    return statistics.median(passes)


def measure(paths, crop_size, rounds):
    torch.set_num_threads(1)  # one worker's view: the crop's resize must not fan out
    loader = host_ms_per_image(TwoCropsLoader(crop_size), paths, rounds)
    device = host_ms_per_image(EncodedTwoCrops(crop_size), paths, rounds)
    return {
        "images": len(paths),
        "crop_size": crop_size,
        "rounds": rounds,
        "loader_ms_per_img": loader,
        "device_ms_per_img": device,
        "device_over_loader": device / loader,
    }


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_jpeg_folder(tmp, args.num_images)
        paths = [p for p, _ in scan_image_folder(data)[0]]
        result = measure(paths, args.crop_size, args.rounds)
    print("| --decode-on | host ms/img |\n|---|---|")
    print(f"| loader | {result['loader_ms_per_img']:.3f} |")
    print(f"| device (worker side) | {result['device_ms_per_img']:.3f} |")
    print(f"device/loader: {result['device_over_loader']:.3f}x")
    atomic_write_json(result, args.json)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
