"""train_net's evaluation path reports what Detectron2's Pascal VOC evaluator and an
independent VOC07 11-point computation give on a hand-made case, difficult objects ignored."""

import json

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
from moco_d2.detection.trainer import METRICS_FILE, Trainer
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


def write_tree(root):
    d = root / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (d / sub).mkdir(parents=True)
    (d / "ImageSets/Main/test.txt").write_text("".join(i + "\n" for i in GROUND_TRUTH))
    for image_id, objects in GROUND_TRUTH.items():
        Image.new("RGB", (64, 64), (90, 90, 90)).save(d / "JPEGImages" / f"{image_id}.jpg")
        xml = "".join(
            f"<object><name>{CLASS_NAMES[c]}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{diff}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for c, b, diff in objects
        )
        (d / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><size><width>64</width><height>64</height><depth>3</depth></size>"
            f"{xml}</annotation>"
        )
    return d


class FixedDetections(torch.nn.Module):
    """A detector that outputs DETECTIONS whatever the image: evaluation is under test."""

    def forward(self, inputs):
        outputs = []
        for x in inputs:
            dets = DETECTIONS.get(x["image_id"], [])
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
    """Mean over all 20 VOC classes (absent classes score 0, as in Detectron2)."""
    maps = {
        t: sum(voc07_ap(c, t / 100) for c in (CAT, DOG)) / len(CLASS_NAMES)
        for t in range(50, 100, 5)
    }
    return {"AP": np.mean(list(maps.values())), "AP50": maps[50], "AP75": maps[75]}


@pytest.fixture
def hand_made_voc(tmp_path):
    register_all_voc(str(tmp_path))
    write_tree(tmp_path)
    yield tmp_path
    register_all_voc()


def test_train_net_metrics_equal_detectron2_and_numpy(hand_made_voc, tmp_path):
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
            str(tmp_path / "out"),
        ]
    )
    reported = Trainer.test(cfg, FixedDetections())
    written = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert written == {
        "voc_2007_test": {
            k: pytest.approx(v) for k, v in reported["bbox"].items() if k in ("AP", "AP50", "AP75")
        }
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
        assert written["voc_2007_test"][key] == pytest.approx(direct[key], abs=1e-9)
        assert written["voc_2007_test"][key] == pytest.approx(numpy_metrics[key], abs=1e-6)
    # By hand: cat 66.7 (FP above two TPs) and dog 100 at IoU .5, cat 27.3 at .75; /20 classes.
    assert written["voc_2007_test"]["AP50"] == pytest.approx((200 / 3 + 100) / 20)
    assert written["voc_2007_test"]["AP75"] == pytest.approx((100 * 6 / 11 / 2 + 100) / 20)


def test_evaluator_is_chosen_by_metadata_not_name(hand_made_voc, tmp_path):
    register_voc("my_detection_set", str(hand_made_voc / "VOC2007"), "test", 2007)
    try:
        cfg = get_cfg()
        assert isinstance(
            Trainer.build_evaluator(cfg, "my_detection_set"), PascalVOCDetectionEvaluator
        )
        MetadataCatalog.get("voc_like_name").set(evaluator_type="coco")
        with pytest.raises(UserError, match="voc_like_name.*'coco'"):
            Trainer.build_evaluator(cfg, "voc_like_name")
    finally:
        DatasetCatalog.remove("my_detection_set")
        MetadataCatalog.remove("my_detection_set")
        MetadataCatalog.remove("voc_like_name")
