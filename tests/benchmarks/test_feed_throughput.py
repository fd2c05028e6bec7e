"""benchmarks/feed_throughput.py measures DALI end to end through the fast mode's step and every
feed alone, in one process; where DALI is not installed it says so and measures the others.
Speed is not asserted; what the report holds is."""

import json
import os
import subprocess
import sys

import common
import feed_throughput

BN_SPLITS = 2  # the tool's default at batch 8, 64 px, ResNet-18 (as in test_throughput.py)


def _dali_installed():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def test_reports_dali_end_to_end_and_each_feed_alone(tmp_path):
    out = tmp_path / "feeds.json"
    command = [
        sys.executable, os.path.join(common.REPO, "benchmarks", "feed_throughput.py"),
        "--device", "cpu", "-a", "resnet18", "--crop-size", "64", "-b", "8", "-j", "1",
        "--num-images", "16", "--warmup", "1", "--iters", "1", "--e2e-iters", "2",
        "--moco-k", "64", "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and "each feed alone" in result.stdout
    if _dali_installed():
        assert report["dali_error"] is None
        dali = report["dali"]
        assert dali["img_per_s"] > 0 and dali["main_process_cpu_ms_per_img"] > 0
        assert (dali["bn_splits"], dali["amp"], dali["steps_per_epoch"]) == (BN_SPLITS, False, 2)
        assert list(report["feeds"]) == list(feed_throughput.FEEDS)
        assert report["summary"].startswith(f"DALI end to end {common.fmt(dali['img_per_s'])}")
    else:
        assert report["dali_error"].startswith("DALI not installed") and "dali" not in report
        assert list(report["feeds"]) == list(feed_throughput.FEEDS[:3])
        assert report["summary"].endswith(report["dali_error"])
    for feed in report["feeds"].values():
        assert feed["img_per_s"] > 0 and feed["main_process_cpu_ms_per_img"] > 0
