"""End to end: a MoCo checkpoint is converted, then tools/train_net.py fine-tunes Mask R-CNN
R50-C4 on a tiny synthetic COCO tree for a few CPU iterations and writes box and mask AP."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from coco_tiny import COCO_TINY_OPTS, make_synthetic_coco
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from moco_d2.convert import tool
from moco_d2.detection.evaluation import COCO_METRIC_NAMES, COCO_METRICS_FILE

LOSSES = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


@pytest.fixture(scope="module")
def moco_weights(tmp_path_factory):
    """A MoCo v2 checkpoint layout (module.encoder_q/k.*, MLP head, queue), converted."""
    d = tmp_path_factory.mktemp("moco")
    encoder = torchvision.models.resnet50(num_classes=128)
    encoder.fc = torch.nn.Sequential(
        torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128)
    )
    state = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    state["module.queue"] = torch.randn(128, 16)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, d / "moco.pth.tar")
    tool.main([str(d / "moco.pth.tar"), str(d / "moco.pkl")])
    return d / "moco.pkl"


def _cocoeval(gt_file, results, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        evaluation = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return dict(zip(COCO_METRIC_NAMES, (100 * s for s in evaluation.stats[:6]), strict=True))


@pytest.mark.slow
def test_mask_rcnn_fine_tunes_from_moco_weights_and_reports_box_and_mask_ap(moco_weights, tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    make_synthetic_coco(root, num_train=4, num_val=2)
    result = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", "configs/coco_R50_C4_2x.yaml"]
        + ["MODEL.WEIGHTS", str(moco_weights), *COCO_TINY_OPTS]
        + ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "DETECTRON2_DATASETS": str(root)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    steps = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [step for step in steps if "total_loss" in step]
    assert losses, steps
    for step in losses:
        assert all(math.isfinite(step[name]) and step[name] > 0 for name in LOSSES), step

    metrics = json.loads((out / COCO_METRICS_FILE).read_text())
    assert list(metrics) == ["coco_2017_val"]
    box = metrics["coco_2017_val"]
    segm = box.pop("segm")
    assert box.pop("undefined") == []  # the synthetic set has objects in every area range
    for block in (box, segm):
        assert list(block) == list(COCO_METRIC_NAMES)
        assert all(math.isfinite(v) and 0 <= v <= 100 for v in block.values())

    # The same numbers from pycocotools directly, on the detections the evaluator saved.
    detections = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    gt_file = root / "coco" / "annotations" / "instances_val2017.json"
    assert box == pytest.approx(_cocoeval(gt_file, detections, "bbox"))
    assert segm == pytest.approx(_cocoeval(gt_file, detections, "segm"))

    log = (out / "log.txt").read_text()
    assert "Res5ROIHeadsExtraNorm" in log and "Running precise-BN for 2 iterations" in log
    assert "coco_2017_val segm: AP " in result.stdout + result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_mask_rcnn_keeps_sync_bn(moco_weights, tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    make_synthetic_coco(root, num_train=4, num_val=2)
    opts = [o if o != "cpu" else "cuda" for o in COCO_TINY_OPTS]
    result = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", "configs/coco_R50_C4_2x.yaml"]
        + ["MODEL.WEIGHTS", str(moco_weights), *opts, "SOLVER.MAX_ITER", "2"]
        + ["OUTPUT_DIR", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "DETECTRON2_DATASETS": str(root)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NORM: SyncBN" in (out / "config.yaml").read_text()
    metrics = json.loads((out / COCO_METRICS_FILE).read_text())["coco_2017_val"]
    assert set(metrics) == {*COCO_METRIC_NAMES, "segm", "undefined"}
    assert set(metrics["segm"]) == set(COCO_METRIC_NAMES)
