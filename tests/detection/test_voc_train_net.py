"""End to end: tools/train_net.py fine-tunes converted weights on a tiny synthetic VOC tree,
prints and writes AP/AP50/AP75, and resumes under torch.load's weights_only default, only with
the input normalisation its checkpoints were trained with."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from transfer_tiny import TINY_OPTS

import moco_d2.detection  # noqa: F401  (compat shims and registrations before detectron2)
from moco_d2.convert.tool import NORMALISATION
from moco_d2.detection import train_net as train_net_tool
from moco_d2.detection.data.voc import CLASS_NAMES, load_voc_instances
from moco_d2.detection.evaluation import METRICS_FILE
from moco_d2.errors import UserError

# TF-trained SimCLR's input (RGB in [0, 255] / 255), not the config's ImageNet mean/std.
RGB01 = ["MODEL.PIXEL_MEAN", "[0.0, 0.0, 0.0]", "MODEL.PIXEL_STD", "[255.0, 255.0, 255.0]"]


def train_net(root, *args):
    env = {**os.environ, "DETECTRON2_DATASETS": str(root)}
    return subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", "configs/voc_R50_C4.yaml", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def two_iterations(root, weights, out, opts=TINY_OPTS):
    """A 2-iteration run from ``weights`` into ``out``, evaluated at the end."""
    return train_net(
        root, "MODEL.WEIGHTS", str(weights), *opts, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)
    )


@pytest.mark.slow
def test_train_evaluate_and_resume(synthetic_voc_root, converted_weights, tmp_path):
    out = tmp_path / "out"
    opts = [*TINY_OPTS, *RGB01, "SOLVER.CHECKPOINT_PERIOD", "1"]
    first = two_iterations(synthetic_voc_root, converted_weights, out, opts)
    assert first.returncode == 0, first.stderr[-3000:]
    printed = re.search(r"voc_2007_test: AP (\S+)  AP50 (\S+)  AP75 (\S+)", first.stdout)
    assert printed, first.stdout[-3000:]
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert set(metrics) == {"voc_2007_test"}
    values = metrics["voc_2007_test"]
    assert set(values) == {"AP", "AP50", "AP75", "per_class", "undefined"}
    assert all(math.isfinite(values[k]) and 0 <= values[k] <= 100 for k in ("AP", "AP50", "AP75"))
    # The classes absent from the synthetic test split have no AP.
    test_split = load_voc_instances(str(synthetic_voc_root / "VOC2007"), "test")
    present = {CLASS_NAMES[a["category_id"]] for d in test_split for a in d["annotations"]}
    nulls = {c for c, v in values["per_class"].items() if v["AP"] is None}
    assert nulls == set(CLASS_NAMES) - present
    assert {u["class"] for u in values["undefined"]} == nulls
    assert [f"{values[k]:.2f}" for k in ("AP", "AP50", "AP75")] == list(printed.groups())
    log = (out / "log.txt").read_text()
    assert "Running precise-BN for 2 iterations" in log
    assert "Starting training from iteration 0" in log

    # torch >= 2.6 loads with weights_only=True by default; Detectron2's checkpoint must pass.
    assert int(torch.__version__.split(".")[0]) >= 2
    state = torch.load(out / "model_final.pth")
    assert state["iteration"] == 1 and state["trainer"]["iteration"] == 1
    assert state["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 2
    optimizer = state["trainer"]["_trainer"]["optimizer"]
    momentum = [s["momentum_buffer"] for s in optimizer["state"].values()]
    assert momentum and all(m.abs().sum() > 0 for m in momentum[:5])
    for name in ("model_0000000.pth", "model_0000001.pth", "model_final.pth"):
        record = torch.load(out / name)[NORMALISATION]
        assert [record[k] for k in RGB01[::2]] == [[0.0] * 3, [255.0] * 3], name

    # Without the normalisation it was trained with, each way of loading it stops before launch.
    final = out / "model_final.pth"
    config = ["--config-file", "configs/voc_R50_C4.yaml", *TINY_OPTS, "OUTPUT_DIR", str(out)]
    weights = ["MODEL.WEIGHTS", str(final)]
    for flags, extra, names in [
        (["--resume"], [], f"--resume ({out / 'last_checkpoint'}) {final}"),
        (["--eval-only"], weights, f"MODEL.WEIGHTS {final}"),
        ([], weights, f"MODEL.WEIGHTS {final}"),
    ]:
        with pytest.raises(UserError) as e:
            train_net_tool.main([*flags, *config, *extra])
        assert str(e.value) == (
            f"{names} expects its training run's input, but the config has MODEL.PIXEL_MEAN "
            '"[123.675, 116.28, 103.53]" MODEL.PIXEL_STD "[58.395, 57.12, 57.375]" INPUT.FORMAT '
            'RGB: add MODEL.PIXEL_MEAN "[0.0, 0.0, 0.0]" MODEL.PIXEL_STD "[255.0, 255.0, 255.0]" '
            "INPUT.FORMAT RGB"
        )
    second = train_net(
        synthetic_voc_root, "--resume", *opts, "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Starting training from iteration 2" in (out / "log.txt").read_text()
    assert torch.load(out / "model_final.pth")["iteration"] == 2


def test_user_error_is_one_line(tmp_path):
    result = train_net(tmp_path, "MODEL.WEIGHTS", str(tmp_path / "none.pkl"), "MODEL.DEVICE", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: MODEL.WEIGHTS file not found")
    assert "Traceback" not in result.stderr


def test_missing_dataset_folder_fails_before_training_starts(tmp_path):
    out = tmp_path / "out"
    result = train_net(
        tmp_path / "no_datasets", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: VOC folder not found: {tmp_path / 'no_datasets' / 'VOC2007'}; set "
        "DETECTRON2_DATASETS to the folder holding VOC2007/ and VOC2012/ (datasets/README.md)"
    ]
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_keeps_sync_bn(synthetic_voc_root, converted_weights, tmp_path):
    out = tmp_path / "out"
    opts = [o if o != "cpu" else "cuda" for o in TINY_OPTS]
    result = two_iterations(synthetic_voc_root, converted_weights, out, opts)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NORM: SyncBN" in (out / "config.yaml").read_text()
    assert set(json.loads((out / METRICS_FILE).read_text())["voc_2007_test"]) == {
        "AP",
        "AP50",
        "AP75",
        "per_class",
        "undefined",
    }
