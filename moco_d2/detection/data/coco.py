"""COCO 2017 instances, and COCO-format datasets of one's own, with errors that name the broken
file and annotation.

``coco_2017_train``/``coco_2017_val`` are registered again under :func:`datasets_root` (read
now), with detectron2's metadata and ``load_coco_json`` behind a validation layer; a dataset of
one's own (``train_net --coco-dataset NAME JSON IMAGE_DIR``: a CVAT, Roboflow or labelme export)
gets the categories of its file and the same checks. Before launch the annotation file is
streamed: the launcher keeps image sizes and annotation ids, not the
several GB that ``json.load`` makes of ``instances_train2017.json``.

Boxes follow the VOC loader's rule, in COCO's ``[x, y, width, height]``: an inverted box or one
reaching more than a pixel outside its image is an error, one crossing the border by up to a
pixel is clipped. An empty box is dropped in training sets (the official train file holds two:
annotation 918 is a polygon of zero height) and refused in test sets, where COCOeval, reading
the file itself, would count it as ground truth that no detection can match.
"""

import argparse
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json

from moco_d2.detection.data.voc import BORDER_TOLERANCE, datasets_root, register_replacing
from moco_d2.detection.images import image_size, size_mismatch
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


# The streaming reader: each element of a top-level list decoded by the C decoder
# (json.JSONDecoder.raw_decode) from a sliding text buffer, so memory stays at the buffer.
CHUNK = 1 << 20  # characters read at a time; the buffer keeps at least this much ahead
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
END = object()  # yielded as ``(key, END)`` once the list under ``key`` is complete


class JSONStreamError(ValueError):
    """Invalid JSON, or not an object at the top level; the message gives the offset."""


