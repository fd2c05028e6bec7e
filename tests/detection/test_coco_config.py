"""The COCO configs carry the Mask R-CNN R50-C4 2x protocol of the MoCo COCO transfer, and the
ExtraNorm head's extra BN feeds the mask head as well as the box head."""

import argparse

import coco_tiny  # noqa: F401  (compat shims and registrations before detectron2)
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from moco_d2.detection.preflight import check_weights
from moco_d2.detection.roi_heads import Res5ROIHeadsExtraNorm
from moco_d2.errors import UserError

CONFIGS = ["configs/coco_R50_C4_2x.yaml", "configs/coco_R50_C4_2x_supervised.yaml"]


def load(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("path", CONFIGS)
def test_protocol_values_match_the_issue(path):
    cfg = load(path)
    m = cfg.MODEL
    assert m.META_ARCHITECTURE == "GeneralizedRCNN" and m.MASK_ON is True
    assert m.RESNETS.OUT_FEATURES == ["res4"] and m.RESNETS.DEPTH == 50  # C4
    assert m.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and m.ROI_HEADS.NUM_CLASSES == 80
    assert m.BACKBONE.FREEZE_AT == 0
    assert m.RESNETS.NORM == "SyncBN"
    assert m.RESNETS.STRIDE_IN_1X1 is False
    assert m.PIXEL_MEAN == [123.675, 116.280, 103.530]
    assert m.PIXEL_STD == [58.395, 57.120, 57.375]
    assert cfg.INPUT.FORMAT == "RGB"
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
    assert cfg.INPUT.MIN_SIZE_TEST == 800
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, tuple(s.STEPS), s.MAX_ITER) == (
        16,
        0.02,
        (120000, 160000),
        180000,
    )
    assert cfg.TEST.PRECISE_BN.ENABLED is True
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",)
    assert tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)


def test_configs_differ_only_in_weights_and_output():
    moco, supervised = load(CONFIGS[0]), load(CONFIGS[1])
    assert moco.OUTPUT_DIR != supervised.OUTPUT_DIR
    moco.MODEL.WEIGHTS = supervised.MODEL.WEIGHTS
    moco.OUTPUT_DIR = supervised.OUTPUT_DIR
    assert moco.dump() == supervised.dump()


@pytest.mark.parametrize("path", CONFIGS)
def test_weights_placeholder_refuses_to_run(path):
    cfg = load(path)
    cfg.MODEL.DEVICE = "cpu"
    args = argparse.Namespace(resume=False, eval_only=False)
    with pytest.raises(UserError, match="MODEL.WEIGHTS file not found: .See Instructions"):
        check_weights(cfg, args)


def _mask_head(train):
    cfg = load(CONFIGS[0])
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 8
    head = build_roi_heads(cfg, {"res4": ShapeSpec(channels=1024, stride=16)})
    assert type(head) is Res5ROIHeadsExtraNorm and head.mask_on
    return head.train(train)


def _record(module, store, what):
    module.register_forward_hook(
        lambda m, inputs, output: store.append(inputs[0] if what == "input" else output)
    )


def test_extra_norm_output_is_the_mask_head_input_in_training():
    torch.manual_seed(0)
    head = _mask_head(train=True)
    normed, mask_inputs = [], []
    _record(head.res5.norm, normed, "output")
    _record(head.mask_head, mask_inputs, "input")
    features = {"res4": torch.randn(1, 1024, 8, 8)}
    images = ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)])
    proposals = Instances(
        (128, 128),
        proposal_boxes=Boxes(torch.tensor([[0, 0, 64, 64], [90, 90, 128, 128], [2, 2, 60, 62.0]])),
        objectness_logits=torch.zeros(3),
    )
    square = [np.array([0.0, 0.0, 60.0, 0.0, 60.0, 60.0, 0.0, 60.0])]
    targets = Instances(
        (128, 128),
        gt_boxes=Boxes(torch.tensor([[0, 0, 60, 60.0]])),
        gt_classes=torch.tensor([3]),
        gt_masks=PolygonMasks([square]),
    )
    with EventStorage():
        _, losses = head(images, features, [proposals], [targets])
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
    (box_features,), (mask_features,) = normed, mask_inputs
    # The mask head sees the normalized res5 output of the foreground proposals (rows of it).
    assert 0 < len(mask_features) < len(box_features)
    for row in mask_features:
        assert any(torch.equal(row, candidate) for candidate in box_features)


def test_extra_norm_output_is_the_mask_head_input_at_inference():
    torch.manual_seed(0)
    head = _mask_head(train=False)
    normed, mask_inputs = [], []
    _record(head.res5.norm, normed, "output")
    _record(head.mask_head, mask_inputs, "input")
    detections = Instances(
        (128, 128),
        pred_boxes=Boxes(torch.tensor([[0, 0, 64, 64], [10, 20, 100, 90.0]])),
        pred_classes=torch.tensor([0, 5]),
        scores=torch.tensor([0.9, 0.8]),
    )
    features = {"res4": torch.randn(1, 1024, 8, 8)}
    (out,) = head.forward_with_given_boxes(features, [detections])
    assert out.pred_masks.shape == (2, 1, 14, 14)
    assert len(normed) == 1 and mask_inputs[0] is normed[0]
