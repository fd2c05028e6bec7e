"""train_net reads the same release checkpoints as the converter and lincls (tests/releases.py
builds them; train_net converts them in memory), and refuses weights whose recorded input
normalisation the config does not give, with the options that fix it."""

import os
import shlex

import numpy as np
import pytest
import releases
import torch
from releases import RELEASES, SHAPES, TAKEN

from moco_d2.convert import tool, trunk
from moco_d2.detection import preflight, train_net
from moco_d2.detection.checkpoint import read_detectron2_file
from moco_d2.errors import UserError
from moco_d2.io import sha256_of
from moco_d2.lincls.loading import load_pretrained
from moco_d2.lincls.model import build_model
from moco_d2.trials import main as trials

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOC = os.path.join(REPO, "configs", "voc_R50_C4.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("releases")
    return {name: releases.save(directory, name) for name in RELEASES}


@pytest.fixture(scope="module")
def lincls_model():
    return build_model("resnet50", num_classes=10)


@pytest.mark.parametrize("name", list(RELEASES))
def test_lincls_and_train_net_read_the_same_tensors(files, lincls_model, name):
    load_pretrained(lincls_model, files[name], "resnet50")
    lincls = lincls_model.state_dict()
    data = read_detectron2_file(files[name])
    mapping = tool.checked_mapping(trunk.read_trunk(files[name]))
    assert set(data["model"]) == set(mapping.values())
    for tv, d2 in mapping.items():
        assert np.array_equal(data["model"][d2], lincls[tv].numpy()), d2
    expected = releases.expected(TAKEN)
    assert all(float(lincls[n].reshape(-1)[0]) == np.float32(expected[n]) for n in SHAPES)


def test_a_file_with_two_trunks_and_no_rule_is_refused_by_train_net(tmp_path):
    path = tmp_path / "dino.ckpt"
    torch.save(releases.lightly_dino_example(), path)
    with pytest.raises(UserError, match="no rule says which one .*give train_net the converted"):
        read_detectron2_file(str(path))


# ---- input normalisation ---------------------------------------------------------------------


def _cfg(*opts):
    return train_net.load_config(
        train_net.argument_parser().parse_args(["--config-file", VOC, *opts])
    )


@pytest.fixture(scope="module")
def simclr_pkl(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("simclr") / "simclr.pkl"
    assert tool.main([files["simclr_v2"], str(out)]) == 0
    return str(out)


@pytest.mark.parametrize("kind", ["converted", "raw"])
def test_train_net_refuses_other_normalisation_with_the_overrides(
    files, simclr_pkl, kind, tmp_path
):
    path = simclr_pkl if kind == "converted" else files["simclr_v2"]
    argv = ["--config-file", VOC, "MODEL.WEIGHTS", path, "MODEL.DEVICE", "cpu"]
    with pytest.raises(UserError) as e:
        train_net.main([*argv, "OUTPUT_DIR", str(tmp_path)])
    message = str(e.value)
    overrides = (
        'MODEL.PIXEL_MEAN "[0.0, 0.0, 0.0]" MODEL.PIXEL_STD "[255.0, 255.0, 255.0]" '
        "INPUT.FORMAT RGB"
    )
    assert message == (
        f"MODEL.WEIGHTS {path} expects RGB in [0, 1] with no mean/std (TF-trained SimCLR) "
        'input, but the config has MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]" '
        'MODEL.PIXEL_STD "[58.395, 57.12, 57.375]" INPUT.FORMAT RGB: add ' + overrides
    )
    assert not os.listdir(tmp_path)
    # The overrides it prints are the ones that pass.
    record = read_detectron2_file(path)[tool.NORMALISATION]
    preflight.check_input_normalisation(_cfg(*shlex.split(overrides)), path, record)


def test_imagenet_records_pass_the_protocol_configs_and_no_record_passes_any(files):
    record = read_detectron2_file(files["moco_v2"])[tool.NORMALISATION]
    assert record["expects"] == "imagenet"
    preflight.check_input_normalisation(_cfg(), files["moco_v2"], record)
    with pytest.raises(UserError, match="expects RGB with ImageNet mean/std"):
        preflight.check_input_normalisation(_cfg("INPUT.FORMAT", "BGR"), files["moco_v2"], record)
    assert tool.NORMALISATION not in read_detectron2_file(files["simclr_v1"])
    preflight.check_input_normalisation(_cfg("MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"), "x", None)


def test_fingerprint_of_a_raw_checkpoint_is_the_files(files, registered_voc):
    found = trials.fingerprint(VOC, ["MODEL.WEIGHTS", files["dino_full"]])
    assert found["weights_sha256"] == sha256_of(files["dino_full"])
