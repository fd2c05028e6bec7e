"""COCO 2017 instances for the detection transfer, with errors that name the broken file.

Detectron2 registers ``coco_2017_train``/``coco_2017_val`` when ``detectron2.data`` is
imported, with its own paths under ``$DETECTRON2_DATASETS`` and its 80-class metadata. This
module registers the same two names again under :func:`datasets_root` (read now, with ``~``
expanded), keeping detectron2's metadata and loader (``load_coco_json``) and adding a
validation layer: a missing folder, an annotation file that is not COCO instances JSON, one
that names missing images, and an invalid box are a :class:`UserError` naming the path and
the annotation, before launch (:func:`check_coco_datasets`, streaming the file) and again in
the loader, which applies the same box rule (:mod:`coco_check`).

A COCO-format dataset of one's own (``train_net --coco-dataset NAME JSON IMAGE_DIR``, e.g. a
CVAT, Roboflow or labelme export) is registered the same way, with the categories of its own
file, and gets the same checks.
"""

import argparse
import logging
import os
from collections.abc import Iterable
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json

from moco_d2.detection.data.catalog import register_replacing
from moco_d2.detection.data.coco_check import (
    CocoSummary,
    check_coco_file,
    checked_box,
    invalid,
    where,
)
from moco_d2.detection.data.voc import datasets_root
from moco_d2.errors import UserError

logger = logging.getLogger(__name__)

# name -> (image folder, annotation file) under the datasets root, as detectron2 lays them out.
SPLITS = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}

_ROOT_HINT = "set DETECTRON2_DATASETS to the folder holding coco/ (datasets/README.md)"


def coco_categories() -> list[dict]:
    """COCO's 80 thing categories as they appear in ``instances_*2017.json`` (id and name)."""
    meta = _get_builtin_metadata("coco")
    ids = sorted(meta["thing_dataset_id_to_contiguous_id"])
    return [{"id": i, "name": name} for i, name in zip(ids, meta["thing_classes"], strict=True)]


def check_coco_tree(image_root: str, json_file: str) -> None:
    """One line naming the path when the image folder or annotation file is missing."""
    if not os.path.isfile(json_file):
        raise UserError(f"COCO annotation file not found: {json_file}; {_ROOT_HINT}")
    if not os.path.isdir(image_root):
        raise UserError(f"COCO image folder not found: {image_root}; {_ROOT_HINT}")


def _expected_categories(metadata: Any) -> list[tuple[int, str]] | None:
    """The ``(id, name)`` pairs the metadata fixes (COCO's 80 for the protocol's names);
    None for a dataset registered without them, e.g. by ``register_coco_instances``."""
    id_map = metadata.get("thing_dataset_id_to_contiguous_id")
    classes = metadata.get("thing_classes")
    if not id_map or not classes:
        return None
    return [(i, classes[id_map[i]]) for i in sorted(id_map)]


def check_coco_datasets(
    dataset_names: Iterable[str], masks: bool = False, test_names: Iterable[str] = ()
) -> dict[str, CocoSummary]:
    """Fail before launch if a registered COCO dataset's folder or annotation file is bad;
    return what each holds. Datasets whose metadata is not ``evaluator_type == "coco"``
    are left to their own checks.

    ``masks``: every annotation needs a segmentation. ``test_names``: evaluated datasets,
    where an empty box is refused, since COCOeval reads the file and would count it.
    """
    summaries = {}
    for name in dataset_names:
        metadata = MetadataCatalog.get(name)
        if metadata.get("evaluator_type") != "coco" or not metadata.get("json_file"):
            continue
        check_coco_tree(metadata.image_root, metadata.json_file)
        summary = check_coco_file(
            metadata.json_file, metadata.image_root, _expected_categories(metadata), masks
        )
        if summary.empty and name in test_names:
            raise UserError(
                f"invalid COCO annotation {summary.first_empty} is empty (zero width or "
                f"height): test set {name!r} would keep it as ground truth that no detection "
                f"can match ({summary.empty} such box(es); training sets drop them)"
            )
        _log_dropped(metadata.json_file, summary.empty, summary.clipped)
        summaries[name] = summary
    return summaries


def _log_dropped(json_file: str, empty: int, clipped: int) -> None:
    if empty or clipped:
        logger.info(
            "%s: %d empty boxes (zero width or height) dropped, %d boxes touching or crossing "
            "the image border clipped to it",
            json_file,
            empty,
            clipped,
        )


def _apply_box_rule(dicts: list[dict], json_file: str) -> None:
    """The check's box rule on loaded records (XYWH boxes): clip, drop empty ones, refuse
    the rest; the annotation ids kept for the messages are removed again."""
    empty = clipped = 0
    for record in dicts:
        kept = []
        for ann in record["annotations"]:
            at = where(json_file, ann.pop("id", "?"), record["image_id"])
            box, was_clipped = checked_box(ann["bbox"], record["width"], record["height"], at)
            if box is None:
                empty += 1
                continue
            clipped += was_clipped
            ann["bbox"] = box
            kept.append(ann)
        record["annotations"] = kept
    _log_dropped(json_file, empty, clipped)


def load_coco_instances(json_file: str, image_root: str, name: str) -> list[dict]:
    """detectron2's ``load_coco_json`` behind the checks of :func:`check_coco_tree`, with the
    box rule of :func:`check_coco_file` applied, so training never sees an invalid box."""
    check_coco_tree(image_root, json_file)
    try:
        dicts = load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        raise invalid(json_file, f"{type(e).__name__}: {e}") from None
    for record in dicts:
        if not os.path.isfile(record["file_name"]):
            raise UserError(
                f"{json_file} names an image that does not exist: {record['file_name']}"
            )
    _apply_box_rule(dicts, json_file)
    return dicts


def register_coco(name: str, image_root: str, json_file: str, builtin: bool = True) -> None:
    """(Re-)register one split with the checking loader: with detectron2's COCO metadata
    (``builtin``), or, as ``register_coco_instances`` does, with none, the loader then
    taking the categories from the file."""
    register_replacing(
        name,
        lambda: load_coco_instances(json_file, image_root, name),
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        **(_get_builtin_metadata("coco") if builtin else {}),
    )


def add_coco_dataset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coco-dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register a COCO-format dataset of your own (e.g. a CVAT, Roboflow or labelme "
        "export) as NAME, for DATASETS.TRAIN/TEST; repeat for each split (docs/coco.md)",
    )


def register_coco_datasets(datasets: Iterable[tuple[str, str, str]]) -> None:
    """Register each ``--coco-dataset NAME JSON IMAGE_DIR``; a name that another dataset
    already has (a protocol split, say) is refused rather than replaced."""
    for name, json_file, image_root in datasets:
        if not os.path.isfile(json_file):
            raise UserError(f"--coco-dataset {name}: annotation file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise UserError(f"--coco-dataset {name}: image folder not found: {image_root}")
        if (
            name in DatasetCatalog.list()
            and MetadataCatalog.get(name).get("json_file") != json_file
        ):
            raise UserError(
                f"--coco-dataset {name}: another dataset is registered under that name; "
                "choose another NAME"
            )
        register_coco(name, image_root, json_file, builtin=False)


def register_all_coco(root: str | None = None) -> None:
    """Register the protocol's COCO splits under ``root`` (default :func:`datasets_root`)."""
    root = datasets_root() if root is None else root
    for name, (image_folder, json_name) in SPLITS.items():
        register_coco(name, os.path.join(root, image_folder), os.path.join(root, json_name))


register_all_coco()
