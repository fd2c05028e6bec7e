"""Training checkpoints and RNG state on disk, and the launches of one process in total."""

import argparse
import random

import numpy as np
import pytest
import torch

from moco_d2 import io
from moco_d2.config import TrainConfig
from moco_d2.errors import UserError
from moco_d2.launch import (
    Launch,
    is_distributed,
    launch,
    one_process,
    procs_per_node,
    resolve_device,
)

CPU = torch.device("cpu")


def test_a_checkpoint_round_trips_in_the_released_layout(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "epoch": 3,
        "arch": "resnet50",
        "state_dict": io.add_module_prefix(model.state_dict()),
        "optimizer": opt.state_dict(),
        "rng": io.get_rng_state(),
        "seed": 7,
    }
    path = io.save_checkpoint(state, str(tmp_path), 2)
    assert path == str(tmp_path / "checkpoint_0002.pth.tar")
    loaded = torch.load(path, weights_only=True)
    assert sorted(loaded["state_dict"]) == ["module.bias", "module.weight"]
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(io.strip_module_prefix(loaded["state_dict"]))
    assert torch.equal(restored.weight, model.weight) and torch.equal(restored.bias, model.bias)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0002.pth.tar"]  # no temporary left


def test_the_latest_checkpoint_is_the_highest_epoch_and_temporaries_are_not_checkpoints(tmp_path):
    for epoch in (0, 9, 10):
        io.save_checkpoint({"epoch": epoch + 1}, str(tmp_path), epoch)
    stale = tmp_path / ".checkpoint_0099.pth.tar.0123abcd.tmp"  # what a killed write leaves
    stale.write_text("")
    assert io.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_0010.pth.tar")
    assert io.remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_0000.pth.tar", "checkpoint_0009.pth.tar", "checkpoint_0010.pth.tar",
    ]  # fmt: skip
    with pytest.raises(UserError, match="holds a list, not a checkpoint dict"):
        torch.save([1, 2], tmp_path / "list.pth.tar")
        io.load_checkpoint(str(tmp_path / "list.pth.tar"))


def test_rng_state_restores_every_generator(tmp_path):
    io.seed_all(123)
    state = io.get_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    io.atomic_torch_save({"rng": state}, str(tmp_path / "rng.pt"))
    random.random(), np.random.rand(), torch.rand(1)
    io.set_rng_state(torch.load(str(tmp_path / "rng.pt"), weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _config(*argv):
    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    return TrainConfig.from_args(parser.parse_args(["data", "--device", "cpu", *argv]))


@pytest.mark.parametrize(
    "argv, env",
    [
        ([], {}),
        (["--multiprocessing-distributed", "--world-size", "1", "--rank", "0"], {}),
        (["--multiprocessing-distributed", "--nproc-per-node", "1"], {}),
        ([], {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}),
    ],
)
def test_one_process_in_total_runs_here_without_a_process_group(monkeypatch, argv, env):
    """The plain command, the released one-GPU command and torchrun with one rank: no spawn (the
    worker is a lambda, which mp.spawn could not pickle) and no process group."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = _config(*argv)
    seen = []
    launch(lambda c, here: seen.append((c, here, is_distributed())), config)
    [(given, here, grouped)] = seen
    assert given is config and not grouped
    assert (here.world_size, here.rank, here.procs_per_node, here.device) == (1, 0, 1, CPU)
    assert procs_per_node(config) == 1


def test_a_launch_knows_its_place():
    here = one_process()
    assert (here.distributed, here.is_main, here.device) == (False, True, CPU)
    other = Launch(4, 3, 2, CPU)
    assert (other.distributed, other.is_main) == (True, False)
    assert resolve_device("cpu") == CPU
    with pytest.raises(UserError, match="^--device 'tpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
