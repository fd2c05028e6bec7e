"""COCO 2017 instances for the detection transfer, with errors that name the broken file.

Detectron2 registers ``coco_2017_train``/``coco_2017_val`` when ``detectron2.data`` is
imported, with its own paths under ``$DETECTRON2_DATASETS`` and its 80-class metadata. This
module registers the same two names again under :func:`datasets_root` (read now, with ``~``
expanded), keeping detectron2's metadata and loader (``load_coco_json``) and adding a
validation layer: a missing folder, an annotation file that is not COCO instances JSON, or
one that names missing images is a :class:`UserError` naming the path, before launch
(:func:`check_coco_datasets`) and again in the loader.
"""

import json
import os
from collections.abc import Iterable

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json

from moco_d2.detection.data.catalog import register_replacing
from moco_d2.detection.data.voc import datasets_root
from moco_d2.errors import UserError

# name -> (image folder, annotation file) under the datasets root, as detectron2 lays them out.
SPLITS = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}

_ROOT_HINT = "set DETECTRON2_DATASETS to the folder holding coco/ (datasets/README.md)"
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


def coco_categories() -> list[dict]:
    """COCO's 80 thing categories as they appear in ``instances_*2017.json`` (id and name)."""
    meta = _get_builtin_metadata("coco")
    ids = sorted(meta["thing_dataset_id_to_contiguous_id"])
    return [{"id": i, "name": name} for i, name in zip(ids, meta["thing_classes"], strict=True)]


def _invalid(json_file: str, why: str) -> UserError:
    return UserError(f"not a valid COCO instances file {json_file}: {why}")


def _check_records(records: object, keys: tuple[str, ...], what: str, json_file: str) -> None:
    if not isinstance(records, list):
        raise _invalid(json_file, f'"{what}" is not a list')
    for index, record in enumerate(records):
        missing = [k for k in keys if not isinstance(record, dict) or k not in record]
        if missing:
            raise _invalid(json_file, f'{what}[{index}] lacks "{missing[0]}"')


def validate_coco_json(json_file: str, image_root: str) -> dict:
    """Parse ``json_file`` and check what the loader and COCOEvaluator rely on.

    Checks: valid JSON with ``images``, ``annotations`` and ``categories`` lists; each image
    has an id, file name and size and exists under ``image_root``; each annotation names a
    listed image and category; the categories are COCO's 80, which detectron2's metadata
    for these names fixes. Returns the parsed file.
    """
    try:
        with open(json_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"COCO annotation file not found: {json_file}; {_ROOT_HINT}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _invalid(json_file, str(e)) from None
    if not isinstance(data, dict):
        raise _invalid(json_file, "the top level is not an object")
    _check_records(data.get("images"), _IMAGE_KEYS, "images", json_file)
    _check_records(data.get("annotations"), _ANNOTATION_KEYS, "annotations", json_file)
    _check_records(data.get("categories"), ("id", "name"), "categories", json_file)
    categories = sorted((c["id"], c["name"]) for c in data["categories"])
    if categories != [(c["id"], c["name"]) for c in coco_categories()]:
        raise _invalid(json_file, "its categories are not COCO's 80 (ids and names)")
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise _invalid(
                json_file, f"annotation {ann['id']} names unknown image {ann['image_id']}"
            )
        if ann["category_id"] not in category_ids:
            raise _invalid(
                json_file, f"annotation {ann['id']} names unknown category {ann['category_id']}"
            )
    missing = [
        os.path.join(image_root, image["file_name"])
        for image in data["images"]
        if not os.path.isfile(os.path.join(image_root, image["file_name"]))
    ]
    if missing:
        raise UserError(
            f"{json_file} names {len(missing)} image(s) that do not exist, e.g. {missing[0]}"
        )
    return data


def check_coco_tree(image_root: str, json_file: str) -> None:
    """One line naming the path when the image folder or annotation file is missing."""
    if not os.path.isfile(json_file):
        raise UserError(f"COCO annotation file not found: {json_file}; {_ROOT_HINT}")
    if not os.path.isdir(image_root):
        raise UserError(f"COCO image folder not found: {image_root}; {_ROOT_HINT}")


def check_coco_datasets(dataset_names: Iterable[str]) -> None:
    """Fail before launch if a registered COCO dataset's folder or annotation file is bad.

    Datasets whose metadata is not ``evaluator_type == "coco"`` are left to their own checks.
    """
    for name in dataset_names:
        metadata = MetadataCatalog.get(name)
        if metadata.get("evaluator_type") == "coco" and metadata.get("json_file"):
            check_coco_tree(metadata.image_root, metadata.json_file)
            validate_coco_json(metadata.json_file, metadata.image_root)


def load_coco_instances(json_file: str, image_root: str, name: str) -> list[dict]:
    """detectron2's ``load_coco_json`` behind the checks of :func:`check_coco_tree`."""
    check_coco_tree(image_root, json_file)
    try:
        dicts = load_coco_json(json_file, image_root, name)
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        raise _invalid(json_file, f"{type(e).__name__}: {e}") from None
    for record in dicts:
        if not os.path.isfile(record["file_name"]):
            raise UserError(
                f"{json_file} names an image that does not exist: {record['file_name']}"
            )
    return dicts


def register_coco(name: str, image_root: str, json_file: str) -> None:
    """(Re-)register one split with detectron2's COCO metadata and the checking loader."""
    register_replacing(
        name,
        lambda: load_coco_instances(json_file, image_root, name),
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        **_get_builtin_metadata("coco"),
    )


def register_all_coco(root: str | None = None) -> None:
    """Register the protocol's COCO splits under ``root`` (default :func:`datasets_root`)."""
    root = datasets_root() if root is None else root
    for name, (image_folder, json_name) in SPLITS.items():
        register_coco(name, os.path.join(root, image_folder), os.path.join(root, json_name))


register_all_coco()
