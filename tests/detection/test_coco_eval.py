"""train_net's COCO evaluation: COCOEvaluator chosen by metadata, box and mask AP with known
values from detections built out of the ground truth, and the metrics_coco.json layout; an
area range without ground truth is null with its reason, no detections score 0."""

import json
import logging

import coco_tiny
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances, polygons_to_bitmask

from moco_d2.detection.data.coco import register_all_coco, register_coco
from moco_d2.detection.evaluation import (
    COCO_METRIC_NAMES,
    COCO_METRICS_FILE,
    COCODetectionEvaluator,
    metrics,
    settle_annotations,
)
from moco_d2.detection.trainer import Trainer


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    coco_tiny.make_synthetic_coco(root, num_train=1, num_val=3)
    register_all_coco(str(root))
    yield root
    register_all_coco()


class GroundTruthDetector(torch.nn.Module):
    """Outputs the ground truth of each image as detections (score 1), optionally with the
    objects smaller than 32² pixels given a wrong class; evaluation is under test."""

    def __init__(self, dataset_name, wrong_class_for_small=False, nothing=False):
        super().__init__()
        self.records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
        self.wrong_class_for_small = wrong_class_for_small
        self.nothing = nothing  # detect nothing at all

    def forward(self, inputs):
        outputs = []
        for x in inputs:
            record = self.records[x["image_id"]]
            h, w = record["height"], record["width"]
            anns = [] if self.nothing else record["annotations"]
            instances = Instances((h, w))
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            instances.scores = torch.ones(len(anns))
            classes = [a["category_id"] for a in anns]
            if self.wrong_class_for_small:
                small = [(b[2] - b[0]) * (b[3] - b[1]) < 32**2 for b in boxes]
                classes = [(c + 1) % 80 if s else c for c, s in zip(classes, small, strict=True)]
            instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
            masks = [polygons_to_bitmask(a["segmentation"], h, w) for a in anns]
            instances.pred_masks = torch.from_numpy(
                np.stack(masks) if masks else np.zeros((0, h, w))
            )
            outputs.append({"instances": instances})
        return outputs


def _cfg(out, mask_on=True, test="coco_2017_val"):
    cfg = get_cfg()
    cfg.merge_from_file("configs/coco_R50_C4_2x.yaml")
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0"]
        + ["MODEL.MASK_ON", str(mask_on), "OUTPUT_DIR", str(out), "DATASETS.TEST", f"('{test}',)"]
    )
    return cfg


def test_perfect_detections_score_100_for_boxes_and_masks(coco_root, tmp_path):
    cfg = _cfg(tmp_path / "out")
    reported = Trainer.test(cfg, GroundTruthDetector("coco_2017_val"))
    written = json.loads((tmp_path / "out" / COCO_METRICS_FILE).read_text())
    full = {name: 100.0 for name in COCO_METRIC_NAMES}
    assert list(written) == ["coco_2017_val"]
    box = written["coco_2017_val"]
    segm = box.pop("segm")
    assert box.pop("undefined") == []
    assert box == pytest.approx(full) and segm == pytest.approx(full)
    for task in ("bbox", "segm"):
        assert {k: reported[task][k] for k in COCO_METRIC_NAMES} == pytest.approx(full)
    # COCOEvaluator also leaves its detections next to the metrics.
    assert (tmp_path / "out" / "inference" / "coco_instances_results.json").is_file()


def test_wrong_class_for_small_objects_zeroes_only_small_ap(coco_root, tmp_path):
    cfg = _cfg(tmp_path / "out")
    Trainer.test(cfg, GroundTruthDetector("coco_2017_val", wrong_class_for_small=True))
    written = json.loads((tmp_path / "out" / COCO_METRICS_FILE).read_text())["coco_2017_val"]
    for block in (written, written["segm"]):
        assert block["APs"] == 0.0
        assert (block["APm"], block["APl"]) == pytest.approx((100.0, 100.0))
        assert 0.0 < block["AP"] < 100.0


def test_box_only_model_writes_no_segm_block(coco_root, tmp_path):
    cfg = _cfg(tmp_path / "out", mask_on=False)
    Trainer.test(cfg, GroundTruthDetector("coco_2017_val"))
    written = json.loads((tmp_path / "out" / COCO_METRICS_FILE).read_text())
    assert list(written) == ["coco_2017_val"]
    assert written["coco_2017_val"] == {
        **{name: pytest.approx(100.0) for name in COCO_METRIC_NAMES},
        "undefined": [],
    }


def test_evaluator_is_chosen_by_metadata_not_name(coco_root, tmp_path):
    register_coco(
        "voc_lookalike",
        str(coco_root / "coco" / "val2017"),
        str(coco_root / "coco" / "annotations" / "instances_val2017.json"),
    )
    try:
        evaluator = Trainer.build_evaluator(_cfg(tmp_path), "voc_lookalike")
        assert isinstance(evaluator, COCODetectionEvaluator)
        assert isinstance(evaluator, COCOEvaluator)
        assert evaluator._tasks == ("bbox", "segm")
    finally:
        DatasetCatalog.remove("voc_lookalike")
        MetadataCatalog.remove("voc_lookalike")


