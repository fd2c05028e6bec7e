"""`make demo` at micro scale (an end-to-end chain): every stage runs for real, and the report
is the comparison report of the trials it ran."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
from PIL import Image

from moco_d2.demo.main import ROWS
from moco_d2.synthetic import FAMILIES, make_synthetic_image_folder
from moco_d2.trials.compare import markdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MICRO = (
    "--device cpu --pretrain-images 16 --pretrain-epochs 2 --pretrain-batch 8 --moco-k 64 "
    "--knn-per-class 2 --det-train-images 4 --det-test-images 4 --max-iter 2 --trials 1"
)


def test_demo_runs_end_to_end_and_reports_the_trials_it_ran(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--output-dir", str(out)]
    result = subprocess.run(command + MICRO.split(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((out / "comparison.json").read_text())
    assert [row["name"] for row in report["rows"]] == list(ROWS.values())
    for folder, row in zip(ROWS, report["rows"]):
        with open(out / folder / "trial_0" / "metrics_voc.json") as f:
            (trial,) = json.load(f).values()
        assert {m: v["trials"] for m, v in row["metrics"].items()} == {
            m: [trial[m]] for m in ("AP", "AP50", "AP75")
        }
        assert 0 <= row["knn_top1"] <= 100
    # Every pair of rows, with one trial each: no interval, said so.
    assert len(report["pairs"]) == 3 * 3 and all(p["ci95"] is None for p in report["pairs"])
    demo = report["demo"]
    assert demo["budget"]["trials"] == 1 and len(demo["stage_minutes"]) == 5
    # MoCo's loss every --print-freq step; the control's every step: 2 epochs of 2 batches.
    assert [step for step, _ in demo["loss_by_step"]["supervised_demo"]] == [0, 1, 2, 3]

    text = (out / "report.md").read_text()
    assert markdown(report) in text and "kNN top-1" in text and markdown(report) in result.stdout
    assert "200 ImageNet epochs" in text and "4 steps here" in text
    for figure in ("comparison.png", "pretraining.png"):
        with Image.open(out / figure) as image:
            assert image.format == "PNG"
    # Both pretrained backbones converted to the complete trunk the converter promises.
    for name in ("moco_v2.pkl", "supervised.pkl"):
        with open(out / name, "rb") as f:
            assert len(pickle.load(f)["model"]) == 265


def test_a_class_is_a_shape_family_not_a_colour(tmp_path):
    """Nearest mean colour cannot name the class (it did when each class was a flat colour)."""
    root = make_synthetic_image_folder(str(tmp_path), 20 * len(FAMILIES), 32, 0, len(FAMILIES))
    folders = sorted(os.listdir(root))
    assert [f.split("_", 2)[2] for f in folders] == list(FAMILIES)
    colours, labels = [], []
    for label, folder in enumerate(folders):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            with Image.open(os.path.join(root, folder, name)) as image:
                colours.append(np.asarray(image, dtype=np.float64).mean(axis=(0, 1)))
            labels.append(label)
    x, y = np.stack(colours), np.array(labels)
    train, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    centroids = np.stack([x[train & (y == c)].mean(0) for c in range(len(FAMILIES))])
    predicted = ((x[test, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == y[test]).mean() < 0.3  # chance is 1/8
