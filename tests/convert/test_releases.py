"""The checkpoints of the major self-supervised releases (built in tests/releases.py from each
release's own saving code): the reader takes exactly the trunk the authors evaluate, never a
second one; a file with two trunks and no rule is refused, and --trunk picks one; the
converter writes all 265 tensors or nothing, with the input normalisation; lincls takes the
same trunk with the same flags; safetensors, torch's legacy format and argparse.Namespace
load."""

import argparse
import os
import pickle
import re

import numpy as np
import pytest
import releases
import torch
from releases import OTHER, RELEASES, SHAPES, TAKEN, THIRD

from moco_d2 import IMAGENET_MEAN, IMAGENET_STD, io
from moco_d2.cli import run_tool
from moco_d2.convert import layouts, tool, trunk
from moco_d2.errors import UserError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("releases")
    return {name: releases.save(directory, name) for name in RELEASES}


def assert_trunk(tensors, base):
    """``tensors`` (torchvision name → tensor) is exactly the ResNet-50 built with ``base``."""
    assert set(tensors) == set(SHAPES)
    for name, value in releases.expected(base).items():
        tensor = tensors[name]
        assert tuple(tensor.shape) == SHAPES[name], name
        assert bool((tensor == torch.tensor(value, dtype=tensor.dtype)).all()), name


