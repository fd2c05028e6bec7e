"""Pascal VOC in Detectron2's format, registered under Detectron2's names, with errors that name
the missing or broken file where Detectron2's loader fails deep inside numpy or ElementTree.

Boxes are validated, because a bad box silently corrupts AP (as test ground truth it can never
be matched; in training Detectron2 drops it without a word): an empty or inverted box, one
reaching more than a pixel outside the image and an empty split are errors; a box crossing the
border by up to a pixel is clipped, as VOC practice does. This parser is also the evaluator's
ground truth, so an annotation either fails here, before training, or is scored as read here.
Coordinates are used as written (the devkit does not round); ``<pose>`` and ``<truncated>`` are
optional; ``<difficult>`` is 0/1, yes/no or true/false, missing meaning 0.
"""

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from moco_d2.errors import UserError

logger = logging.getLogger(__name__)

CLASS_NAMES = tuple(
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor".split()
)

# name -> (folder under the datasets root, split, year); the splits the protocol uses.
SPLITS = {
    "voc_2007_trainval": ("VOC2007", "trainval", 2007),
    "voc_2012_trainval": ("VOC2012", "trainval", 2012),
    "voc_2007_test": ("VOC2007", "test", 2007),
}

BORDER_TOLERANCE = 1.0  # pixels a box may reach outside the image and still be clipped
_ROOT_HINT = (
    "set DETECTRON2_DATASETS to the folder holding VOC2007/ and VOC2012/ (datasets/README.md)"
)


def datasets_root() -> str:
    """Detectron2's convention: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def split_file(dirname: str, split: str) -> str:
    return os.path.join(dirname, "ImageSets", "Main", split + ".txt")


def annotation_file(dirname: str, fileid: str) -> str:
    return os.path.join(dirname, "Annotations", fileid + ".xml")


def image_file(dirname: str, fileid: str) -> str:
    return os.path.join(dirname, "JPEGImages", fileid + ".jpg")


def read_split(dirname: str, split: str) -> list[str]:
    """The image ids listed in ``ImageSets/Main/<split>.txt``."""
    if not os.path.isdir(dirname):
        raise UserError(f"VOC folder not found: {dirname}; {_ROOT_HINT}")
    path = split_file(dirname, split)
    try:
        with open(path) as f:
            fileids = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"VOC split file not found: {path}") from None
    if not fileids:
        raise UserError(f"VOC split file {path} lists no images (an empty split)")
    return fileids


def check_split_files(dataset_names: Iterable[str]) -> None:
    """Fail early, before any training starts, if a VOC dataset's folder or split file is missing.

    Non-VOC datasets (no ``split`` in their metadata) are left to their own loaders.
    """
    for name in dataset_names:
        metadata = MetadataCatalog.get(name)
        if metadata.get("evaluator_type") == "pascal_voc":
            read_split(metadata.dirname, metadata.split)


def _text(node, tag, path):
    child = node.find(tag)
    if child is None or child.text is None:
        raise UserError(f"malformed VOC annotation {path}: missing <{tag}>")
    return child.text.strip()


def _number(node, tag, path, kind=float):
    text = _text(node, tag, path)
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError:
        raise UserError(f"malformed VOC annotation {path}: <{tag}> is {text!r}") from None


# <difficult> spellings that annotation tools write; anything else is refused.
_DIFFICULT = {"0": 0, "1": 1, "no": 0, "yes": 1, "false": 0, "true": 1}


def _difficult(obj, where):
    node = obj.find("difficult")
    text = (node.text or "").strip() if node is not None else ""
    if not text:
        return 0
    try:
        return _DIFFICULT[text.lower()]
    except KeyError:
        raise UserError(
            f"malformed VOC annotation {where}: <difficult> is {text!r} "
            "(expected 0 or 1; yes/no and true/false are read too)"
        ) from None


def _checked_box(box, width, height, where):
    """VOC's 1-based inclusive box as 0-based XYXY, clipped; ``(box, clipped?)``."""
    x0, y0, x1, y1 = box
    if x0 >= x1 or y0 >= y1:
        raise UserError(
            f"invalid VOC annotation {where}: xmin {x0:g}, ymin {y0:g}, xmax {x1:g}, "
            f"ymax {y1:g} is empty or inverted (needs xmin < xmax and ymin < ymax)"
        )
    # (1, W) spans the whole image: 0-based (0, W).
    x0, y0 = x0 - 1.0, y0 - 1.0
    t = BORDER_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise UserError(
            f"invalid VOC annotation {where}: box xmin {x0 + 1:g}, ymin {y0 + 1:g}, "
            f"xmax {x1:g}, ymax {y1:g} lies more than {t:g} pixel outside the "
            f"{width}x{height} image"
        )
    clipped = [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]
    return clipped, clipped != [x0, y0, x1, y1]


