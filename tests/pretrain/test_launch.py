"""The shared launcher: a process group that cannot form stops within --dist-timeout with one
line, and a UserError raised in a spawned worker ends the launch with its message, said once as
the tool's one line and exit 2 (an error that every rank meets too)."""

import argparse
import os
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
import torch

from moco_d2 import launch
from moco_d2.cli import USER_ERROR_EXIT
from moco_d2.config import TrainConfig
from moco_d2.errors import UserError
from moco_d2.synthetic import make_synthetic_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.mark.parametrize("tool", ["pretrain_moco.py", "lincls.py"])
def test_a_missing_rank_stops_within_the_timeout_with_one_line(tmp_path, tool):
    make_synthetic_image_folder(str(tmp_path / "data" / "train"), num_images=8, size=32)
    make_synthetic_image_folder(str(tmp_path / "data" / "val"), num_images=4, size=32)
    url = f"tcp://127.0.0.1:{launch.free_port()}"
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
    """``_run_within`` calls ``fn(device_ids=...)`` as it calls ``dist.barrier``."""
    never = threading.Event()
    with pytest.raises(TimeoutError, match="after 0.2 s"):
        launch._run_within(timedelta(seconds=0.2), lambda device_ids: never.wait(), None)
    with pytest.raises(ValueError, match="boom"):
        launch._run_within(timedelta(seconds=60), lambda device_ids: int("boom"), None)
    done = []
    launch._run_within(timedelta(seconds=60), lambda device_ids: done.append(device_ids), [1])
    assert done == [[1]]


def test_the_nccl_advice_names_the_variables_that_made_nccl_start_on_a_vm(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    config = TrainConfig(dist_timeout=600.0)
    here = launch.Launch(8, 3, 8, torch.device("cpu"), "env://")
    line = launch._no_group(config, here, "nccl", TimeoutError("no reply"))
    assert "--dist-url env:// (10.0.0.7:29500) (world size 8, rank 3, nccl)" in line
    assert "within --dist-timeout 600 s: no reply;" in line
    for variable in launch.NCCL_VM_VARS.split():
        assert variable in line
    assert "\n" not in line
    assert "NCCL_" not in launch._no_group(config, here, "gloo", TimeoutError("no reply"))


def _rank_1_fails(config, here):
    if here.rank == 1:
        raise UserError(f"bad input seen by rank {here.rank} of {here.world_size}")


def test_a_user_error_in_one_spawned_worker_ends_the_launch_with_its_message(capfd):
    """Two gloo processes spawned as --multiprocessing-distributed spawns them; rank 0 has
    finished well: the launcher raises rank 1's error, which no process printed."""
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    argv = ["data", "--device", "cpu", "--multiprocessing-distributed", "--nproc-per-node", "2"]
    with pytest.raises(UserError, match="^bad input seen by rank 1 of 2$"):
        launch.launch(_rank_1_fails, TrainConfig.from_args(parser.parse_args(argv)))
    assert "bad input" not in capfd.readouterr().err


def test_an_error_that_every_spawned_process_meets_is_one_line_and_exit_2(tmp_path):
    """The tool, as a user runs it: each rank refuses --moco-k for the global batch, once."""
    make_synthetic_image_folder(str(tmp_path / "data"), num_images=16, size=40, num_classes=2)
    command = [
        sys.executable,
        os.path.join(REPO, "tools", "pretrain_moco.py"),
        str(tmp_path / "data"),
    ]
    command += ["-a", "resnet18", "-b", "8", "--moco-k", "20", "-j", "0", "--crop-size", "64"]
    command += ["--device", "cpu", "--output-dir", str(tmp_path / "out")]
    command += ["--multiprocessing-distributed", "--nproc-per-node", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=ENV)
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "error: --moco-k 20 must be a multiple of the global batch 8"
    ], result.stderr[-3000:]
