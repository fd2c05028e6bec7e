"""``datasets/prepare_voc.py``: check a VOC tree before a day-long run, or write a small synthetic
one."""

import os
from typing import Any

from moco_d2.cli import ArgumentParser
from moco_d2.detection.data.synthetic import make_synthetic_voc
from moco_d2.detection.data.voc import (
    CLASS_NAMES,
    SPLITS,
    annotation_file,
    datasets_root,
    image_file,
    parse_annotation,
    read_split,
)
from moco_d2.errors import UserError

# Image counts of the official releases (5,011 + 11,540 = 16,551 train; 4,952 test).
EXPECTED_IMAGES = {"voc_2007_trainval": 5011, "voc_2012_trainval": 11540, "voc_2007_test": 4952}
_SHOWN_PROBLEMS = 5


def check_voc_tree(root: str) -> list[dict]:
    """One row per protocol split: name, images, expected images, objects, clipped boxes and
    problems, one line each with its path (an empty split, an invalid box, a missing file)."""
    rows = []
    for name, (folder, split, _year) in SPLITS.items():
        dirname = os.path.join(root, folder)
        row: dict[str, Any] = dict(name=name, images=0, expected_images=EXPECTED_IMAGES[name])
        row.update(objects=0, clipped=0, problems=[])
        rows.append(row)
        try:
            fileids = read_split(dirname, split)
        except UserError as e:
            row["problems"].append(str(e))
            continue
        row["images"] = len(fileids)
        for fileid in fileids:
            try:
                record, clipped = parse_annotation(annotation_file(dirname, fileid), CLASS_NAMES)
                row["objects"] += len(record["annotations"])
                row["clipped"] += clipped
            except UserError as e:
                row["problems"].append(str(e))
            if not os.path.isfile(image_file(dirname, fileid)):
                row["problems"].append(f"VOC image not found: {image_file(dirname, fileid)}")
    return rows


def _check(args):
    rows = check_voc_tree(args.root)
    print(
        f"{'dataset':<20}{'images':>8}{'expected':>10}{'objects':>9}{'clipped':>9}{'problems':>10}"
    )
    for row in rows:
        print(
            f"{row['name']:<20}{row['images']:>8}{row['expected_images']:>10}"
            f"{row['objects']:>9}{row['clipped']:>9}{len(row['problems']):>10}"
        )
    partial = [row["name"] for row in rows if row["images"] != row["expected_images"]]
    if partial:
        print(
            f"note: {', '.join(partial)} differ from the official image counts "
            "(fine for a subset or a synthetic tree, not for reproducing the paper)"
        )
    problems = [p for row in rows for p in row["problems"]]
    for problem in problems[:_SHOWN_PROBLEMS]:
        print(f"  {problem}")
    if problems:
        raise UserError(
            f"{len(problems)} problem(s) in the VOC tree under {args.root} (first: {problems[0]})"
        )
    print(f"VOC tree under {args.root}: OK")


def _synthetic(args):
    try:
        counts = make_synthetic_voc(
            args.root, args.num_train, args.num_test, args.image_size, args.seed, args.num_classes
        )
    except (ValueError, FileExistsError) as e:
        raise UserError(f"synthetic VOC tree: {e}") from None
    print(
        f"synthetic VOC tree under {args.root}: "
        + ", ".join(f"{name} {n}" for name, n in counts.items())
    )


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="count images and objects, list broken files")
    check.add_argument(
        "--root",
        default=datasets_root(),
        help="folder holding VOC2007/ and VOC2012/ (default $DETECTRON2_DATASETS or ./datasets)",
    )
    check.set_defaults(run=_check)
    synthetic = commands.add_parser("synthetic", help="write a small synthetic VOC-format tree")
    synthetic.add_argument("--root", required=True, help="output folder (VOC2007/, VOC2012/)")
    synthetic.add_argument("--num-train", type=int, default=64)
    synthetic.add_argument("--num-test", type=int, default=16)
    synthetic.add_argument("--image-size", type=int, default=128)
    synthetic.add_argument("--num-classes", type=int, default=4)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(run=_synthetic)
    args = parser.parse_args(argv)
    args.run(args)
    return 0
