"""benchmarks/decode_host_cost.py: both worker paths and the training process's receive timed,
table and JSON consistent."""

import json
import os
import subprocess
import sys

import common
import pytest


def test_decode_host_cost_reports_both_paths_and_the_receive(tmp_path):
    out = tmp_path / "cost.json"
    argv = ["--num-images", "3", "--rounds", "1", "--crop-size", "64", "--json", str(out)]
    argv += ["-b", "4", "-j", "1", "--receive-batches", "3", "--wait", "0.2"]
    script = os.path.join(common.REPO, "benchmarks", "decode_host_cost.py")
    result = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["images"] == 3 and report["crop_size"] == 64
    assert report["loader_ms_per_img"] > 0 and report["device_ms_per_img"] > 0
    ratio = report["device_ms_per_img"] / report["loader_ms_per_img"]
    assert abs(report["device_over_loader"] - ratio) < 1e-12
    assert f"| loader | {common.fmt(report['loader_ms_per_img'])} |" in result.stdout
    # 4 generated files make one batch of 4 an epoch: 3 batches over 3 epochs, one iterator
    assert report["batch_size"] == 4 and report["workers"] == 1 and report["device"] == "cpu"
    each = report["receive_ms_per_img_each"]
    assert report["receive_batches"] == len(each) == len(report["receive_wall_ms_per_batch"]) == 3
    assert report["receive_ms_per_img"] == pytest.approx(sum(each) / 3) and min(each) > 0
    receive = f"| device (training process, receive) | {common.fmt(report['receive_ms_per_img'])} |"
    assert receive in result.stdout
    assert report["decode_ms_per_img"] > 0 and report["decode_cpu_ms_per_img"] > 0
    assert f"decode on cpu: {common.fmt(report['decode_ms_per_img'])} ms/img wall" in result.stdout
    decode = f"decode {common.fmt(report['decode_ms_per_img'])} ms/img, receive "
    assert report["summary"] == decode + f"{common.fmt(report['receive_ms_per_img'])} ms/img CPU"
