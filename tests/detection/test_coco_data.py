"""COCO 2017 registration under $DETECTRON2_DATASETS, the synthetic generator, and the checks
that turn a bad COCO tree into one line naming the path."""

import argparse
import io
import json
import os
import subprocess
import sys
import tracemalloc

import coco_tiny
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import BoxMode
from PIL import Image

from moco_d2.detection.data import coco
from moco_d2.detection.data.coco import (
    SPLITS,
    check_coco_datasets,
    coco_categories,
    register_all_coco,
    register_coco,
)
from moco_d2.detection.data.synthetic_coco import polygon_area, write_sized_annotations
from moco_d2.detection.preflight import check_datasets
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


def _edit(root, split, edit):
    """Apply ``edit`` to the parsed annotation file of ``split`` and write it back."""
    path = _json(root, split)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _set_box(index, bbox):
    def edit(data):
        data["annotations"][index]["bbox"] = bbox

    return edit


def test_inverted_box_is_refused_by_the_check_and_the_loader(coco_root):
    # The case that took box AP from 100 to 72.1 when it was accepted.
    path = _edit(coco_root, "val", _set_box(1, [50.0, 20.0, -30.0, 40.0]))
    says = f"invalid COCO annotation {path}, annotation 2 \\(image 1\\): bbox \\[50, 20, -30, 40\\]"
    with pytest.raises(UserError, match=f"{says} is inverted"):
        check_coco_datasets(["coco_2017_val"])
    with pytest.raises(UserError, match=f"{says} is inverted"):
        DatasetCatalog.get("coco_2017_val")


def test_box_far_outside_is_refused_and_on_the_border_is_clipped(coco_root, caplog):
    # Image 1 is 192 x 192; like VOC, up to a pixel over the border is clipped and counted.
    path = _edit(coco_root, "val", _set_box(0, [-0.5, 10.0, 192.0, 20.0]))
    (summary,) = check_coco_datasets(["coco_2017_val"]).values()
    assert (summary.images, summary.objects, summary.clipped, summary.empty) == (2, 6, 1, 0)
    with caplog.at_level("INFO"):
        dicts = DatasetCatalog.get("coco_2017_val")
    assert dicts[0]["annotations"][0]["bbox"] == [0.0, 10.0, 191.5, 20.0]
    assert "0 empty boxes (zero width or height) dropped, 1 boxes touching or crossing" in (
        caplog.text
    )
    assert "id" not in dicts[0]["annotations"][0]  # kept only for the messages
    _edit(coco_root, "val", _set_box(0, [100.0, 10.0, 93.5, 20.0]))
    says = f"{path}, annotation 1 \\(image 1\\): bbox .* lies more than 1 pixel outside"
    with pytest.raises(UserError, match=says):
        check_coco_datasets(["coco_2017_val"])
    with pytest.raises(UserError, match=says):
        DatasetCatalog.get("coco_2017_val")


def test_empty_box_is_dropped_in_training_and_refused_in_a_test_set(coco_root, caplog):
    # instances_train2017.json itself holds two zero-height boxes, e.g. annotation 918.
    _edit(coco_root, "train", _set_box(3, [20.0, 30.0, 1.03, 0.0]))
    summary = check_coco_datasets(NAMES, test_names=["coco_2017_val"])["coco_2017_train"]
    assert (summary.objects, summary.empty) == (8, 1)
    with caplog.at_level("INFO"):
        dicts = DatasetCatalog.get("coco_2017_train")
    assert [len(d["annotations"]) for d in dicts] == [3, 2, 3]
    assert "1 empty boxes (zero width or height) dropped" in caplog.text
    path = _edit(coco_root, "val", _set_box(4, [20.0, 30.0, 0.0, 5.0]))
    with pytest.raises(UserError) as e:
        check_coco_datasets(NAMES, test_names=["coco_2017_val"])
    assert str(e.value) == (
        f"invalid COCO annotation {path}, annotation 5 (image 2): bbox [20, 30, 0, 5] is empty "
        "(zero width or height): test set 'coco_2017_val' would keep it as ground truth that no "
        "detection can match (1 such box(es); training sets drop them)"
    )


@pytest.mark.parametrize(
    "segmentation", [None, [], [[]], {}, [[10.0, 20.0, 30.0, 40.0]], {"counts": "PPYo0"}]
)
def test_mask_task_refuses_a_missing_or_empty_segmentation(coco_root, segmentation):
    """Also two points (a polygon the loader drops) and an RLE without its size."""

    def edit(data):
        if segmentation is None:
            del data["annotations"][2]["segmentation"]
        else:
            data["annotations"][2]["segmentation"] = segmentation

    path = _edit(coco_root, "train", edit)
    check_coco_datasets(NAMES)  # boxes only: fine
    with pytest.raises(UserError) as e:
        check_coco_datasets(NAMES, masks=True)
    assert str(e.value) == (
        f"invalid COCO annotation {path}, annotation 3 (image 1): no segmentation (missing, "
        "empty or under three points), which Mask R-CNN (MODEL.MASK_ON) needs"
    )


