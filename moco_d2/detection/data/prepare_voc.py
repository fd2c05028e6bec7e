"""``datasets/prepare_voc.py``: check a VOC tree, or write a small synthetic one."""

from moco_d2.cli import ArgumentParser
from moco_d2.detection.data.check import check_voc_tree
from moco_d2.detection.data.synthetic import make_synthetic_voc
from moco_d2.detection.data.voc import datasets_root
from moco_d2.errors import UserError

_SHOWN_PROBLEMS = 5


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
            args.root,
            num_train=args.num_train,
            num_test=args.num_test,
            image_size=args.image_size,
            seed=args.seed,
            num_classes_used=args.num_classes,
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
