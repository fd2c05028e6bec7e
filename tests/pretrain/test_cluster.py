"""Pretraining as a submitit job: real processes through the local executor, interrupted with
the signal SLURM sends on preemption, requeued and resumed exactly; and the SLURM script
submitit would submit for the same job."""

import glob
import os
import time

import pytest
import torch
from submitit import JobEnvironment
from submitit.slurm.slurm import _make_sbatch_string

from moco_d2 import cluster
from moco_d2.config import ClusterFlags
from moco_d2.pretrain import job as pretrain_job
from moco_d2.pretrain import main as pretrain
from moco_d2.pretrain.config import PretrainConfig
from moco_d2.synthetic import make_synthetic_image_folder
from tools import assert_error, tool


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster") / "data"
    make_synthetic_image_folder(str(root / "train"), num_images=32, size=40)
    return root


def _argv(data, out, *extra):
    return [
        str(data), "-a", "resnet18", "-b", "8", "--moco-k", "32", "-j", "0", "--crop-size", "64",
        "--seed", "5", "--device", "cpu", "--epochs", "3", "--output-dir", str(out),
        "--dist-timeout", "60", *extra,
    ]  # fmt: skip


def preempt(job):
    """Send every task of a local job the signal SLURM sends on preemption or at the time limit
    (submitit's own ``_interrupt`` signals the local controller, which does not forward it)."""
    controller = job._process.pid
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == controller:  # the parent pid
            os.kill(int(stat.split("/")[2]), JobEnvironment._usr_sig())


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_two_tasks_interrupted_after_the_first_checkpoint_end_as_an_uninterrupted_run(
    data, tmp_path
):
    """Two ranks over gloo; the reference is the same two ranks spawned here."""
    reference = tmp_path / "reference"
    argv = _argv(data, reference, "--multiprocessing-distributed", "--nproc-per-node", "2")
    assert pretrain.main(argv) == 0

    out = tmp_path / "job"
    config = PretrainConfig.parse(_argv(data, out, "--launch", "local", "--nproc-per-node", "2"))
    job = pretrain_job.submit(config)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint_0000.pth.tar").exists():
        assert time.monotonic() < deadline and not job.done(), job.stderr(0)
        time.sleep(0.2)
    preempt(job)
    cluster.wait(job, "pretraining")

    log = (out / "log.txt").read_text()
    assert "resumed from" in log  # requeued, and resumed from its checkpoint
    expected = _weights(reference / "checkpoint_0002.pth.tar")
    for name, value in _weights(out / "checkpoint_0002.pth.tar").items():
        assert torch.equal(value, expected[name]), name


def test_the_slurm_job_script_holds_the_job_shape_and_parameters(tmp_path):
    flags = ClusterFlags(
        launch="slurm", partition="learnfair", nodes=2, gpus_per_node=8, timeout_min=4320,
        account="ssl", constraint="volta32gb", slurm_param=("qos=high", "mem=0"),
    )  # fmt: skip
    # one task (rank) per GPU: 8 GPUs per node on SLURM unless told otherwise
    assert flags.tasks_per_node == ClusterFlags(launch="slurm").tasks_per_node == 8
    assert ClusterFlags(launch="local").tasks_per_node == 1
    params = cluster.slurm_parameters(
        flags, tasks_per_node=flags.tasks_per_node, name="moco_pretrain"
    )
    script = _make_sbatch_string(
        command="python -m submitit.core._submit", folder=tmp_path, **params
    )
    for line in (
        "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=learnfair", "#SBATCH --account=ssl", "#SBATCH --constraint=volta32gb",
        "#SBATCH --time=4320", "#SBATCH --qos=high", "#SBATCH --mem=0",
        "#SBATCH --signal=USR2@120", "#SBATCH --job-name=moco_pretrain",
    ):  # fmt: skip
        assert line in script.splitlines(), line


def test_launch_slurm_without_sbatch_is_refused_before_anything_is_built(data, tmp_path):
    result = tool("pretrain_moco.py", *_argv(data, tmp_path / "out", "--launch", "slurm"))
    assert_error(result, "--launch slurm", "sbatch")
    assert not (tmp_path / "out").exists()
