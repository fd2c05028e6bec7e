"""The shared launcher: a process group that cannot form stops within --dist-timeout with one
line, and a UserError raised in a spawned worker reaches the launching process as itself."""

import argparse
import os
import subprocess
import sys
import threading
from datetime import timedelta

import pytest

from moco_d2.synthetic import make_synthetic_image_folder
from moco_d2.pretrain.health import TrainingDiverged
from moco_d2.training import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.mark.parametrize("tool", ["pretrain_moco.py", "lincls.py"])
def test_a_missing_rank_stops_within_the_timeout_with_one_line(tmp_path, tool):
    make_synthetic_image_folder(str(tmp_path / "data" / "train"), num_images=8, size=32)
    make_synthetic_image_folder(str(tmp_path / "data" / "val"), num_images=4, size=32)
    url = f"tcp://127.0.0.1:{distributed.free_port()}"
    command = [sys.executable, os.path.join(REPO, "tools", tool), str(tmp_path / "data")]
    command += ["-a", "resnet18", "-b", "4", "-j", "0", "--epochs", "1", "--device", "cpu"]
    command += ["--output-dir", str(tmp_path / "out"), "--world-size", "2", "--rank", "0"]
    command += ["--dist-url", url, "--dist-timeout", "5"]
    # Generous: the tool's imports are slow on a busy machine; a hang fails here, not forever.
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=ENV)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: could not form the process group at --dist-url {url} "), line
    assert "(world size 2, rank 0, gloo) within --dist-timeout 5 s: " in line
    assert "1/2 clients joined" in line  # torch's own reason: it waited, and nobody came
    assert "check that every other rank started" in line
    assert not (tmp_path / "out" / "checkpoint_0000.pth.tar").exists()


def test_a_blocked_first_collective_is_a_timeout_not_a_hang():
    never = threading.Event()
    with pytest.raises(TimeoutError, match="after 0.2 s"):
        distributed._run_within(timedelta(seconds=0.2), never.wait)
    with pytest.raises(ValueError, match="boom"):
        distributed._run_within(timedelta(seconds=60), int, "boom")
    done = []
    distributed._run_within(timedelta(seconds=60), done.append, 1)
    assert done == [1]


def test_the_nccl_advice_names_the_variables_that_made_nccl_start_on_a_vm(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    args = argparse.Namespace(dist_url="env://", world_size=8, rank=3, dist_timeout=600.0)
    line = distributed._no_group(args, "nccl", TimeoutError("no reply"))
    assert "--dist-url env:// (10.0.0.7:29500) (world size 8, rank 3, nccl)" in line
    assert "within --dist-timeout 600 s: no reply;" in line
    for variable in distributed.NCCL_VM_VARS.split():
        assert variable in line
    assert "\n" not in line
    assert "NCCL_" not in distributed._no_group(args, "gloo", TimeoutError("no reply"))


def _diverges(local_rank, args):
    raise TrainingDiverged(f"loss is nan at rank {args.rank}")


def _spawn_args():
    return argparse.Namespace(
        multiprocessing_distributed=True,
        nproc_per_node=2,
        world_size=1,
        rank=0,
        dist_url="tcp://127.0.0.1:1",  # never used: the workers fail before joining
        device="cpu",
    )


def test_a_user_error_in_a_spawned_worker_is_raised_in_the_launcher_as_itself():
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at rank [01]$"):
        distributed.launch(_diverges, _spawn_args())
