"""A COCO instances file shaped like ``instances_train2017.json``, to measure the checks on it
(benchmarks/coco_check_cost.py)."""

import json
import os

import numpy as np
from PIL import Image

from moco_d2.detection.data.coco import coco_categories


def polygon_area(xy: list[float]) -> float:
    """Shoelace area of a flat ``[x0, y0, x1, y1, ...]`` polygon."""
    xs, ys = xy[0::2], xy[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


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
