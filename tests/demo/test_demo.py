"""`make demo` at micro scale: every stage runs for real and the report agrees with the runs."""

import json
import os
import subprocess
import sys

from PIL import Image

from moco_d2 import demo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_runs_end_to_end_and_reports_what_the_runs_measured(tmp_path):
    out = tmp_path / "demo"
    command = [
        sys.executable,
        os.path.join(REPO, "tools", "demo.py"),
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--pretrain-images",
        "16",
        "--pretrain-epochs",
        "2",
        "--pretrain-batch",
        "8",
        "--crop-size",
        "64",
        "--moco-k",
        "64",
        "--det-train-images",
        "4",
        "--det-test-images",
        "4",
        "--max-iter",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())["results"]
    for _, key in demo.RUNS:
        with open(out / f"detection_{key}" / "metrics_voc.json") as f:
            assert results[key] == json.load(f)["voc_2007_test"]
    # The printed table and the report carry the runs' numbers.
    table = demo.table(results)
    assert table in result.stdout
    report = (out / "report.md").read_text()
    assert table in report and "2 iterations of Faster R-CNN" in report
    # ... and say what one run cannot show
    assert f"What it does not show: that pretraining helps. {demo.CAVEAT}" in report
    assert demo.CAVEAT in result.stdout

    # Pretraining logged every iteration (2 epochs x 2 batches) for the figure.
    steps, losses = demo._pretrain_losses(str(out / "pretrain"))
    assert steps == [0, 1, 2, 3] and all(loss > 0 for loss in losses)
    with Image.open(out / "demo.png") as image:
        assert image.format == "PNG" and image.width > 1000

    # The converted weights are the complete trunk the converter promises.
    import pickle

    with open(out / "moco_r50_demo.pkl", "rb") as f:
        assert len(pickle.load(f)["model"]) == 265
