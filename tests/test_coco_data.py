"""COCO 2017 registration under $DETECTRON2_DATASETS, the synthetic generator, and the checks
that turn a bad COCO tree into one line naming the path."""

import json
import os
import subprocess
import sys

import coco_tiny
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import BoxMode
from PIL import Image

from moco_d2.detection.data.coco import (
    SPLITS,
    check_coco_datasets,
    coco_categories,
    register_all_coco,
)
from moco_d2.detection.data.synthetic_coco import polygon_area
from moco_d2.errors import UserError

NAMES = tuple(SPLITS)


@pytest.fixture
def coco_root(tmp_path):
    """A fresh synthetic tree registered under the protocol's names, then the default again."""
    coco_tiny.make_synthetic_coco(tmp_path, num_train=3, num_val=2)
    register_all_coco(str(tmp_path))
    yield tmp_path
    register_all_coco()


def _json(root, split):
    return root / "coco" / "annotations" / f"instances_{split}2017.json"


def test_registered_paths_follow_detectron2_datasets(tmp_path):
    script = (
        "import moco_d2.detection\n"
        "from detectron2.data import MetadataCatalog\n"
        "m = MetadataCatalog.get('coco_2017_val')\n"
        "print(m.json_file, m.image_root, m.evaluator_type, len(m.thing_classes))\n"
    )
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [
        str(_json(tmp_path, "val")),
        str(tmp_path / "coco" / "val2017"),
        "coco",
        "80",
    ]


def test_categories_are_cocos_80_things():
    things = [c for c in COCO_CATEGORIES if c["isthing"]]
    assert len(coco_categories()) == 80
    assert coco_categories() == [{"id": c["id"], "name": c["name"]} for c in things]
    assert coco_categories()[0] == {"id": 1, "name": "person"}
    assert coco_categories()[-1] == {"id": 90, "name": "toothbrush"}


def test_polygon_area_is_the_shoelace_area():
    assert polygon_area([0, 0, 4, 0, 4, 3, 0, 3]) == 12
    assert polygon_area([0, 0, 4, 0, 0, 3]) == 6


def test_synthetic_tree_loads_with_cocos_metadata(coco_root):
    check_coco_datasets(NAMES)
    dicts = DatasetCatalog.get("coco_2017_val")
    assert len(dicts) == 2
    meta = MetadataCatalog.get("coco_2017_val")
    data = json.loads(_json(coco_root, "val").read_text())
    for record, image in zip(dicts, data["images"], strict=True):
        assert record["file_name"] == str(coco_root / "coco" / "val2017" / image["file_name"])
        assert Image.open(record["file_name"]).size == (image["width"], image["height"])
        areas = sorted(polygon_area(a["segmentation"][0]) for a in record["annotations"])
        # One object in each of COCO's area ranges, so APs, APm and APl are all defined.
        assert areas[0] < 32**2 < areas[1] < 96**2 < areas[2]
        for ann in record["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            xs, ys = ann["segmentation"][0][0::2], ann["segmentation"][0][1::2]
            assert ann["bbox"] == pytest.approx(
                [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            )
            # load_coco_json maps COCO ids (1, 3, 18) to contiguous ones (0, 2, 16).
            assert meta.thing_classes[ann["category_id"]] in ("person", "car", "dog")


def test_missing_annotation_file_names_it(coco_root):
    _json(coco_root, "train").unlink()
    with pytest.raises(UserError) as e:
        check_coco_datasets(NAMES)
    assert str(e.value).startswith(f"COCO annotation file not found: {_json(coco_root, 'train')};")


def test_missing_image_folder_names_it(coco_root):
    folder = coco_root / "coco" / "train2017"
    os.rename(folder, coco_root / "elsewhere")
    with pytest.raises(UserError, match=f"COCO image folder not found: {folder};"):
        check_coco_datasets(NAMES)


@pytest.mark.parametrize(
    "content, why",
    [
        ("{not json", "Expecting property name"),
        ("[]", "the top level is not an object"),
        ('{"images": [], "annotations": []}', '"categories" is not a list'),
        (
            '{"images": [{"id": 1}], "annotations": [], "categories": []}',
            'images\\[0\\] lacks "file_name"',
        ),
    ],
)
def test_annotation_file_that_is_not_coco_names_it(coco_root, content, why):
    path = _json(coco_root, "val")
    path.write_text(content)
    with pytest.raises(UserError, match=f"not a valid COCO instances file {path}: {why}"):
        check_coco_datasets(["coco_2017_val"])
    with pytest.raises(UserError, match=f"not a valid COCO instances file {path}"):
        DatasetCatalog.get("coco_2017_val")


def test_other_categories_or_dangling_ids_name_the_file(coco_root):
    path = _json(coco_root, "val")
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:3]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="its categories are not COCO's 80"):
        check_coco_datasets(["coco_2017_val"])
    data = json.loads(path.read_text())
    data["categories"] = coco_categories()
    data["annotations"][0]["image_id"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"{path}: annotation 1 names unknown image 999"):
        check_coco_datasets(["coco_2017_val"])


def test_annotation_file_naming_missing_images_names_both(coco_root):
    missing = coco_root / "coco" / "val2017" / "000000000002.jpg"
    missing.unlink()
    path = _json(coco_root, "val")
    with pytest.raises(UserError) as e:
        check_coco_datasets(["coco_2017_val"])
    assert str(e.value) == f"{path} names 1 image(s) that do not exist, e.g. {missing}"
    with pytest.raises(UserError, match=f"{path} names an image that does not exist: {missing}"):
        DatasetCatalog.get("coco_2017_val")


def test_non_coco_datasets_are_left_alone():
    check_coco_datasets(["voc_2007_test"])  # VOC's own check covers it


def _train_net(root, *opts, flags=()):
    env = {**os.environ, "DETECTRON2_DATASETS": str(root)}
    return subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", "configs/coco_R50_C4_2x.yaml"]
        + [*flags, "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_train_net_on_a_missing_tree_is_one_line_before_launch(tmp_path):
    out = tmp_path / "out"
    result = _train_net(tmp_path / "none", "OUTPUT_DIR", str(out))
    assert result.returncode == 2
    json_file = tmp_path / "none" / "coco" / "annotations" / "instances_train2017.json"
    assert result.stderr.strip().splitlines() == [
        f"error: COCO annotation file not found: {json_file}; set DETECTRON2_DATASETS to the "
        "folder holding coco/ (datasets/README.md)"
    ]
    assert not out.exists()


def test_train_net_on_a_broken_annotation_file_is_one_line(tmp_path):
    coco_tiny.make_synthetic_coco(tmp_path, num_train=1, num_val=1)
    _json(tmp_path, "val").write_text("{")
    result = _train_net(tmp_path, flags=["--eval-only"])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: not a valid COCO instances file {_json(tmp_path, 'val')}: ")
    assert "Traceback" not in result.stderr
