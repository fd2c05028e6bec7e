"""train_net's VOC evaluation: on a hand-made case it reports what an independent VOC07
11-point computation gives (and Detectron2's evaluator, up to the classes it averages over),
difficult objects ignored; it scores whatever the loader accepted; a class without ground
truth is null with its reason, and no detections at all score 0."""

import json
import logging

import numpy as np
import pytest
import torch

import moco_d2.detection  # noqa: F401  (compat shims and registrations must precede detectron2)

# isort: split
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, Instances
from PIL import Image

from moco_d2.detection.data.voc import CLASS_NAMES, register_all_voc, register_voc
from moco_d2.detection.evaluation import (
    METRICS_FILE,
    VOCDetectionEvaluator,
    voc_records,
    write_metrics,
)
from moco_d2.detection.trainer import Trainer
from moco_d2.errors import UserError

CAT, DOG = CLASS_NAMES.index("cat"), CLASS_NAMES.index("dog")
# Ground truth as written in the XML files (1-based, inclusive): (class, box, difficult).
GROUND_TRUTH = {
    "000001": [(CAT, (10, 10, 40, 40), 0), (DOG, (5, 5, 60, 60), 0)],
    "000002": [(CAT, (20, 20, 50, 50), 0)],
    "000003": [(CAT, (1, 1, 30, 30), 1), (DOG, (30, 30, 60, 60), 0)],
}
# Model outputs (0-based XYXY_ABS, as Detectron2 predicts): (class, score, box).
DETECTIONS = {
    "000003": [
        (CAT, 0.95, (35, 5, 60, 25)),  # false positive
        (CAT, 0.70, (0, 0, 30, 30)),  # on the difficult cat: neither TP nor FP
        (DOG, 0.50, (29, 29, 60, 60)),
    ],  # exact
    "000001": [
        (CAT, 0.90, (9, 9, 40, 40)),  # exact
        (DOG, 0.60, (4, 4, 60, 60)),  # exact
        (DOG, 0.40, (4, 4, 60, 60)),
    ],  # duplicate: false positive
    "000002": [(CAT, 0.80, (27, 19, 57, 50))],  # IoU 0.605: TP at .50, FP at .75
}


def object_xml(cls, box, difficult):
    """One <object> as the VOC release writes it."""
    return (
        f"<object><name>{CLASS_NAMES[cls]}</name><pose>Left</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
        f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
    )


def write_tree(root, ground_truth=GROUND_TRUTH, object_xml=object_xml):
    d = root / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (d / sub).mkdir(parents=True)
    (d / "ImageSets/Main/test.txt").write_text("".join(i + "\n" for i in ground_truth))
    for image_id, objects in ground_truth.items():
        Image.new("RGB", (64, 64), (90, 90, 90)).save(d / "JPEGImages" / f"{image_id}.jpg")
        xml = "".join(object_xml(c, b, diff) for c, b, diff in objects)
        (d / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><size><width>64</width><height>64</height><depth>3</depth></size>"
            f"{xml}</annotation>"
        )
    return d


class FixedDetections(torch.nn.Module):
    """A detector that outputs fixed detections whatever the image: evaluation is under test."""

    def __init__(self, detections=DETECTIONS):
        super().__init__()
        self.detections = detections

    def forward(self, inputs):
        outputs = []
        for x in inputs:
            dets = self.detections.get(x["image_id"], [])
            instances = Instances((x["height"], x["width"]))
            instances.pred_boxes = Boxes(
                torch.tensor([b for _, _, b in dets], dtype=torch.float32).reshape(-1, 4)
            )
            instances.scores = torch.tensor([s for _, s, _ in dets])
            instances.pred_classes = torch.tensor([c for c, _, _ in dets], dtype=torch.int64)
            outputs.append({"instances": instances})
        return outputs


def voc07_ap(cls, threshold):
    """VOC2007 11-point AP (in %) of one class, written from the VOC devkit's definition."""
    gts = {
        i: [(np.array(b, float), diff) for c, b, diff in objs if c == cls]
        for i, objs in GROUND_TRUTH.items()
    }
    npos = sum(not diff for objs in gts.values() for _, diff in objs)
    dets = sorted(
        (
            (s, i, np.array(b, float) + [1, 1, 0, 0])  # to the XML's 1-based boxes
            for i, ds in DETECTIONS.items()
            for c, s, b in ds
            if c == cls
        ),
        key=lambda d: -d[0],
    )
    used, tp, fp = set(), [], []
    for _, image_id, box in dets:
        best, best_j = 0.0, None
        for j, (gt, _) in enumerate(gts[image_id]):
            w = min(box[2], gt[2]) - max(box[0], gt[0]) + 1
            h = min(box[3], gt[3]) - max(box[1], gt[1]) + 1
            inter = max(w, 0) * max(h, 0)
            union = np.prod(box[2:] - box[:2] + 1) + np.prod(gt[2:] - gt[:2] + 1) - inter
            if inter / union > best:
                best, best_j = inter / union, j
        if best > threshold and gts[image_id][best_j][1]:
            continue  # matched a difficult object: ignored
        hit = best > threshold and (image_id, best_j) not in used
        used.add((image_id, best_j)) if hit else None
        tp.append(hit)
        fp.append(not hit)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall, precision = tp / npos, tp / np.maximum(tp + fp, 1e-12)
    return 100 * np.mean(
        [
            precision[recall >= t].max() if (recall >= t).any() else 0.0
            for t in np.arange(0, 1.1, 0.1)
        ]
    )