def test_ground_truth_without_area_or_iscrowd_scores_as_with_them(coco_root, tmp_path):
    """A file without ``area`` and ``iscrowd`` (labelme, hand-written) is scored as the same
    file with them: small objects given a wrong class still zero APs alone, so each object
    kept its area range (filled from its polygon, within a few % of the exact shoelace area)."""
    path = coco_root / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    exact = [a.pop("area") for a in data["annotations"]]
    for ann in data["annotations"]:
        del ann["iscrowd"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    register_coco("coco_bare", str(coco_root / "coco" / "val2017"), str(bare))
    try:
        written = {}
        for name in ("coco_2017_val", "coco_bare"):
            cfg = _cfg(tmp_path / name, test=name)
            Trainer.test(cfg, GroundTruthDetector(name, wrong_class_for_small=True))
            written[name] = json.loads((tmp_path / name / COCO_METRICS_FILE).read_text())[name]
        assert written["coco_bare"] == written["coco_2017_val"]
        assert written["coco_bare"]["APs"] == 0.0
        assert written["coco_bare"]["APl"] == pytest.approx(100)
        anns = COCODetectionEvaluator("coco_bare", output_dir=str(tmp_path))._coco_api.anns
        assert [anns[i]["area"] for i in sorted(anns)] == pytest.approx(exact, rel=0.05)
        assert {a["iscrowd"] for a in anns.values()} == {0}
    finally:
        DatasetCatalog.remove("coco_bare")
        MetadataCatalog.remove("coco_bare")


def test_filled_area_is_the_kept_polygons_else_the_boxs_and_given_values_stay():
    from pycocotools.coco import COCO

    square = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]  # 20 x 20
    annotations = [
        {"bbox": [0, 0, 4, 5]},
        {"bbox": [0, 0, 4, 5], "segmentation": [[1.0, 2.0]]},  # two points: the loader drops it
        {"bbox": [10, 10, 20, 20], "segmentation": [[1.0], square]},
        {"bbox": [0, 0, 4, 5], "area": 7.5, "iscrowd": 1},
    ]
    api = COCO()
    api.dataset = {
        "images": [{"id": 1, "height": 64, "width": 64}],
        "annotations": [
            {**ann, "id": i, "image_id": 1, "category_id": 1} for i, ann in enumerate(annotations)
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    api.createIndex()
    settle_annotations(api)
    found = [(a["area"], a["iscrowd"]) for a in api.dataset["annotations"]]
    assert found == [(20.0, 0), (20.0, 0), (400.0, 0), (7.5, 1)]


@pytest.fixture(scope="module")
def coco_without_large(coco_root):
    """coco_2017_val without its objects in COCO's large area range (above 96² pixels)."""
    path = coco_root / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    large = [a for a in data["annotations"] if a["area"] > 96**2]
    assert large, "the synthetic set has a large object per image"
    data["annotations"] = [a for a in data["annotations"] if a["area"] <= 96**2]
    filtered = coco_root / "instances_val2017_no_large.json"
    filtered.write_text(json.dumps(data))
    register_coco("coco_no_large", str(coco_root / "coco" / "val2017"), str(filtered))
    yield "coco_no_large"
    DatasetCatalog.remove("coco_no_large")
    MetadataCatalog.remove("coco_no_large")


def test_area_range_without_ground_truth_is_null_with_the_reason(
    coco_without_large, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="moco_d2"):
        Trainer.test(_cfg(tmp_path, test=coco_without_large), GroundTruthDetector("coco_no_large"))
    written = json.loads((tmp_path / COCO_METRICS_FILE).read_text())["coco_no_large"]
    defined = {name: pytest.approx(100.0) for name in COCO_METRIC_NAMES if name != "APl"}
    assert written["segm"] == {**defined, "APl": None}
    reason = "no ground-truth objects in this area range (large)"
    assert written.pop("undefined") == [
        {"metric": "APl", "task": task, "reason": reason} for task in ("bbox", "segm")
    ]
    written.pop("segm")
    assert written == {**defined, "APl": None}
    path = tmp_path / COCO_METRICS_FILE
    assert f"coco_no_large: bbox, segm APl undefined, null in {path}: {reason}" in caplog.text


@pytest.mark.parametrize("dataset", ["coco_2017_val", "coco_no_large"])
def test_no_detections_score_zero_where_there_is_ground_truth(
    coco_without_large, tmp_path, dataset
):
    Trainer.test(_cfg(tmp_path, test=dataset), GroundTruthDetector(dataset, nothing=True))
    written = json.loads((tmp_path / COCO_METRICS_FILE).read_text())[dataset]
    undefined = {"APl"} if dataset == "coco_no_large" else set()
    expected = {name: None if name in undefined else 0.0 for name in COCO_METRIC_NAMES}
    assert written.pop("segm") == expected
    assert [(u["task"], u["metric"]) for u in written.pop("undefined")] == [
        (task, name) for task in ("bbox", "segm") for name in sorted(undefined)
    ]
    assert written == expected


TASKS = ("bbox", "segm")


def test_missing_task_or_undefined_ap_stops_with_the_dataset_named():
    values = {name: 50.0 for name in COCO_METRIC_NAMES}
    with pytest.raises(RuntimeError, match="coco_2017_val: the evaluator returned no segm"):
        metrics({"coco_2017_val": {"bbox": values}}, "coco", TASKS)
    # A NaN is an error unless the evaluator said the metric has no ground truth.
    results = {"coco_2017_val": {"bbox": values, "segm": {**values, "APs": float("nan")}}}
    with pytest.raises(RuntimeError, match="coco_2017_val: segm APs not finite although"):
        metrics(results, "coco", TASKS)
    bbox_aps = [{"metric": "APs", "task": "bbox", "reason": "none small"}]
    with pytest.raises(RuntimeError, match="coco_2017_val: segm APs not finite although"):
        metrics(results, "coco", TASKS, {"coco_2017_val": bbox_aps})
    segm_aps = [{"metric": "APs", "task": "segm", "reason": "none small"}]
    found = metrics(results, "coco", TASKS, {"coco_2017_val": segm_aps})["coco_2017_val"]
    assert found["segm"]["APs"] is None and found["APs"] == 50.0
    assert found["undefined"] == segm_aps