def convert(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_tool("moco_d2.convert.tool", [str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ---- the reader ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RELEASES))
def test_each_release_gives_the_trunk_its_authors_evaluate(files, name):
    _, _, layout, second, input_norm = RELEASES[name]
    found = trunk.read_trunk(files[name])
    assert_trunk(found.tensors, TAKEN)
    assert (found.format, found.second, found.input_norm) == (layout, second, input_norm)
    assert len(tool.checked_mapping(found)) == 265
    # Every other tensor of the file is named as dropped, none is both taken and dropped.
    assert not set(found.sources.values()) & set(found.dropped)


@pytest.mark.parametrize(
    "name, dropped",
    [
        ("moco_v2", ["module.encoder_k.layer4.2.bn3.weight", "module.queue"]),
        ("moco_v3", ["module.momentum_encoder.conv1.weight", "module.predictor.0.weight"]),
        ("dino_full", ["student/module.backbone.conv1.weight", "dino_loss/center"]),
        ("densecl", ["encoder_q.0.conv1.weight", "encoder_k.0.conv1.weight", "queue2"]),
        ("solo_learn_byol", ["momentum_backbone.conv1.weight", "classifier.weight"]),
        ("lightly_dino", ["student_backbone.conv1.weight", "criterion.center"]),
        ("timm_train", ["state_dict_ema/conv1.weight", "fc.weight"]),
        ("vissl", ["classy_state_dict.base_model.model.heads/0.clf.0.weight"]),
    ],
)
def test_second_trunks_and_heads_are_dropped_by_name(files, name, dropped):
    assert set(dropped) <= set(trunk.read_trunk(files[name]).dropped)


def test_whole_prefixes_only_a_momentum_backbone_alone_is_not_a_backbone():
    """``"backbone" in key`` would take momentum_backbone.*; a whole-prefix rule does not."""
    state = releases.prefixed("momentum_backbone.", releases.trunk(OTHER))
    with pytest.raises(UserError, match=r"trunks under momentum_backbone, and no rule .*--trunk"):
        trunk.find_trunk({"state_dict": state}, "m.ckpt")


@pytest.mark.parametrize(
    "make, listed",
    [
        (releases.lightly_dino_example, "student_backbone, teacher_backbone"),
        (
            lambda: {
                "state_dict": {
                    **releases.prefixed("module.online.", releases.trunk(TAKEN)),
                    **releases.prefixed("module.offline.", releases.trunk(OTHER)),
                }
            },
            "module.online, module.offline",
        ),
        (  # a torchvision trunk beside a backbone: which one is evaluated is not known
            lambda: {
                **releases.trunk(TAKEN),
                **releases.prefixed("backbone.", releases.trunk(OTHER)),
            },
            "'', backbone",
        ),
    ],
)
def test_two_trunks_and_no_rule_are_refused_with_the_candidates(make, listed):
    with pytest.raises(UserError) as e:
        trunk.find_trunk(make(), "two.ckpt")
    message = str(e.value)
    assert f"two.ckpt holds ResNet trunks under {listed}, and no rule says which" in message
    assert "--trunk PREFIX" in message and "\n" not in message


@pytest.mark.parametrize(
    "name, choice, base, second",
    [
        ("lightly_dino_example", "teacher_backbone", TAKEN, ["student_backbone"]),
        ("lightly_dino_example", "student_backbone", OTHER, ["teacher_backbone"]),
        ("timm_train", "state_dict_ema", OTHER, ["state_dict"]),
        ("dino_full", "student", OTHER, ["teacher"]),
        ("moco_v2", "module.encoder_k", OTHER, ["module.encoder_q"]),
        ("moco_v2", "encoder_k", OTHER, ["module.encoder_q"]),
        ("mmselfsup_mocov2", "encoder_k", OTHER, ["backbone"]),  # EMA wrapper and Sequential
        ("densecl", "encoder_q.0", TAKEN, ["backbone", "encoder_k.0"]),
    ],
)
def test_trunk_flag_picks_an_entry_or_a_prefix(name, choice, base, second):
    found = trunk.find_trunk(getattr(releases, name)(), "f.pth", choice)
    assert_trunk(found.tensors, base)
    assert found.second == second


def test_trunk_flag_naming_nothing_lists_the_trunks():
    with pytest.raises(UserError) as e:
        trunk.find_trunk(releases.moco_v2(), "m.pth", "momentum_encoder")
    assert str(e.value) == (
        "--trunk momentum_encoder: m.pth has no entry or name prefix momentum_encoder (its "
        "trunks: module.encoder_q, module.encoder_k)"
    )


def test_bare_names_beside_the_trunk_taken_are_never_mixed_into_it():
    state = {
        **releases.prefixed("backbone.", releases.trunk(TAKEN)),
        "conv1.weight": torch.zeros(64, 3, 7, 7),
    }
    found = trunk.find_trunk({"state_dict": state}, "b.ckpt")
    assert_trunk(found.tensors, TAKEN)
    assert "conv1.weight" in found.dropped


def test_a_third_trunk_is_never_taken_for_a_missing_tensor():
    """The taken trunk one tensor short: the file is refused, not completed from the others."""
    checkpoint = releases.dino_full()
    del checkpoint["teacher"]["module.backbone.layer2.0.conv2.weight"]
    checkpoint["third"] = releases.prefixed("module.backbone.", releases.trunk(THIRD))
    found = trunk.find_trunk(checkpoint, "d.pth")
    assert "layer2.0.conv2.weight" not in found.tensors
    assert found.second == ["student", "third"]
    with pytest.raises(UserError, match=r"^not a complete ResNet-50 trunk: 1 missing"):
        tool.checked_mapping(found)


def test_simclr_v2_names_map_as_its_converter_writes_them(files):
    """Each torchvision tensor comes from its SimCLRv2-Pytorch name (distinct values)."""
    found = trunk.read_trunk(files["simclr_v2"])
    state = releases.simclr_v2()["resnet"]
    by_value = {float(v.reshape(-1)[0]): k for k, v in state.items() if v.numel() > 3}
    for name, value in releases.expected(TAKEN).items():
        assert found.sources[name] == by_value[float(torch.tensor(value))], name
    assert (
        found.sources["layer1.0.downsample.0.weight"] == "net.1.blocks.0.projection.shortcut.weight"
    )
    assert found.sources["layer4.2.bn3.running_var"] == "net.4.blocks.2.net.5.0.running_var"


@pytest.mark.parametrize(
    "make, says",
    [
        (releases.simclr_v2_wide, "SimCLR v2 network of width 2x, not a ResNet-50"),
        (releases.simclr_v2_sk, "SimCLR v2 network with selective kernels (sk1), not a ResNet-50"),
    ],
)
def test_wider_and_selective_kernel_simclr_v2_nets_are_refused(make, says):
    with pytest.raises(UserError, match=rf"^s\.pth holds a {re.escape(says)}"):
        trunk.find_trunk(make(), "s.pth")


# ---- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moco_v2", "dino_full", "timm_train"])
def test_torch_legacy_format_reads_the_same(tmp_path, name):
    path = releases.save(tmp_path, name, legacy=True)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # a pickle stream, not a zip archive
    assert_trunk(trunk.read_trunk(path).tensors, TAKEN)


def test_safetensors_timm_hub_file(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in releases.trunk(TAKEN, fc=1000).items()}, path)
    found = trunk.read_trunk(path)
    assert_trunk(found.tensors, TAKEN)
    assert found.format == releases.TORCHVISION_FC
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError, match="is not a readable safetensors file, or is truncated"):
        io.load_file(str(tmp_path / "random.safetensors"))


