"""Numerical health: degenerate BatchNorm groups refused at start, exploding weights stopped at
run time with the last checkpoint intact, norms logged to TensorBoard."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moco_d2.errors import UserError
from moco_d2.pretrain import MoCo
from moco_d2.synthetic import make_synthetic_image_folder
from moco_d2.pretrain.health import (
    MIN_BN_VALUES,
    HealthMonitor,
    TrainingDiverged,
    last_stage_positions,
)
from moco_d2.pretrain.setup import resolve_bn_splits

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "pretrain_moco.py")]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("health_data")
    make_synthetic_image_folder(str(root / "train"), num_images=16, size=40, seed=0, num_classes=2)
    return root


def _run(args):
    return subprocess.run(TOOL + args, env=ENV, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(
    "arch, crop, positions",
    [("resnet50", 224, 49), ("resnet50", 32, 1), ("resnet18", 64, 4), ("resnet18", 100, 16)],
)
def test_last_stage_positions_are_the_res5_grid(arch, crop, positions):
    # torchvision ResNets downsample by 32 with rounding up: 224 -> 7x7, 100 -> 4x4
    assert last_stage_positions(torchvision.models.__dict__[arch], crop) == positions


def test_default_bn_splits_keep_enough_values_per_channel():
    assert resolve_bn_splits(None, 256, False, 49, 224) == 8  # unchanged for the real recipe
    assert resolve_bn_splits(None, 16, False, 4, 64) == 4  # 4 images x 4 positions
    assert resolve_bn_splits(None, 32, False, 1, 32) == 2  # not 8: 4 images x 1 position
    with pytest.raises(UserError, match=r"2 images per group x 4 .* = 8 values .*fewer --bn-s"):
        resolve_bn_splits(4, 8, False, 4, 64)


def test_degenerate_bn_groups_are_refused_before_training(data_dir, tmp_path):
    out = tmp_path / "out"
    result = _run(
        [str(data_dir), "-a", "resnet50", "-b", "8", "--crop-size", "32", "--device", "cpu"]
        + ["--output-dir", str(out), "--workers", "0"]
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        "error: BatchNorm groups too small: 8 images per group x 1 last-stage positions at "
        f"--crop-size 32 = 8 values per channel (need >= {MIN_BN_VALUES}); use a larger "
        "--crop-size or a larger -b"
    )
    assert not list(out.glob("checkpoint_*"))


def _tiny(data, out, *extra):
    return [str(data), "-a", "resnet18", "-b", "8", "--moco-k", "16", "--workers", "0"] + [
        "--crop-size",
        "64",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
        *extra,
    ]


def test_exploding_weights_stop_the_run_and_keep_the_last_checkpoint(data_dir, tmp_path):
    out = tmp_path / "out"
    first = _run(_tiny(data_dir, out, "--epochs", "1", "-p", "1"))
    assert first.returncode == 0, first.stderr[-3000:]
    # A run at lr 1e5 whose first epoch ended healthy: --resume refuses another --lr, so the
    # checkpoint's record says 1e5.
    path = out / "checkpoint_0000.pth.tar"
    state = torch.load(path, weights_only=True)
    state["train"]["lr"] = 1e5
    torch.save(state, path)
    good = path.read_bytes()

    # lr 1e5: the features are L2-normalised, so the loss stays finite while weights explode
    result = _run(
        _tiny(data_dir, out, "--epochs", "2", "-p", "1", "--resume", str(out), "--lr", "1e5")
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: weights exploded at epoch 1, iteration "), result.stderr[-3000:]
    assert "the last checkpoint is intact" in last and "non-finite" not in last
    assert (out / "checkpoint_0000.pth.tar").read_bytes() == good
    assert not (out / "checkpoint_0001.pth.tar").exists()

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/param_norm", "train/grad_norm", "train/loss"} <= set(tags)
    norms = [e.value for e in events.Scalars("train/param_norm")]
    assert all(v > 0 for v in norms) and len(norms) >= 2


def _model():
    torch.manual_seed(0)
    model = MoCo(torchvision.models.resnet18, K=16)
    return model, HealthMonitor(model, model.encoder_q)


def test_health_monitor_passes_a_fresh_model_and_reports_norms():
    model, health = _model()
    scalars = health.check("now")
    expected = torch.stack([p.detach().norm() for p in model.encoder_q.parameters()]).norm()
    assert scalars["param_norm"] == pytest.approx(expected.item(), rel=1e-5)
    assert scalars["grad_norm"] == 0.0


@pytest.mark.parametrize("fault", ["weight", "running_var", "nan"])
def test_health_monitor_stops_exploded_weights_and_bn_statistics(fault):
    model, health = _model()
    with torch.no_grad():
        if fault == "weight":
            model.encoder_q.conv1.weight.mul_(1e4)
        elif fault == "running_var":
            model.encoder_k.layer4[1].bn2.running_var[3] = 1e12
        else:
            model.encoder_q.fc[0].bias[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="weights exploded at iteration 9"):
        health.check("at iteration 9")