class _Reader:
    def __init__(self, f: Any) -> None:
        self.f, self.buf, self.pos, self.offset, self.eof = f, "", 0, 0, False

    def _more(self, at_least: int = CHUNK) -> bool:
        """Append at least ``at_least`` characters, dropping what was consumed."""
        if self.eof:
            return False
        text = self.f.read(at_least)
        self.eof = len(text) < at_least
        self.offset += self.pos
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        return bool(text)

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos : self.pos + 1]

    def expect(self, chars: str, what: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            raise JSONStreamError(f"Expecting {what} at char {self.offset + self.pos}")
        self.pos += 1
        return char

    def value(self) -> Any:
        """Decode one value; read further while it may be cut off by the buffer's end."""
        self.peek()
        if len(self.buf) - self.pos < CHUNK:
            self._more()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # Double what is buffered: a value cut by the buffer's end decodes next time,
                # a real error is reported once the rest of the file is in.
                if self._more(max(CHUNK, len(self.buf) - self.pos)):
                    continue
                raise JSONStreamError(f"{e.msg} at char {self.offset + e.pos}") from None
            if end == len(self.buf) and self._more():
                continue  # a number at the buffer's end may go on
            self.pos = end
            return value


def iter_top_level(f: Any, list_keys: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """``(key, element)`` for each element of the top-level lists named in ``list_keys``, then
    ``(key, END)``; ``(key, value)`` for any other top-level entry. ``f`` is a text file."""
    reader = _Reader(f)
    first = reader.peek()
    if first != "{":
        raise JSONStreamError("the top level is not an object" if first else "the file is empty")
    reader.pos += 1
    if reader.peek() == "}":
        reader.pos += 1
        return
    while True:
        if reader.peek() != '"':
            raise JSONStreamError(
                f"Expecting property name enclosed in double quotes at char "
                f"{reader.offset + reader.pos}"
            )
        key = reader.value()
        reader.expect(":", "':' delimiter")
        if key in list_keys:
            if reader.peek() != "[":
                raise JSONStreamError(f'"{key}" is not a list')
            reader.pos += 1
            if reader.peek() == "]":
                reader.pos += 1
            else:
                while True:
                    yield key, reader.value()
                    if reader.expect(",]", "',' delimiter") == "]":
                        break
            yield key, END
        else:
            yield key, reader.value()
        if reader.expect(",}", "',' delimiter") == "}":
            break
    if reader.peek():
        raise JSONStreamError(f"Extra data at char {reader.offset + reader.pos}")


LIST_KEYS = ("images", "annotations", "categories")
_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


@dataclass
class CocoSummary:
    """What one file holds: images, kept boxes, dropped empty boxes, clipped boxes, and the
    categories (the classes detectron2 gives a model trained on it)."""

    images: int = 0
    categories: int = 0
    objects: int = 0
    empty: int = 0
    first_empty: str = ""  # "FILE, annotation ID (image I): bbox [...]" of the first empty box
    clipped: int = 0
    no_area: int = 0  # annotations without "area", and without "iscrowd": evaluation fills them
    no_iscrowd: int = 0


def invalid(json_file: str, why: str) -> UserError:
    return UserError(f"not a valid COCO instances file {json_file}: {why}")


def where(json_file: str, annotation_id: Any, image_id: Any) -> str:
    return f"{json_file}, annotation {annotation_id} (image {image_id})"


def _box_text(bbox: list[float]) -> str:
    return "bbox [" + ", ".join(f"{v:g}" for v in bbox) + "]"


def checked_box(bbox: Any, width: float, height: float, at: str) -> tuple[list[float] | None, bool]:
    """A COCO box under VOC's rule: ``(box clipped to the image, clipped?)``, or
    ``(None, False)`` for an empty box (zero width or height, also after clipping)."""
    if not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        and all(math.isfinite(v) for v in bbox)
    ):
        raise UserError(
            f"invalid COCO annotation {at}: bbox {bbox!r} is not 4 finite numbers "
            "[x, y, width, height]"
        )
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise UserError(
            f"invalid COCO annotation {at}: {_box_text(bbox)} is inverted "
            "(needs width >= 0 and height >= 0)"
        )
    if w == 0 or h == 0:
        return None, False
    t = BORDER_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise UserError(
            f"invalid COCO annotation {at}: {_box_text(bbox)} lies more than {t:g} pixel "
            f"outside the {width}x{height} image"
        )
    if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
        return [x, y, w, h], False
    x0, y0 = max(x, 0.0), max(y, 0.0)
    w, h = min(x + w, float(width)) - x0, min(y + h, float(height)) - y0
    return ([x0, y0, w, h], True) if w > 0 and h > 0 else (None, False)


def has_segmentation(segmentation: Any) -> bool:
    """An RLE with counts and size, or polygons of which one at least the loader keeps (an even
    number of coordinates, at least three points)."""
    if isinstance(segmentation, dict):
        return bool(segmentation.get("counts")) and "size" in segmentation
    return isinstance(segmentation, list) and any(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation
    )


class _Checker:
    """The state kept while streaming: image sizes, annotation ids, a few counters."""

    def __init__(self, json_file: str, image_root: str, masks: bool) -> None:
        self.json_file, self.image_root, self.masks = json_file, image_root, masks
        self.sizes: dict[Any, tuple[Any, Any]] = {}
        self.annotation_ids: set = set()
        self.first_of_category: dict[Any, Any] = {}  # category id -> first annotation id
        self.categories: list[tuple[Any, Any]] = []
        self.pending: list[tuple[Any, Any, Any]] = []  # boxes seen before the image list ended
        self.images_done = False
        self.counts = dict.fromkeys(LIST_KEYS, 0)
        self.missing, self.first_missing = 0, ""
        self.summary = CocoSummary()

    def _record(self, key: str, record: Any) -> None:
        index = self.counts[key]
        self.counts[key] += 1
        lacking = [k for k in _KEYS[key] if not isinstance(record, dict) or k not in record]
        if lacking:
            raise invalid(self.json_file, f'{key}[{index}] lacks "{lacking[0]}"')

    def image(self, image: Any) -> None:
        self._record("images", image)
        image_id, width, height = image["id"], image["width"], image["height"]
        if image_id in self.sizes:
            raise invalid(self.json_file, f'image id {image_id} appears twice in "images"')
        if not all(type(v) is int and v > 0 for v in (width, height)):
            raise invalid(self.json_file, f"image {image_id} has size {width!r}x{height!r}")
        self.sizes[image_id] = (width, height)
        path = os.path.join(self.image_root, str(image["file_name"]))
        if not os.path.isfile(path):
            self.missing += 1
            self.first_missing = self.first_missing or path
        elif (actual := image_size(path)) != (width, height):
            raise UserError(size_mismatch(path, actual, image))

    def annotation(self, ann: Any) -> None:
        self._record("annotations", ann)
        ann_id, image_id = ann["id"], ann["image_id"]
        if ann_id in self.annotation_ids:
            raise invalid(self.json_file, f'annotation id {ann_id} appears twice in "annotations"')
        self.annotation_ids.add(ann_id)
        self.first_of_category.setdefault(ann["category_id"], ann_id)
        at = where(self.json_file, ann_id, image_id)
        if self.masks and not has_segmentation(ann.get("segmentation")):
            raise UserError(
                f"invalid COCO annotation {at}: no segmentation (missing, empty or under three "
                "points), which Mask R-CNN (MODEL.MASK_ON) needs"
            )
        # COCOeval reads both; missing ones are filled (evaluation.settle_annotations).
        area, crowd = ann.get("area", 0), ann.get("iscrowd", 0)
        if crowd not in (0, 1) or not (isinstance(area, int | float) and 0 <= area < math.inf):
            raise UserError(
                f"invalid COCO annotation {at}: iscrowd must be 0 or 1 and area a number >= 0, "
                f"got iscrowd {crowd!r}, area {area!r} (leave either out to have it filled)"
            )
        self.summary.no_area += "area" not in ann
        self.summary.no_iscrowd += "iscrowd" not in ann
        if self.images_done:
            self.box(ann_id, image_id, ann["bbox"])
        else:
            self.pending.append((ann_id, image_id, ann["bbox"]))

    def box(self, ann_id: Any, image_id: Any, bbox: Any) -> None:
        if image_id not in self.sizes:
            raise invalid(self.json_file, f"annotation {ann_id} names unknown image {image_id}")
        at = where(self.json_file, ann_id, image_id)
        box, clipped = checked_box(bbox, *self.sizes[image_id], at)
        if box is None:
            self.summary.empty += 1
            self.summary.first_empty = self.summary.first_empty or f"{at}: {_box_text(bbox)}"
        else:
            self.summary.objects += 1
            self.summary.clipped += clipped

    def end_of_images(self) -> None:
        self.images_done = True
        for pending in self.pending:
            self.box(*pending)
        self.pending = []

    def category(self, category: Any) -> None:
        self._record("categories", category)
        self.categories.append((category["id"], category["name"]))

    def finish(self, expected_categories: list[tuple[Any, Any]] | None) -> CocoSummary:
        if expected_categories is not None and sorted(self.categories) != expected_categories:
            raise invalid(self.json_file, "its categories are not COCO's 80 (ids and names)")
        known = {category_id for category_id, _ in self.categories}
        for category_id, ann_id in self.first_of_category.items():
            if category_id not in known:
                raise invalid(
                    self.json_file, f"annotation {ann_id} names unknown category {category_id}"
                )
        if self.missing:
            raise UserError(
                f"{self.json_file} names {self.missing} image(s) that do not exist, "
                f"e.g. {self.first_missing}"
            )
        self.summary.images = self.counts["images"]
        self.summary.categories = len(known)
        return self.summary


def check_coco_file(
    json_file: str,
    image_root: str,
    expected_categories: Iterable[tuple[Any, Any]] | None = None,
    masks: bool = False,
) -> CocoSummary:
    """Stream ``json_file`` and check what the loader, Mask R-CNN and COCOEvaluator rely on:
    the three lists, unique ids, every image there and of its size, every annotation's image,
    category, box, iscrowd and area if given, and (``masks``) segmentation, and the
    ``expected_categories`` if given."""
    checker = _Checker(json_file, image_root, masks)
    handlers = {
        "images": checker.image,
        "annotations": checker.annotation,
        "categories": checker.category,
    }
    done = set()
    try:
        with open(json_file, encoding="utf-8") as f:
            for key, item in iter_top_level(f, LIST_KEYS):
                if key not in handlers:
                    continue
                if item is END:
                    done.add(key)
                    if key == "images":
                        checker.end_of_images()
                else:
                    handlers[key](item)
    except (OSError, UnicodeDecodeError, JSONStreamError) as e:
        raise invalid(json_file, str(e)) from None
    for key in LIST_KEYS:
        if key not in done:
            raise invalid(json_file, f'"{key}" is not a list')
    expected = None if expected_categories is None else sorted(expected_categories)
    return checker.finish(expected)


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
    """Check each COCO dataset's files before launch (an empty box is refused in
    ``test_names``); return what each holds. Other datasets are left to their own checks."""
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
        if name in test_names and (summary.no_area or summary.no_iscrowd):
            logger.warning(
                '%s: %d annotations without "area", %d without "iscrowd": evaluation takes '
                "iscrowd 0 and the area of the segmentation, else of the box, as pycocotools "
                "computes a detection's",
                metadata.json_file,
                summary.no_area,
                summary.no_iscrowd,
            )
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
    """detectron2's ``load_coco_json`` with the checks' file and box rules applied."""
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
    """(Re-)register one split with the checking loader and detectron2's COCO metadata
    (``builtin``), or none, the categories then coming from the file."""
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


def register_coco_datasets(datasets: Iterable[Sequence[str]]) -> None:
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