def independent_metrics():
    """Mean over the classes with ground truth, cat and dog (the other 18 have no AP)."""
    maps = {t: (voc07_ap(CAT, t / 100) + voc07_ap(DOG, t / 100)) / 2 for t in range(50, 100, 5)}
    return {"AP": np.mean(list(maps.values())), "AP50": maps[50], "AP75": maps[75]}


@pytest.fixture
def hand_made_voc(tmp_path):
    register_all_voc(str(tmp_path))
    write_tree(tmp_path)
    yield tmp_path
    register_all_voc()


def voc_cfg(out):
    cfg = get_cfg()
    cfg.merge_from_file("configs/voc_R50_C4.yaml")
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "DATALOADER.NUM_WORKERS",
            "0",
            "OUTPUT_DIR",
            str(out),
        ]
    )
    return cfg


def test_train_net_metrics_equal_detectron2_and_numpy(hand_made_voc, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="moco_d2"):
        reported = Trainer.test(voc_cfg(tmp_path / "out"), FixedDetections())
    written = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert list(written) == ["voc_2007_test"]
    written = written["voc_2007_test"]
    assert {k: written[k] for k in ("AP", "AP50", "AP75")} == {
        k: pytest.approx(v) for k, v in reported["bbox"].items() if k in ("AP", "AP50", "AP75")
    }

    evaluator = PascalVOCDetectionEvaluator("voc_2007_test")
    evaluator.reset()
    model = FixedDetections()
    for image_id in GROUND_TRUTH:
        inputs = [{"image_id": image_id, "height": 64, "width": 64}]
        evaluator.process(inputs, model(inputs))
    direct = evaluator.evaluate()["bbox"]

    numpy_metrics = independent_metrics()
    for key in ("AP", "AP50", "AP75"):
        # Detectron2 averages over all 20 classes and scores the 18 absent ones as 0.
        assert written[key] * 2 / 20 == pytest.approx(direct[key], abs=1e-9)
        assert written[key] == pytest.approx(numpy_metrics[key], abs=1e-6)
        for cls in (CAT, DOG):
            per_class = np.mean([voc07_ap(cls, t / 100) for t in range(50, 100, 5)])
            expected = per_class if key == "AP" else voc07_ap(cls, int(key[2:]) / 100)
            assert written["per_class"][CLASS_NAMES[cls]][key] == pytest.approx(expected)
    # By hand: cat 66.7 (FP above two TPs) and dog 100 at IoU .5, cat 27.3 at .75.
    assert written["AP50"] == pytest.approx((200 / 3 + 100) / 2)
    assert written["AP75"] == pytest.approx((100 * 6 / 11 / 2 + 100) / 2)

    # The 18 classes without ground truth: null, each listed with the reason, and logged.
    absent = [name for i, name in enumerate(CLASS_NAMES) if i not in (CAT, DOG)]
    assert {c for c, v in written["per_class"].items() if v == dict.fromkeys(v)} == set(absent)
    assert sorted((u["class"], u["metric"]) for u in written["undefined"]) == sorted(
        (c, m) for c in absent for m in ("AP", "AP50", "AP75")
    )
    assert all("no ground-truth object of this class" in u["reason"] for u in written["undefined"])
    assert "bbox AP, AP50, AP75 of 18 classes (aeroplane, bicycle," in caplog.text
    assert f"undefined, null in {tmp_path / 'out' / METRICS_FILE}" in caplog.text


def test_evaluator_is_chosen_by_metadata_not_name(hand_made_voc, tmp_path):
    register_voc("my_detection_set", str(hand_made_voc / "VOC2007"), "test", 2007)
    try:
        cfg = get_cfg()
        assert isinstance(Trainer.build_evaluator(cfg, "my_detection_set"), VOCDetectionEvaluator)
        MetadataCatalog.get("voc_like_name").set(evaluator_type="coco")
        with pytest.raises(UserError, match="voc_like_name.*'coco'"):
            Trainer.build_evaluator(cfg, "voc_like_name")
    finally:
        DatasetCatalog.remove("my_detection_set")
        MetadataCatalog.remove("my_detection_set")
        MetadataCatalog.remove("voc_like_name")


# XML as annotation tools write it: decimal coordinates, no <pose> or <truncated>, <difficult>
# spelled yes/no or True/False, or missing. Detectron2's own evaluator fails on each of these.
TOOL_GROUND_TRUTH = {
    "000001": [(CAT, (10.5, 10.5, 40.5, 40.5), "no"), (DOG, (5, 5, 60, 60), None)],
    "000002": [(CAT, (20, 20, 50.5, 50.5), "False"), (DOG, (2, 2, 12, 12), "yes")],
    "000003": [(DOG, (30.5, 30, 60, 60.5), "true")],
}


