#!/usr/bin/env python
"""Cost of checking a dataset's images before ``train_net`` launches, per image and scaled to
VOC07+12 trainval (16,551 images), for three depths of check on the same synthetic JPEGs
(photo-like, 500x375 by default):

- ``header``: ``Image.open`` and the size and EXIF orientation from the header (what
  ``moco_d2.detection.images.check_images`` does);
- ``verify``: the same plus ``Image.verify()`` (for JPEG, Pillow checks nothing more);
- ``decode``: a full decode (``Image.load()``), the only one that finds damaged pixel data.

    python benchmarks/image_check.py --images 300 --json image_check.json
"""

import os
import tempfile

import common
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


def time_check(check, paths: list[str], repeats: int) -> float:
    """Best of ``repeats`` passes, in ms per image (the files are in the page cache)."""
    best = min(common.seconds(lambda: [check(p) for p in paths]) for _ in range(repeats))
    return 1000 * best / len(paths)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__, "image_check.json")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        common.make_jpeg_folder(folder, args.images, size=(args.width, args.height))
        photos = os.path.join(folder, "photos")
        paths = [os.path.join(photos, name) for name in sorted(os.listdir(photos))]
        rows = {
            name: time_check(check, paths, args.repeats)
            for name, check in (("header", header), ("verify", verify), ("decode", decode))
        }
    voc_s = {name: ms * VOC_TRAIN_IMAGES / 1000 for name, ms in rows.items()}
    common.print_table(
        ["check", "ms/image", "s for VOC07+12 trainval", "x header"],
        [[name, ms, voc_s[name], ms / rows["header"]] for name, ms in rows.items()],
    )
    out = {
        "ms_per_image": rows,
        "voc_trainval_seconds": voc_s,
        "config": common.config(args),
        "machine": {"cpus": os.cpu_count()},
    }
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
