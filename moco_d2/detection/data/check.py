"""Check a user's VOC tree before a day-long training run: counts per split, broken files."""

import os

from moco_d2.detection.data.voc import (
    CLASS_NAMES,
    SPLITS,
    annotation_file,
    image_file,
    parse_annotation,
    read_split,
)
from moco_d2.errors import UserError

# Image counts of the official releases (5,011 + 11,540 = 16,551 train; 4,952 test).
EXPECTED_IMAGES = {"voc_2007_trainval": 5011, "voc_2012_trainval": 11540, "voc_2007_test": 4952}


def check_split(dirname: str, split: str) -> tuple[int, int, int, list[str]]:
    """``(images, objects, clipped boxes, problems)`` for one split; problems are one line
    each, with paths (an empty split, an invalid box, a missing file)."""
    try:
        fileids = read_split(dirname, split)
    except UserError as e:
        return 0, 0, 0, [str(e)]
    objects, clipped, problems = 0, 0, []
    for fileid in fileids:
        try:
            record, n = parse_annotation(annotation_file(dirname, fileid), CLASS_NAMES)
            objects += len(record["annotations"])
            clipped += n
        except UserError as e:
            problems.append(str(e))
        if not os.path.isfile(image_file(dirname, fileid)):
            problems.append(f"VOC image not found: {image_file(dirname, fileid)}")
    return len(fileids), objects, clipped, problems


def check_voc_tree(root: str) -> list[dict]:
    """One row per protocol split: name, folder, images, expected images, objects, problems."""
    rows = []
    for name, (folder, split, _year) in SPLITS.items():
        images, objects, clipped, problems = check_split(os.path.join(root, folder), split)
        rows.append(
            {
                "name": name,
                "dirname": os.path.join(root, folder),
                "images": images,
                "expected_images": EXPECTED_IMAGES[name],
                "objects": objects,
                "clipped": clipped,
                "problems": problems,
            }
        )
    return rows
