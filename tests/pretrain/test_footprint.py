"""The plainest pretraining run stays small: the package code that one epoch of resnet18 on CPU
executes, measured with coverage, so that the story of a run stays readable in a few files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MAX_FILES = 15
# Statements of moco_d2 executed by the run (imports included): 955 measured, with the cluster
# flags; a regression guard, to be lowered as the package is trimmed towards 750.
BUDGET = 1000

# In a fresh interpreter: what the run imports and executes is its own, not what the tests run
# before it in the same session imported.
MEASURE = """
import json, sys
import coverage
package, data, out, report = sys.argv[1:]
cov = coverage.Coverage(data_file=None, include=[package + "/*"])
cov.start()
from moco_d2.pretrain.main import main
main([data, "-a", "resnet18", "-b", "8", "--moco-k", "32", "--epochs", "1", "--workers", "0",
      "--crop-size", "64", "--seed", "0", "--device", "cpu", "--output-dir", out])
cov.stop()
executed = {}
for path in cov.get_data().measured_files():
    _, statements, _, missing, _ = cov.analysis2(path)
    executed[path] = len(statements) - len(missing)
with open(report, "w") as f:
    json.dump({"executed": executed, "modules": sorted(sys.modules)}, f)
"""


def test_the_plainest_run_executes_few_files_and_statements(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.jpg")
    out, report = tmp_path / "out", tmp_path / "report.json"
    command = [sys.executable, "-c", MEASURE, str(ROOT / "moco_d2"), str(tmp_path / "data")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command += [str(out), str(report)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint_0000.pth.tar").exists()  # the whole run was measured
    measured = json.loads(report.read_text())
    executed, modules = measured["executed"], measured["modules"]
    statements = sum(executed.values())
    print(f"the plainest run executes {statements} statements in {len(executed)} package files")
    for path, count in sorted(executed.items()):
        print(f"{count:5d} {os.path.relpath(path, ROOT)}")
    assert len(executed) <= MAX_FILES, sorted(executed)
    assert not [m for m in modules if m == "detectron2" or m.startswith("detectron2.")]
    assert not [m for m in modules if m.startswith("moco_d2.pretrain.device_")]
    assert statements <= BUDGET
