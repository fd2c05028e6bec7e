"""Converted weights in Detectron2: same features as torchvision, whole trunk loaded or an error."""

import pickle

import pytest
import torch
import torchvision

import moco_d2.detection  # noqa: F401  (compat shims and registrations must precede detectron2)

# isort: split
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone

from moco_d2.convert import tool
from moco_d2.detection.checkpoint import BackboneCheckingCheckpointer
from moco_d2.errors import UserError

CONFIG = "configs/voc_R50_C4.yaml"
# Model tensors that no ImageNet-pretrained trunk provides: the detection heads and the
# extra BN that Res5ROIHeadsExtraNorm puts after res5.
NEW_IN_DETECTION = (
    {
        f"proposal_generator.rpn_head.{m}.{t}"
        for m in ("conv", "objectness_logits", "anchor_deltas")
        for t in ("weight", "bias")
    }
    | {
        f"roi_heads.box_predictor.{m}.{t}"
        for m in ("cls_score", "bbox_pred")
        for t in ("weight", "bias")
    }
    | {f"roi_heads.res5.norm.{t}" for t in ("weight", "bias", "running_mean", "running_var")}
)


@pytest.fixture(scope="module")
def torchvision_r50():
    """A ResNet-50 with random weights and random BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def converted(torchvision_r50, tmp_path_factory):
    """The converter's output for a released-layout MoCo checkpoint of ``torchvision_r50``."""
    d = tmp_path_factory.mktemp("d2")
    sd = {"module.encoder_q." + k: v for k, v in torchvision_r50.state_dict().items()}
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": sd}, d / "checkpoint.pth.tar")
    assert tool.main([str(d / "checkpoint.pth.tar"), str(d / "moco.pkl")]) == 0
    return d / "moco.pkl"


def load_detectron2_weights(model, path):
    """Load ``path`` as train_net does; the names of ``model`` left at init."""
    checkpointer = BackboneCheckingCheckpointer(model)
    checkpointer.load(path)
    return checkpointer.not_loaded


def transfer_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_backbone_features_equal_torchvision(torchvision_r50, converted):
    cfg = transfer_cfg()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert load_detectron2_weights(backbone, str(converted)) == []
    backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    tv = torchvision_r50
    with torch.no_grad():
        outputs = backbone(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for stage, layer in zip(
            ("res2", "res3", "res4", "res5"), (tv.layer1, tv.layer2, tv.layer3, tv.layer4)
        ):
            y = layer(y)
            error = (outputs[stage] - y).abs().max() / y.abs().max()
            assert outputs[stage].shape == y.shape and error < 1e-4, (stage, error.item())


@pytest.fixture(scope="module")
def transfer_model():
    return build_model(transfer_cfg())


def test_detection_checkpointer_loads_whole_trunk_into_transfer_model(
    torchvision_r50, converted, transfer_model
):
    DetectionCheckpointer(transfer_model).load(str(converted))
    loaded = transfer_model.state_dict()
    tv = torchvision_r50.state_dict()
    # Detectron2's name matching puts res5 into the R50-C4 box head, the rest in the backbone.
    assert torch.equal(loaded["backbone.stem.conv1.weight"], tv["conv1.weight"])
    assert torch.equal(
        loaded["backbone.res4.5.conv3.norm.running_var"], tv["layer3.5.bn3.running_var"]
    )
    assert torch.equal(
        loaded["roi_heads.res5.0.shortcut.norm.running_mean"],
        tv["layer4.0.downsample.1.running_mean"],
    )
    assert torch.equal(loaded["roi_heads.res5.2.conv2.weight"], tv["layer4.2.conv2.weight"])

    not_loaded = load_detectron2_weights(transfer_model, str(converted))
    assert set(not_loaded) == NEW_IN_DETECTION


def test_missing_backbone_tensor_is_an_error_not_a_warning(converted, transfer_model, tmp_path):
    with open(converted, "rb") as f:
        weights = pickle.load(f)
    del weights["model"]["res5.2.conv3.norm.running_var"]
    tool.write(weights, tmp_path / "partial.pkl")
    with pytest.raises(
        UserError,
        match=r"left 1 backbone tensors .*: "
        r"roi_heads\.res5\.2\.conv3\.norm\.running_var;",
    ):
        load_detectron2_weights(transfer_model, str(tmp_path / "partial.pkl"))


def test_resume_or_load_with_a_missing_weights_file_is_an_error(transfer_model, tmp_path):
    checkpointer = BackboneCheckingCheckpointer(transfer_model, save_dir=str(tmp_path))
    with pytest.raises(UserError, match="weights file not found: See Instructions"):
        checkpointer.resume_or_load(transfer_cfg().MODEL.WEIGHTS, resume=True)


def test_empty_path_means_random_init_on_purpose(transfer_model):
    before = {k: v.clone() for k, v in transfer_model.state_dict().items()}
    assert BackboneCheckingCheckpointer(transfer_model).load("") == {}
    assert all(torch.equal(v, before[k]) for k, v in transfer_model.state_dict().items())
