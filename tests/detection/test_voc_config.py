"""The registered configs carry the MoCo papers' VOC protocol; the ExtraNorm head is as named."""

import pytest
import torch

import moco_d2.detection  # noqa: F401  (compat shims and registrations must precede detectron2)

# isort: split
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads, build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from moco_d2.detection.roi_heads import Res5ROIHeadsExtraNorm
from moco_d2.detection.train_net import resolve_sync_bn

CONFIGS = ["configs/voc_R50_C4.yaml", "configs/voc_R50_C4_supervised.yaml"]


def load(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("path", CONFIGS)
def test_protocol_values_match_the_papers(path):
    cfg = load(path)
    m = cfg.MODEL
    assert m.META_ARCHITECTURE == "GeneralizedRCNN" and m.MASK_ON is False
    assert m.BACKBONE.NAME == "build_resnet_backbone" and m.RESNETS.DEPTH == 50
    assert m.RESNETS.OUT_FEATURES == ["res4"]  # C4: res5 is the box head
    assert m.BACKBONE.FREEZE_AT == 0
    assert m.RESNETS.NORM == "SyncBN"
    assert m.RESNETS.STRIDE_IN_1X1 is False
    assert m.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and m.ROI_HEADS.NUM_CLASSES == 20
    assert (m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    assert m.PIXEL_MEAN == [123.675, 116.280, 103.530]
    assert m.PIXEL_STD == [58.395, 57.120, 57.375]
    assert cfg.INPUT.FORMAT == "RGB"
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert cfg.INPUT.MIN_SIZE_TEST == 800
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, tuple(s.STEPS), s.MAX_ITER, s.WARMUP_ITERS) == (
        16,
        0.02,
        (18000, 22000),
        24000,
        100,
    )
    assert cfg.TEST.PRECISE_BN.ENABLED is True
    assert tuple(cfg.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    assert tuple(cfg.DATASETS.TEST) == ("voc_2007_test",)


def test_configs_differ_only_in_weights_and_output():
    moco, supervised = load(CONFIGS[0]), load(CONFIGS[1])
    moco.MODEL.WEIGHTS = supervised.MODEL.WEIGHTS
    moco.OUTPUT_DIR = supervised.OUTPUT_DIR
    assert moco.dump() == supervised.dump()


def test_head_is_registered_on_import():
    assert ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm") is Res5ROIHeadsExtraNorm


def tiny_head_cfg(name):
    cfg = load(CONFIGS[0])
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NAME = name
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 8
    return cfg


def build_head(name):
    return build_roi_heads(tiny_head_cfg(name), {"res4": ShapeSpec(channels=1024, stride=16)})


def norm_layers(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_extra_norm_is_one_bn_after_res5():
    plain, extra = build_head("Res5ROIHeads"), build_head("Res5ROIHeadsExtraNorm")
    assert type(plain) is Res5ROIHeads
    assert len(norm_layers(extra.res5)) == len(norm_layers(plain.res5)) + 1
    last_name, last = list(extra.res5.named_children())[-1]
    assert last_name == "norm"
    assert isinstance(last, torch.nn.SyncBatchNorm) and last.num_features == 2048
    # Everything before it is Detectron2's res5 unchanged (3 bottleneck blocks).
    assert [n for n, _ in extra.res5.named_children()] == ["0", "1", "2", "norm"]


def test_full_model_uses_the_head_with_the_config_norm():
    cfg = tiny_head_cfg("Res5ROIHeadsExtraNorm")
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    assert type(model.roi_heads) is Res5ROIHeadsExtraNorm
    assert type(model.roi_heads.res5.norm) is torch.nn.BatchNorm2d


def test_extra_norm_trains():
    """Its output is batch-normalized, gradients reach it and an SGD step changes it."""
    torch.manual_seed(0)
    head = build_head("Res5ROIHeadsExtraNorm").train()
    outputs = []
    head.res5.norm.register_forward_hook(lambda m, i, o: outputs.append(o))
    features = {"res4": torch.randn(2, 1024, 8, 8)}
    images = ImageList(torch.zeros(2, 3, 128, 128), [(128, 128)] * 2)
    proposals, targets = [], []
    for _ in range(2):
        p = Instances(
            (128, 128),
            proposal_boxes=Boxes(
                torch.tensor([[0, 0, 64, 64], [32, 32, 128, 128], [10, 10, 50, 90.0]])
            ),
            objectness_logits=torch.zeros(3),
        )
        proposals.append(p)
        targets.append(
            Instances(
                (128, 128),
                gt_boxes=Boxes(torch.tensor([[0, 0, 60, 60.0]])),
                gt_classes=torch.tensor([3]),
            )
        )
    running_mean = head.res5.norm.running_mean.clone()
    with EventStorage():  # the head logs its foreground ratio
        _, losses = head(images, features, proposals, targets)
    out = outputs[-1]
    mean, var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(var, torch.ones_like(var), atol=1e-2)

    norm = head.res5.norm
    assert not torch.equal(norm.running_mean, running_mean)
    weight = norm.weight.detach().clone()
    sum(losses.values()).backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    assert not torch.equal(norm.weight, weight)


def test_sync_bn_is_kept_in_a_single_process():
    cfg = load(CONFIGS[0])
    cfg.MODEL.DEVICE = "cpu"
    assert resolve_sync_bn(cfg).MODEL.RESNETS.NORM == "SyncBN"
