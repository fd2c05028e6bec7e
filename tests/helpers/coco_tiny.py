"""Shared by the COCO tests: a tiny synthetic COCO tree and the overrides that let Mask R-CNN
R50-C4 run on a CPU (TINY_OPTS plus an untrained model's scores kept for evaluation).

Each image holds a large, a medium and a small flat-coloured polygon in COCO's area ranges, so
every AP that COCOeval reports is defined; the files list COCO's 80 categories with their real
ids, so the tree registers under ``coco_2017_train``/``coco_2017_val`` with detectron2's metadata.
"""

import json
import math
import os
import random

from PIL import Image, ImageDraw
from transfer_tiny import TINY_OPTS

import moco_d2.detection  # noqa: F401  (compat shims and registrations before detectron2)
from moco_d2.detection.data.coco import SPLITS, coco_categories
from moco_d2.detection.data.synthetic_coco import polygon_area

# A few iterations leave every class score near 1/81, under the default 0.05 threshold;
# keeping them gives COCOeval detections to score, so every AP is defined.
COCO_TINY_OPTS = [*TINY_OPTS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
# Three categories, each a saturated colour far from the grey background.
USED = ((1, (230, 25, 75)), (3, (60, 180, 75)), (18, (0, 130, 200)))
BACKGROUND = (128, 128, 128)
VERTICES = 12
# (centre x, centre y, radius) as fractions of the image size: large, medium, small.
LAYOUT = ((0.38, 0.5, 0.36), (0.86, 0.25, 0.13), (0.86, 0.75, 0.04))


def _polygon(rng: random.Random, cx: float, cy: float, radius: float, size: int) -> list[float]:
    """A star-convex polygon around (cx, cy), vertex radii in [0.9, 1] x ``radius``, inside
    the ``size`` x ``size`` image (the jitter can push an edge shape past the border)."""
    xy = []
    for k in range(VERTICES):
        angle = 2 * math.pi * k / VERTICES
        r = radius * rng.uniform(0.9, 1.0)
        for v in (cx + r * math.cos(angle), cy + r * math.sin(angle)):
            xy.append(round(min(max(v, 0.0), float(size)), 2))
    return xy


def _image_and_annotations(
    rng: random.Random, image_id: int, size: int, first_ann_id: int
) -> tuple[Image.Image, list[dict]]:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    annotations = []
    for offset, (fx, fy, fr) in enumerate(LAYOUT):
        category_id, colour = rng.choice(USED)
        jitter = 0.02 * size
        cx, cy = fx * size + rng.uniform(-jitter, jitter), fy * size + rng.uniform(-jitter, jitter)
        xy = _polygon(rng, cx, cy, fr * size, size)
        draw.polygon(xy, fill=colour)
        xs, ys = xy[0::2], xy[1::2]
        annotations.append(
            {
                "id": first_ann_id + offset,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": [xy],
                "area": polygon_area(xy),
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "iscrowd": 0,
            }
        )
    return image, annotations


def write_split(root: str, name: str, num_images: int, image_size: int, rng: random.Random) -> str:
    """Write one split's images and annotation file under ``root``; return the file's path."""
    image_folder, json_name = SPLITS[name]
    image_dir = os.path.join(root, image_folder)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        image, anns = _image_and_annotations(rng, image_id, image_size, len(annotations) + 1)
        image.save(os.path.join(image_dir, file_name), quality=95)
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        annotations += anns
    json_file = os.path.join(root, json_name)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    with open(json_file, "w") as f:
        json.dump(
            {"images": images, "annotations": annotations, "categories": coco_categories()}, f
        )
    return json_file


def make_synthetic_coco(
    root: str, num_train: int = 8, num_val: int = 4, image_size: int = 192, seed: int = 0
) -> str:
    """A ``coco/`` tree (train2017, val2017, annotations) under ``root``; return ``root``."""
    rng = random.Random(seed)
    write_split(str(root), "coco_2017_train", num_train, image_size, rng)
    write_split(str(root), "coco_2017_val", num_val, image_size, rng)
    return str(root)