def tool_object_xml(cls, box, difficult):
    flag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return (
        f"<object><name>{CLASS_NAMES[cls]}</name>{flag}<bndbox><xmin>{box[0]}</xmin>"
        f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
    )


def detections_of(ground_truth, skip_difficult):
    """Exactly the ground truth as 0-based detections, optionally without the difficult ones."""
    return {
        image_id: [
            (c, 0.9, (b[0] - 1, b[1] - 1, b[2], b[3]))
            for c, b, diff in objects
            if not (skip_difficult and str(diff).lower() in ("yes", "true"))
        ]
        for image_id, objects in ground_truth.items()
    }


@pytest.fixture
def tool_written_voc(tmp_path):
    register_all_voc(str(tmp_path))
    write_tree(tmp_path, TOOL_GROUND_TRUTH, tool_object_xml)
    yield tmp_path
    register_all_voc()


@pytest.mark.parametrize("skip_difficult", [True, False])
def test_evaluation_scores_what_the_loader_accepted(tool_written_voc, tmp_path, skip_difficult):
    detections = detections_of(TOOL_GROUND_TRUTH, skip_difficult)
    Trainer.test(voc_cfg(tmp_path / "out"), FixedDetections(detections))
    written = json.loads((tmp_path / "out" / METRICS_FILE).read_text())["voc_2007_test"]
    # Perfect detections of the scored objects: every IoU is 1. The difficult dog is neither
    # needed nor, when detected, a false positive.
    assert {k: written[k] for k in ("AP", "AP50", "AP75")} == pytest.approx(
        {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    )
    assert written["per_class"]["cat"] == pytest.approx(written["per_class"]["dog"])
    assert written["per_class"]["cat"] == pytest.approx(dict.fromkeys(("AP", "AP50", "AP75"), 100))
    assert len(written["undefined"]) == 3 * (len(CLASS_NAMES) - 2)


def test_shifted_decimal_boxes_score_as_computed_independently(tool_written_voc):
    """Decimals are kept, as the VOC devkit's str2double keeps them, by loader and evaluator."""
    (first, *_) = DatasetCatalog.get("voc_2007_test")
    assert first["annotations"][0]["bbox"] == [9.5, 9.5, 40.5, 40.5]
    records = voc_records([first], list(CLASS_NAMES))
    assert records["000001"][0] == {"name": "cat", "bbox": [10.5, 10.5, 40.5, 40.5], "difficult": 0}

    evaluator = VOCDetectionEvaluator("voc_2007_test")
    evaluator.reset()
    detections = detections_of(TOOL_GROUND_TRUTH, skip_difficult=True)
    c, _, (x0, y0, x1, y1) = detections["000001"][0]
    # Scored below the other cat, so that one comes first in the ranking.
    detections["000001"][0] = (c, 0.5, (x0 + 1.5, y0, x1 + 1.5, y1))
    model = FixedDetections(detections)
    for image_id in TOOL_GROUND_TRUTH:
        inputs = [{"image_id": image_id, "height": 64, "width": 64}]
        evaluator.process(inputs, model(inputs))
    box = evaluator.evaluate()["bbox"]
    # 1-based inclusive widths: 31 wide, overlap 29.5 wide, same height.
    iou = 29.5 / (31 + 31 - 29.5)
    assert 0.90 < iou < 0.95
    cat_aps = [100.0 if iou > t / 100 else 0.0 for t in range(50, 100, 5)]
    # The other cat is found; with one of two missed, VOC07 11-point AP is 6/11.
    cat_aps = [100.0 if ap else 100 * 6 / 11 for ap in cat_aps]
    assert box["AP-cat"] == pytest.approx(np.mean(cat_aps))
    assert box["AP50-cat"] == pytest.approx(100.0) and box["AP75-dog"] == pytest.approx(100.0)
    assert box["AP"] == pytest.approx((np.mean(cat_aps) + 100.0) / 2)


def test_no_detections_score_zero_not_null(hand_made_voc, tmp_path):
    Trainer.test(voc_cfg(tmp_path / "out"), FixedDetections({}))
    written = json.loads((tmp_path / "out" / METRICS_FILE).read_text())["voc_2007_test"]
    assert {k: written[k] for k in ("AP", "AP50", "AP75")} == {"AP": 0, "AP50": 0, "AP75": 0}
    assert written["per_class"]["cat"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert written["per_class"]["bird"] == {"AP": None, "AP50": None, "AP75": None}


def test_a_nan_where_ground_truth_exists_still_stops(tmp_path):
    results = {"voc_2007_test": {"bbox": {"AP": float("nan"), "AP50": 50.0, "AP75": 10.0}}}
    with pytest.raises(RuntimeError, match="voc_2007_test: bbox AP not finite although"):
        write_metrics(results, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
