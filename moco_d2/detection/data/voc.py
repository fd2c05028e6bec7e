"""Pascal VOC in Detectron2's format, with errors that name the missing or broken file.

Detectron2's own loader fails deep inside numpy or ElementTree on a missing split file,
annotation or image; this one raises :class:`UserError` with the path, keeps each object's
``difficult`` flag (difficult objects are trained on, as in Detectron2; the evaluator
ignores them) and is registered under Detectron2's names, replacing the builtin entries.
"""

import os
import xml.etree.ElementTree as ET

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from moco_d2.errors import UserError

CLASS_NAMES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# name -> (folder under the datasets root, split, year); the splits the protocol uses.
SPLITS = {
    "voc_2007_trainval": ("VOC2007", "trainval", 2007),
    "voc_2012_trainval": ("VOC2012", "trainval", 2012),
    "voc_2007_test": ("VOC2007", "test", 2007),
}

_ROOT_HINT = (
    "set DETECTRON2_DATASETS to the folder holding VOC2007/ and VOC2012/ (datasets/README.md)"
)


def datasets_root():
    """Detectron2's convention: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def split_file(dirname, split):
    return os.path.join(dirname, "ImageSets", "Main", split + ".txt")


def annotation_file(dirname, fileid):
    return os.path.join(dirname, "Annotations", fileid + ".xml")


def image_file(dirname, fileid):
    return os.path.join(dirname, "JPEGImages", fileid + ".jpg")


def read_split(dirname, split):
    """The image ids listed in ``ImageSets/Main/<split>.txt``."""
    if not os.path.isdir(dirname):
        raise UserError(f"VOC folder not found: {dirname}; {_ROOT_HINT}")
    path = split_file(dirname, split)
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"VOC split file not found: {path}") from None


def check_split_files(dataset_names):
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


def parse_annotation(path, class_names):
    """Image size and objects of one VOC XML file, boxes in Detectron2's XYXY_ABS convention."""
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
    objects = []
    for obj in root.findall("object"):
        name = _text(obj, "name", path)
        if name not in class_names:
            raise UserError(f"malformed VOC annotation {path}: unknown class {name!r}")
        box = obj.find("bndbox")
        if box is None:
            raise UserError(f"malformed VOC annotation {path}: <object> without <bndbox>")
        x0, y0, x1, y1 = (_number(box, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = obj.find("difficult")
        objects.append(
            {
                "category_id": class_names.index(name),
                # VOC boxes are 1-based inclusive pixel indices: (1, W) spans the image, (0, W).
                "bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
                "bbox_mode": BoxMode.XYXY_ABS,
                "difficult": int(difficult.text) if difficult is not None and difficult.text else 0,
            }
        )
    record["annotations"] = objects
    return record


def load_voc_instances(dirname, split, class_names=CLASS_NAMES):
    """Detectron2 dataset dicts for one VOC split; :class:`UserError` names any bad path."""
    class_names = list(class_names)
    dicts = []
    for fileid in read_split(dirname, split):
        record = parse_annotation(annotation_file(dirname, fileid), class_names)
        jpeg = image_file(dirname, fileid)
        if not os.path.isfile(jpeg):
            raise UserError(f"VOC image not found: {jpeg}")
        dicts.append({"file_name": jpeg, "image_id": fileid, **record})
    return dicts


def register_voc(name, dirname, split, year, class_names=CLASS_NAMES):
    """(Re-)register one split: an existing entry of that name is replaced, on any d2 version."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)  # metadata refuses to change a value once set
    DatasetCatalog.register(name, lambda: load_voc_instances(dirname, split, class_names))
    MetadataCatalog.get(name).set(
        thing_classes=list(class_names),
        dirname=dirname,
        year=year,
        split=split,
        evaluator_type="pascal_voc",
    )


def register_all_voc(root=None):
    """Register the protocol's VOC splits under ``root`` (default :func:`datasets_root`)."""
    root = datasets_root() if root is None else root
    for name, (folder, split, year) in SPLITS.items():
        register_voc(name, os.path.join(root, folder), split, year)


register_all_voc()
