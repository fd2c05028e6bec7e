"""A small synthetic tree in Pascal VOC format, in the layout, file names and XML fields of
real VOC, so it runs through the real loader. Two kinds of object: for the tests, each class a
flat colour and shape on grey, which even a tiny R50-C4 learns in a few iterations; for the
demo (``families=True``), class ``c`` is shape family ``c`` of :mod:`moco_d2.synthetic` in a
random colour on clutter, as the demo's pretraining images are."""

import os
import random

import numpy as np
from PIL import Image, ImageDraw

from moco_d2.detection.data.voc import CLASS_NAMES, annotation_file, image_file, split_file
from moco_d2.synthetic import FAMILIES, add_noise, cluttered_background, draw_family

# Saturated colours far apart from each other and from the background.
_COLOURS = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (245, 130, 48), (0, 0, 128), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (0, 128, 128), (250, 190, 212), (220, 190, 255), (255, 250, 200), (170, 110, 40), (0, 0, 0),
    (255, 255, 255), (210, 245, 60),
]  # fmt: skip
_SHAPES = ("rectangle", "ellipse", "triangle")
_BACKGROUND = (128, 128, 128)


def _overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_objects(rng, size, num_classes, max_objects):
    """Up to ``max_objects`` non-overlapping boxes (0-based, exclusive end) with classes."""
    placed = []
    for _ in range(rng.randint(1, max_objects)):
        for _attempt in range(20):
            w, h = (rng.randint(size // 4, size // 2) for _ in range(2))
            x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
            box = (x0, y0, x0 + w, y0 + h)
            if not any(_overlaps(box, other) for other, _ in placed):
                placed.append((box, rng.randrange(num_classes)))
                break
    return placed


def _draw(draw, box, cls):
    colour, shape = _COLOURS[cls], _SHAPES[cls % len(_SHAPES)]
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _annotation_xml(folder, fileid, size, objects):
    parts = [
        f"<annotation><folder>{folder}</folder><filename>{fileid}.jpg</filename>",
        f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
        "<segmented>0</segmented>",
    ]
    for (x0, y0, x1, y1), cls in objects:
        # VOC boxes are 1-based and inclusive.
        parts.append(
            f"<object><name>{CLASS_NAMES[cls]}</name><pose>Unspecified</pose>"
            f"<truncated>0</truncated><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
            f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    parts.append("</annotation>\n")
    return "\n".join(parts)


def _image(families, size, objects):
    if families is None:
        image = Image.new("RGB", (size, size), _BACKGROUND)
        for box, cls in objects:
            _draw(ImageDraw.Draw(image), box, cls)
        return image
    image = cluttered_background((size, size), families)
    for box, cls in objects:
        draw_family(image, cls, box, families)
    return add_noise(image, families)


def _write_split(rng, families, dirname, split, fileids, size, num_classes, max_objects):
    for sub in ("Annotations", os.path.join("ImageSets", "Main"), "JPEGImages"):
        os.makedirs(os.path.join(dirname, sub), exist_ok=True)
    for fileid in fileids:
        objects = _place_objects(rng, size, num_classes, max_objects)
        _image(families, size, objects).save(image_file(dirname, fileid), quality=95)
        with open(annotation_file(dirname, fileid), "w") as f:
            f.write(_annotation_xml(os.path.basename(dirname), fileid, size, objects))
    with open(split_file(dirname, split), "a") as f:
        f.writelines(fileid + "\n" for fileid in fileids)


def make_synthetic_voc(
    root: str | os.PathLike[str],
    num_train: int = 64,
    num_test: int = 16,
    image_size: int = 128,
    seed: int = 0,
    num_classes_used: int = 4,
    max_objects: int = 2,
    families: bool = False,
) -> dict[str, int]:
    """Write ``VOC2007/`` (trainval, test) and ``VOC2012/`` (trainval) under ``root``, which
    must not hold a VOC tree yet; the training images are split between the two trainval sets,
    objects use the first ``num_classes_used`` classes (with ``families``, class ``c`` is shape
    family ``c``). Returns ``{dataset name: images}``."""
    if num_train < 2 or num_test < 1:
        raise ValueError("need num_train >= 2 (VOC2007 and VOC2012) and num_test >= 1")
    limit = len(FAMILIES) if families else len(CLASS_NAMES)
    if not 1 <= num_classes_used <= limit:
        raise ValueError(f"num_classes_used must be in 1..{limit}")
    for folder in ("VOC2007", "VOC2012"):
        if os.path.exists(os.path.join(root, folder)):
            raise FileExistsError(os.path.join(root, folder))
    rng = random.Random(seed)
    family_rng = np.random.default_rng(seed) if families else None
    n2007 = num_train - num_train // 2
    plan = {
        "voc_2007_trainval": ("VOC2007", "trainval", [f"{i:06d}" for i in range(n2007)]),
        "voc_2012_trainval": (
            "VOC2012",
            "trainval",
            [f"2012_{i:06d}" for i in range(num_train - n2007)],
        ),
        "voc_2007_test": ("VOC2007", "test", [f"{i:06d}" for i in range(n2007, n2007 + num_test)]),
    }
    for folder, split, fileids in plan.values():
        _write_split(
            rng,
            family_rng,
            os.path.join(root, folder),
            split,
            fileids,
            image_size,
            num_classes_used,
            max_objects,
        )
    return {name: len(fileids) for name, (_, _, fileids) in plan.items()}