def parse_annotation(path: str, class_names: Sequence[str]) -> tuple[dict, int]:
    """Image size and objects of one VOC XML file, boxes in Detectron2's XYXY_ABS convention,
    and how many boxes were clipped to the image."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise UserError(f"VOC annotation not found: {path}") from None
    except ET.ParseError as e:
        raise UserError(f"malformed VOC annotation {path}: {e}") from None
    size = root.find("size")
    if size is None:
        raise UserError(f"malformed VOC annotation {path}: missing <size>")
    record = {
        "height": _number(size, "height", path, int),
        "width": _number(size, "width", path, int),
    }
    if record["height"] < 1 or record["width"] < 1:
        raise UserError(
            f"invalid VOC annotation {path}: image size {record['width']}x{record['height']}"
        )
    objects, clipped = [], 0
    for index, obj in enumerate(root.findall("object"), start=1):
        name = _text(obj, "name", path)
        if name not in class_names:
            raise UserError(f"malformed VOC annotation {path}: unknown class {name!r}")
        box = obj.find("bndbox")
        if box is None:
            raise UserError(f"malformed VOC annotation {path}: <object> without <bndbox>")
        where = f"{path}, object {index} ({name})"
        bbox, was_clipped = _checked_box(
            [_number(box, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")],
            record["width"],
            record["height"],
            where,
        )
        clipped += was_clipped
        objects.append(
            {
                "category_id": class_names.index(name),
                "bbox": bbox,
                "bbox_mode": BoxMode.XYXY_ABS,
                "difficult": _difficult(obj, where),
            }
        )
    record["annotations"] = objects
    return record, clipped


def load_voc_instances(
    dirname: str, split: str, class_names: Sequence[str] = CLASS_NAMES
) -> list[dict]:
    """Detectron2 dataset dicts for one VOC split; :class:`UserError` names any bad path."""
    class_names = list(class_names)
    dicts, clipped = [], 0
    for fileid in read_split(dirname, split):
        record, n = parse_annotation(annotation_file(dirname, fileid), class_names)
        clipped += n
        jpeg = image_file(dirname, fileid)
        if not os.path.isfile(jpeg):
            raise UserError(f"VOC image not found: {jpeg}")
        dicts.append({"file_name": jpeg, "image_id": fileid, **record})
    if clipped:
        logger.info(
            "%s %s: %d boxes touching or crossing the image border clipped to it",
            dirname,
            split,
            clipped,
        )
    return dicts


def register_replacing(name: str, load: Callable[[], list[dict]], **metadata: Any) -> None:
    """Register ``load`` and ``metadata`` as ``name``, replacing an earlier registration:
    tests and ``$DETECTRON2_DATASETS`` changes re-point the protocol's names at other trees,
    and Detectron2's catalogs refuse to overwrite an entry or change a metadata value."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(**metadata)


def register_voc(
    name: str, dirname: str, split: str, year: int, class_names: Sequence[str] = CLASS_NAMES
) -> None:
    """(Re-)register one split: an existing entry of that name is replaced, on any d2 version."""
    register_replacing(
        name,
        lambda: load_voc_instances(dirname, split, class_names),
        thing_classes=list(class_names),
        dirname=dirname,
        year=year,
        split=split,
        evaluator_type="pascal_voc",
    )


def register_all_voc(root: str | None = None) -> None:
    """Register the protocol's VOC splits under ``root`` (default :func:`datasets_root`)."""
    root = datasets_root() if root is None else root
    for name, (folder, split, year) in SPLITS.items():
        register_voc(name, os.path.join(root, folder), split, year)


register_all_voc()
