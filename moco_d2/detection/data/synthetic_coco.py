"""A small synthetic tree in COCO 2017 instances format, for tests: each image holds a large, a
medium and a small flat-coloured polygon, so every AP that COCOeval reports is defined, and the
files list COCO's 80 categories, so the tree registers under detectron2's COCO names."""

import json
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from moco_d2.detection.data.coco import SPLITS, coco_categories

# Three categories, each a saturated colour far from the grey background.
_USED = ((1, (230, 25, 75)), (3, (60, 180, 75)), (18, (0, 130, 200)))
_BACKGROUND = (128, 128, 128)
_VERTICES = 12
# (centre x, centre y, radius) as fractions of the image size: large, medium, small.
_LAYOUT = ((0.38, 0.5, 0.36), (0.86, 0.25, 0.13), (0.86, 0.75, 0.04))


def polygon_area(xy: list[float]) -> float:
    """Shoelace area of a flat ``[x0, y0, x1, y1, ...]`` polygon."""
    xs, ys = xy[0::2], xy[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


def _polygon(rng: random.Random, cx: float, cy: float, radius: float, size: int) -> list[float]:
    """A star-convex polygon around (cx, cy), vertex radii in [0.9, 1] x ``radius``, inside
    the ``size`` x ``size`` image (the jitter can push an edge shape past the border)."""
    xy = []
    for k in range(_VERTICES):
        angle = 2 * math.pi * k / _VERTICES
        r = radius * rng.uniform(0.9, 1.0)
        for v in (cx + r * math.cos(angle), cy + r * math.sin(angle)):
            xy.append(round(min(max(v, 0.0), float(size)), 2))
    return xy


def _image_and_annotations(
    rng: random.Random, image_id: int, size: int, first_ann_id: int
) -> tuple[Image.Image, list[dict]]:
    image = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    annotations = []
    for offset, (fx, fy, fr) in enumerate(_LAYOUT):
        category_id, colour = rng.choice(_USED)
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


def write_sized_annotations(
    json_file: str,
    image_root: str,
    num_images: int,
    num_annotations: int,
    vertices: int = 22,
    seed: int = 0,
) -> None:
    """An instances file shaped like ``instances_train2017.json`` (118,287 images and 860,001
    polygons make about 450 MB), written record by record, to measure the checks. Every image
    is a hard link to one small JPEG of the recorded size: its header is read, no disk used."""
    rng = np.random.default_rng(seed)
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file) or ".", exist_ok=True)
    width, height = 640, 480
    blank = os.path.join(image_root, ".blank.jpg")
    Image.new("RGB", (width, height), (128, 128, 128)).save(blank, quality=50)
    category_ids = [c["id"] for c in coco_categories()]
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    with open(json_file, "w") as f:
        f.write('{"info": {"description": "synthetic"}, "licenses": [], "images": [')
        for index in range(num_images):
            file_name = f"{index + 1:012d}.jpg"
            os.link(blank, os.path.join(image_root, file_name))
            image = {
                "license": 1,
                "file_name": file_name,
                "coco_url": f"http://images.cocodataset.org/train2017/{file_name}",
                "height": height,
                "width": width,
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": f"http://farm4.staticflickr.com/1/{index}_0123456789_z.jpg",
                "id": index + 1,
            }
            f.write(("," if index else "") + json.dumps(image))
        f.write('], "annotations": [')
        batch = 10000
        for start in range(0, num_annotations, batch):
            n = min(batch, num_annotations - start)
            radius = rng.uniform(4, 100, (n, 2))
            centre = rng.uniform(radius, [width, height] - radius)
            jitter = rng.uniform(0.8, 1.0, (n, vertices))
            xs = np.round(centre[:, :1] + radius[:, :1] * jitter * np.cos(angles), 2)
            ys = np.round(centre[:, 1:] + radius[:, 1:] * jitter * np.sin(angles), 2)
            polygons = np.stack([xs, ys], axis=2).reshape(n, -1)
            images = rng.integers(1, num_images + 1, n)
            categories = rng.choice(category_ids, n)
            for k in range(n):
                x0, y0, x1, y1 = xs[k].min(), ys[k].min(), xs[k].max(), ys[k].max()
                ann = {
                    "segmentation": [polygons[k].tolist()],
                    "area": round(polygon_area(polygons[k].tolist()), 4),
                    "iscrowd": 0,
                    "image_id": int(images[k]),
                    "bbox": [float(x0), float(y0), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "category_id": int(categories[k]),
                    "id": start + k + 1,
                }
                f.write(("," if start + k else "") + json.dumps(ann))
        f.write('], "categories": ' + json.dumps(coco_categories()) + "}")
