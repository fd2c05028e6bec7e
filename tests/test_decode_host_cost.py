"""benchmarks/decode_host_cost.py: both worker paths timed, table and JSON consistent."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_host_cost_reports_both_paths(tmp_path):
    out = tmp_path / "cost.json"
    argv = ["--num-images", "3", "--rounds", "1", "--crop-size", "32", "--json", str(out)]
    script = os.path.join(REPO, "benchmarks", "decode_host_cost.py")
    result = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["images"] == 3 and report["crop_size"] == 32
    assert report["loader_ms_per_img"] > 0 and report["device_ms_per_img"] > 0
    ratio = report["device_ms_per_img"] / report["loader_ms_per_img"]
    assert abs(report["device_over_loader"] - ratio) < 1e-12
    assert f"| loader | {report['loader_ms_per_img']:.3f} |" in result.stdout
