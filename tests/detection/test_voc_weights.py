"""train_net refuses weights that would leave part of the backbone at random init."""

import pickle

import pytest
from transfer_tiny import TINY_OPTS

import moco_d2.detection  # noqa: F401  (compat shims and registrations before detectron2)
from moco_d2.detection import train_net
from moco_d2.errors import UserError


def train(weights, output_dir):
    train_net.main(
        [
            "--config-file",
            "configs/voc_R50_C4.yaml",
            "MODEL.WEIGHTS",
            str(weights),
            *TINY_OPTS,
            "SOLVER.MAX_ITER",
            "1",
            "OUTPUT_DIR",
            str(output_dir),
        ]
    )


def test_partial_backbone_weights_are_refused(converted_weights, registered_voc, tmp_path):
    with open(converted_weights, "rb") as f:
        data = pickle.load(f)
    del data["model"]["res4.2.conv2.weight"]  # one trunk tensor short
    partial = tmp_path / "partial.pkl"
    with open(partial, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(UserError, match=r"res4\.2\.conv2\.weight"):
        train(partial, tmp_path / "out")
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_placeholder_and_missing_weights_are_refused(registered_voc, tmp_path):
    with pytest.raises(UserError, match="MODEL.WEIGHTS file not found: 'See Instructions'"):
        train_net.main(["--config-file", "configs/voc_R50_C4.yaml", *TINY_OPTS])
    with pytest.raises(UserError, match="nowhere.pkl"):
        train(tmp_path / "nowhere.pkl", tmp_path / "out")


def test_config_mistakes_are_user_errors():
    with pytest.raises(UserError, match="config file not found"):
        train_net.main(["--config-file", "configs/nope.yaml"])
    with pytest.raises(UserError, match="MODEL.NOT_A_KEY"):
        train_net.main(["--config-file", "configs/voc_R50_C4.yaml", "MODEL.NOT_A_KEY", "1"])
