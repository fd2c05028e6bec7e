"""Pretrained-file loading for linear classification: formats accepted, and the exact-fit check."""

import pytest
import torch
import torchvision

from moco_d2.convert.trunk import MOCO, find_trunk
from moco_d2.errors import UserError
from moco_d2.lincls.loading import check_backbone_unchanged, load_pretrained
from moco_d2.lincls.model import build_model


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def moco_checkpoint(state, prefix="module."):
    """A checkpoint in the released MoCo layout, with an MLP head on the query encoder."""
    encoder = {k: v for k, v in state.items() if not k.startswith("fc.")}
    encoder.update(
        {
            "fc.0.weight": torch.randn(512, 512),
            "fc.0.bias": torch.randn(512),
            "fc.2.weight": torch.randn(128, 512),
            "fc.2.bias": torch.randn(128),
        }
    )
    sd = {f"{prefix}encoder_q.{k}": v for k, v in encoder.items()}
    sd.update({f"{prefix}encoder_k.{k}": v + 1 for k, v in encoder.items()})
    sd[f"{prefix}queue"] = torch.randn(128, 64)
    sd[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {
        "epoch": 200,
        "arch": "resnet18",
        "state_dict": sd,
        "optimizer": {"state": {}, "param_groups": []},
    }


def assert_backbone_equals(model, state):
    loaded = model.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize(
    "layout", ["moco", "moco_without_module", "torchvision", "torchvision_ddp"]
)
def test_accepted_layouts_load_the_query_encoder(tmp_path, resnet18_state, layout):
    checkpoint = {
        "moco": lambda: moco_checkpoint(resnet18_state),
        "moco_without_module": lambda: moco_checkpoint(resnet18_state, prefix=""),
        "torchvision": lambda: resnet18_state,
        "torchvision_ddp": lambda: {
            "state_dict": {"module." + k: v for k, v in resnet18_state.items()}
        },
    }[layout]()
    path = tmp_path / "pretrained.pth"
    torch.save(checkpoint, path)
    model = build_model("resnet18", num_classes=7)
    fc_before = model.fc.weight.clone()

    load_pretrained(model, str(path), "resnet18")

    assert_backbone_equals(model, resnet18_state)  # query encoder, not the key encoder (+1)
    assert torch.equal(model.fc.weight, fc_before)  # the head (MLP or 1000-way) is not loaded
    check_backbone_unchanged(model, str(path))


def test_trunk_drops_head_key_encoder_queue_and_bn_counters(resnet18_state):
    trunk = find_trunk(moco_checkpoint(resnet18_state), "c.pth")
    expected = {
        k for k in resnet18_state if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))
    }
    assert trunk.kind == MOCO and trunk.arch == "resnet18"
    assert set(trunk.tensors) == expected


def test_missing_backbone_key_is_named(tmp_path, resnet18_state):
    checkpoint = moco_checkpoint(resnet18_state)
    del checkpoint["state_dict"]["module.encoder_q.layer3.1.bn2.running_var"]
    torch.save(checkpoint, tmp_path / "c.pth")
    with pytest.raises(UserError, match=r"missing layer3\.1\.bn2\.running_var") as e:
        load_pretrained(build_model("resnet18", 10), str(tmp_path / "c.pth"), "resnet18")
    assert "\n" not in str(e.value)


def test_extra_key_is_named(tmp_path, resnet18_state):
    checkpoint = moco_checkpoint(resnet18_state)
    checkpoint["state_dict"]["module.encoder_q.layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "c.pth")
    with pytest.raises(UserError, match=r"unexpected layer5\.0\.conv1\.weight"):
        load_pretrained(build_model("resnet18", 10), str(tmp_path / "c.pth"), "resnet18")


def test_wrong_arch_recorded_in_checkpoint(tmp_path, resnet18_state):
    torch.save(moco_checkpoint(resnet18_state), tmp_path / "c.pth")
    with pytest.raises(UserError, match="is a resnet18 checkpoint, but -a/--arch is resnet34"):
        load_pretrained(build_model("resnet34", 10), str(tmp_path / "c.pth"), "resnet34")


def test_wrong_arch_of_a_bare_state_dict(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError, match=r"does not fit resnet18: .* has shape .*another arch"):
        load_pretrained(build_model("resnet18", 10), str(tmp_path / "r50.pth"), "resnet18")


def test_unreadable_or_absent_file(tmp_path):
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="is not a readable PyTorch checkpoint"):
        load_pretrained(build_model("resnet18", 10), str(tmp_path / "junk.pth"), "resnet18")
    with pytest.raises(UserError, match="no such file"):
        load_pretrained(build_model("resnet18", 10), str(tmp_path / "absent.pth"), "resnet18")


def test_changed_backbone_fails_the_sanity_check(tmp_path, resnet18_state):
    torch.save(moco_checkpoint(resnet18_state), tmp_path / "c.pth")
    model = build_model("resnet18", 10)
    load_pretrained(model, str(tmp_path / "c.pth"), "resnet18")
    model.layer2[0].bn1.running_mean += 1e-3  # what BN in train mode would do
    with pytest.raises(RuntimeError, match=r"layer2\.0\.bn1\.running_mean"):
        check_backbone_unchanged(model, str(tmp_path / "c.pth"))