def test_missing_area_and_iscrowd_of_a_test_set_are_said_once_before_launch(coco_root, caplog):
    """COCOeval reads both (labelme exports and hand-written files leave them out); the
    evaluator fills them (test_coco_eval.py), the check says so; a training set is not told."""

    def strip(data):
        for ann in data["annotations"][:2]:
            del ann["area"]
        for ann in data["annotations"][1:]:
            del ann["iscrowd"]

    _edit(coco_root, "train", strip)
    path = _edit(coco_root, "val", strip)
    with caplog.at_level("INFO"):
        summaries = check_coco_datasets(NAMES, test_names=["coco_2017_val"])
    assert (summaries["coco_2017_val"].no_area, summaries["coco_2017_val"].no_iscrowd) == (2, 5)
    assert [r.getMessage() for r in caplog.records if "iscrowd" in r.getMessage()] == [
        f'{path}: 2 annotations without "area", 5 without "iscrowd": evaluation takes iscrowd 0 '
        "and the area of the segmentation, else of the box, as pycocotools computes a detection's"
    ]


@pytest.mark.parametrize("field, value", [("iscrowd", 2), ("area", "12"), ("area", -1.0)])
def test_unusable_area_or_iscrowd_is_refused(coco_root, field, value):
    path = _edit(coco_root, "val", lambda d: d["annotations"][3].update({field: value}))
    with pytest.raises(UserError) as e:
        check_coco_datasets(["coco_2017_val"])
    assert str(e.value).startswith(
        f"invalid COCO annotation {path}, annotation 4 (image 2): iscrowd must be 0 or 1 and "
        f"area a number >= 0, got iscrowd "
    )
    assert f"{field} {value!r}" in str(e.value)


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda d: d["images"][1].update(id=1), 'image id 1 appears twice in "images"'),
        (lambda d: d["annotations"][1].update(id=1), "annotation id 1 appears twice"),
        (
            lambda d: d["annotations"][5].update(category_id=12),  # not one of COCO's ids
            "annotation 6 names unknown category 12",
        ),
        (lambda d: d["images"][0].update(width=0), "image 1 has size 0x192"),
    ],
)
def test_duplicate_ids_unknown_categories_and_bad_sizes_name_the_file(coco_root, edit, why):
    path = _edit(coco_root, "val", edit)
    with pytest.raises(UserError, match=f"not a valid COCO instances file {path}: {why}"):
        check_coco_datasets(["coco_2017_val"])


def test_the_check_reads_annotations_listed_before_images(coco_root):
    path = _json(coco_root, "val")
    data = json.loads(path.read_text())
    reordered = {k: data[k] for k in ("categories", "annotations", "images")}
    path.write_text(json.dumps(reordered))
    (summary,) = check_coco_datasets(["coco_2017_val"]).values()
    assert (summary.images, summary.objects) == (2, 6)
    reordered["annotations"][4]["image_id"] = 7
    path.write_text(json.dumps(reordered))
    with pytest.raises(UserError, match=f"{path}: annotation 5 names unknown image 7"):
        check_coco_datasets(["coco_2017_val"])


def test_mask_r_cnn_without_a_segmentation_stops_before_launch(tmp_path):
    # Was KeyError: 'segmentation' once Mask R-CNN trained.
    coco_tiny.make_synthetic_coco(tmp_path, num_train=2, num_val=1)
    path = _edit(tmp_path, "train", lambda d: d["annotations"][4].pop("segmentation"))
    out = tmp_path / "out"
    result = _train_net(tmp_path, "OUTPUT_DIR", str(out))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: invalid COCO annotation {path}, annotation 5 (image 2): no segmentation "
        "(missing, empty or under three points), which Mask R-CNN (MODEL.MASK_ON) needs"
    ]
    assert not out.exists()


def _stream(text, monkeypatch, chunk):
    monkeypatch.setattr(coco, "CHUNK", chunk)
    return list(coco.iter_top_level(io.StringIO(text), ("a", "b")))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 22])
def test_streamed_elements_equal_json_load_at_any_buffer_size(monkeypatch, chunk):
    # Numbers, strings and nested values cut at every buffer boundary decode whole.
    value = {
        "info": {"x": [1.5, "a,]}"], "y": None},
        "a": [12345, {"s": 'é\\"}', "n": [[1, 2], []]}, -0.25e3, "x y", True],
        "b": [],
        "z": 987654321,
    }
    text = json.dumps(value, indent=1)
    items = _stream(text, monkeypatch, chunk)
    end = coco.END
    assert items == [
        ("info", value["info"]),
        *[("a", element) for element in value["a"]],
        ("a", end),
        ("b", end),
        ("z", value["z"]),
    ]


@pytest.mark.parametrize(
    "text, says",
    [
        ('{"a": [1, 2', "Expecting ',' delimiter at char 11"),
        ('{"a": [1 2]}', "Expecting ',' delimiter at char 9"),
        ('{"a": 3}', '"a" is not a list'),
        ('{"a": []} x', "Extra data at char 10"),
        ("", "the file is empty"),
    ],
)
def test_stream_errors_give_the_offset(monkeypatch, text, says):
    with pytest.raises(coco.JSONStreamError, match=f"^{says}$"):
        _stream(text, monkeypatch, 4)


def test_the_pre_launch_check_does_not_hold_the_parsed_file(tmp_path):
    # json.load's peak is what the launcher held before the check streamed the file.
    json_file, image_root = str(tmp_path / "a.json"), str(tmp_path / "images")
    write_sized_annotations(json_file, image_root, num_images=500, num_annotations=20000)
    cfg = get_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, cfg.MODEL.MASK_ON = ("coco_sized",), (), True
    register_coco("coco_sized", image_root, json_file)
    try:
        tracemalloc.start()
        with open(json_file) as f:
            json.load(f)
        parsed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        check_datasets(cfg, argparse.Namespace(eval_only=False))
        checked = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        DatasetCatalog.remove("coco_sized")
        MetadataCatalog.remove("coco_sized")
    assert os.path.getsize(json_file) > 8e6
    assert checked < parsed / 4, (checked, parsed)