def test_namespace_is_admitted_with_weights_only_and_nothing_else(files):
    loaded = io.load_file(files["dino_full"])
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].arch == "resnet50"


class Custom:
    pass


def test_any_other_object_beside_a_namespace_is_refused(tmp_path):
    path = tmp_path / "timm.pth.tar"
    torch.save({**releases.timm_train(), "extra": Custom()}, path)
    with pytest.raises(UserError, match=r"refused to load .*test_releases\.Custom"):
        trunk.read_trunk(str(path))


def byol_pkl(path):
    """The first bytes DeepMind's BYOL checkpoints unpickle: dill's namedtuple constructor."""
    path.write_bytes(b"\x80\x02cdill._dill\n_create_namedtuple\n)R.")
    return str(path)


def test_deepmind_byol_pkl_is_refused_with_the_published_conversion(tmp_path):
    path = byol_pkl(tmp_path / "pretrain_res50x1.pkl")
    with pytest.raises(UserError) as e:
        trunk.read_trunk(path)
    message = str(e.value)
    assert message.startswith(f"refused to load {path}: it is a JAX/Haiku checkpoint pickled")
    assert "dill._dill._create_namedtuple" in message and "ajtejankar/byol-convert" in message


# ---- the converter ---------------------------------------------------------------------------


def test_converter_writes_the_simclr_v2_normalisation_and_prints_the_config(
    files, tmp_path, capsys
):
    out = tmp_path / "simclr.pkl"
    code, printed, err = convert([files["simclr_v2"], out], capsys)
    assert (code, err) == (0, "")
    lines = printed.splitlines()
    assert lines[0] == "input format: " + RELEASES["simclr_v2"][2]
    assert lines[1] == (
        "input normalisation: RGB in [0, 1] with no mean/std (TF-trained SimCLR): "
        'MODEL.PIXEL_MEAN "[0.0, 0.0, 0.0]" MODEL.PIXEL_STD "[255.0, 255.0, 255.0]" '
        "INPUT.FORMAT RGB"
    )
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data[tool.NORMALISATION] == {
        "expects": layouts.RGB01,
        "about": "RGB in [0, 1] with no mean/std (TF-trained SimCLR)",
        "MODEL.PIXEL_MEAN": [0.0, 0.0, 0.0],
        "MODEL.PIXEL_STD": [255.0, 255.0, 255.0],
        "INPUT.FORMAT": "RGB",
    }
    expected = releases.expected(TAKEN)
    for tv, d2 in tool.checked_mapping(trunk.read_trunk(files["simclr_v2"])).items():
        assert np.all(data["model"][d2] == np.float32(expected[tv])), d2


@pytest.mark.parametrize(
    "argv, record",
    [
        ([], None),  # the layout does not say: nothing recorded
        (["--input-norm", "rgb01"], [255.0, 255.0, 255.0]),  # TF-converted SimCLR v1
        (["--input-norm", "imagenet"], [58.395, 57.12, 57.375]),
    ],
)
def test_input_norm_flag_records_what_a_plain_layout_cannot_say(
    files, tmp_path, capsys, argv, record
):
    out = tmp_path / "v1.pkl"
    code, printed, _ = convert([files["simclr_v1"], out, *argv], capsys)
    assert code == 0
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data.get(tool.NORMALISATION, {}).get("MODEL.PIXEL_STD") == record
    assert ("not recorded" in printed) == (record is None)


def test_converter_refuses_an_ambiguous_file_and_picks_with_trunk(files, tmp_path, capsys):
    path = tmp_path / "dino.ckpt"
    torch.save(releases.lightly_dino_example(), path)
    out = tmp_path / "out.pkl"
    code, _, err = convert([path, out], capsys)
    assert code == 2 and err.count("\n") == 1 and "--trunk PREFIX" in err
    assert "student_backbone, teacher_backbone" in err and not out.exists()
    code, printed, _ = convert([path, out, "--trunk", "teacher_backbone"], capsys)
    assert code == 0
    assert "second trunks dropped (--trunk takes one instead): student_backbone" in printed
    with open(out, "rb") as f:
        model = pickle.load(f)["model"]
    assert np.all(
        model["res5.2.conv3.weight"]
        == np.float32(releases.expected(TAKEN)["layer4.2.conv3.weight"])
    )


def test_a_partial_release_trunk_writes_nothing(tmp_path, capsys):
    checkpoint = releases.moco_v3()
    del checkpoint["state_dict"]["module.base_encoder.layer3.4.bn2.running_mean"]
    path = tmp_path / "moco_v3.pth.tar"
    torch.save(checkpoint, path)
    code, _, err = convert([path, tmp_path / "o.pkl"], capsys)
    assert code == 2 and "1 missing (layer3.4.bn2.running_mean); nothing written" in err
    assert os.listdir(tmp_path) == ["moco_v3.pth.tar"]


# ---- lincls ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from moco_d2.synthetic import make_synthetic_image_folder

    root = tmp_path_factory.mktemp("images")
    for split in ("train", "val"):
        make_synthetic_image_folder(root / split, num_images=4, size=32, num_classes=2)
    return root


def lincls_prepare(image_folder, pretrained, *flags):
    from moco_d2.lincls.main import LinclsConfig, prepare

    argv = [str(image_folder), "-a", "resnet50", "--pretrained", str(pretrained), *flags]
    return prepare(LinclsConfig.parse(argv))


def test_lincls_takes_the_same_trunk_and_the_trunk_flag(image_folder, tmp_path):
    path = tmp_path / "dino.ckpt"
    torch.save(releases.lightly_dino_example(), path)
    with pytest.raises(UserError, match="no rule says which one .*--trunk PREFIX"):
        lincls_prepare(image_folder, path)
    _, _, model, _ = lincls_prepare(image_folder, path, "--trunk", "teacher_backbone")
    assert_trunk({k: v for k, v in model.state_dict().items() if k in SHAPES}, TAKEN)


@pytest.mark.parametrize(
    "name, flags, mean, std",
    [
        ("simclr_v2", [], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        ("simclr_v1", ["--input-norm", "rgb01"], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        ("simclr_v1", [], IMAGENET_MEAN, IMAGENET_STD),
        ("moco_v2", [], IMAGENET_MEAN, IMAGENET_STD),
    ],
)
def test_lincls_normalises_as_the_weights_expect(image_folder, files, name, flags, mean, std):
    train_set, val_set, _, _ = lincls_prepare(image_folder, files[name], *flags)
    for dataset in (train_set, val_set):
        normalize = dataset.transform.transforms[-1]
        assert (tuple(normalize.mean), tuple(normalize.std)) == (mean, std)
