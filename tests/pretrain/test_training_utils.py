"""moco_d2.training: schedules, meters, checkpoints and RNG state, against independent values."""

import argparse
import math
import random

import numpy as np
import pytest
import torch

from moco_d2.errors import UserError
from moco_d2.training import checkpoint as ckpt
from moco_d2.training import distributed, meters, schedule


def test_cosine_matches_released_formula():
    assert schedule.cosine_lr(0.03, 0, 200) == pytest.approx(0.03)
    assert schedule.cosine_lr(0.03, 100, 200) == pytest.approx(0.015)
    assert schedule.cosine_lr(0.03, 150, 200) == pytest.approx(
        0.03 * 0.5 * (1 + math.cos(math.pi * 0.75))
    )


def test_step_schedule_released_milestones():
    lrs = [schedule.step_lr(0.03, e, [120, 160]) for e in (0, 119, 120, 159, 160, 199)]
    assert lrs == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])


def test_adjust_learning_rate_sets_every_group():
    opt = torch.optim.SGD(
        [
            {"params": [torch.zeros(1, requires_grad=True)]},
            {"params": [torch.zeros(1, requires_grad=True)]},
        ],
        lr=1.0,
    )
    args = argparse.Namespace(lr=30.0, epochs=100, schedule=[60, 80], cos=False)
    assert schedule.adjust_learning_rate(opt, 80, args) == pytest.approx(0.3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.3])


def test_average_meter_and_accuracy():
    m = meters.AverageMeter("loss", ":.3f")
    m.update(2.0, n=3)
    m.update(4.0, n=1)
    assert m.avg == pytest.approx(2.5) and m.val == 4.0
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([1, 1, 0, 1])
    top1, top2 = meters.accuracy(output, target, topk=(1, 2))
    assert top1.item() == pytest.approx(25.0)  # only sample 0
    assert top2.item() == pytest.approx(75.0)  # samples 0, 1, 3


def test_checkpoint_roundtrip_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "epoch": 3,
        "arch": "resnet50",
        "state_dict": ckpt.add_module_prefix(model.state_dict()),
        "optimizer": opt.state_dict(),
        "rng": ckpt.get_rng_state(),
        "seed": 7,
    }
    path = ckpt.save_checkpoint(state, str(tmp_path), 2)
    assert path.endswith("checkpoint_0002.pth.tar")
    loaded = torch.load(path, weights_only=True)
    assert sorted(loaded["state_dict"]) == ["module.bias", "module.weight"]
    assert ckpt.latest_checkpoint(str(tmp_path)) == path
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(ckpt.strip_module_prefix(loaded["state_dict"]))
    assert torch.equal(restored.weight, model.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0002.pth.tar"]  # no temp file left


def test_rng_state_restores_every_generator(tmp_path):
    ckpt.seed_all(123)
    state = ckpt.get_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.atomic_torch_save({"rng": state}, str(tmp_path / "rng.pt"))
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.set_rng_state(torch.load(str(tmp_path / "rng.pt"), weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_latest_checkpoint_picks_highest_epoch(tmp_path):
    for epoch in (0, 9, 10):
        ckpt.save_checkpoint({"epoch": epoch + 1}, str(tmp_path), epoch)
    (tmp_path / "checkpoint_0099.pth.tar.tmp").write_text("")
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint_0010.pth.tar")
    assert ckpt.latest_checkpoint(str(tmp_path / "missing")) is None


def test_load_checkpoint_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        ckpt.load_checkpoint(str(tmp_path / "nope.pth.tar"))
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a readable PyTorch checkpoint"):
        ckpt.load_checkpoint(str(bad))


def test_single_process_launch_defaults():
    parser = argparse.ArgumentParser()
    distributed.add_distributed_arguments(parser)
    args = parser.parse_args(["--device", "cpu"])
    seen = distributed.launch(
        lambda local_rank, a: (local_rank, a.world_size, a.rank, a.distributed), args
    )
    assert seen == (None, 1, 0, False)
    assert distributed.init_process(None, args) == torch.device("cpu")
    with pytest.raises(UserError, match="--device"):
        distributed.resolve_device("tpu")


@pytest.mark.parametrize(
    "argv, env, local_rank",
    [
        (["--multiprocessing-distributed", "--world-size", "1", "--rank", "0"], {}, 0),
        (["--multiprocessing-distributed", "--nproc-per-node", "1"], {}, 0),
        ([], {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, 0),
    ],
)
def test_one_process_in_total_runs_here_without_a_process_group(monkeypatch, argv, env, local_rank):
    """The released one-GPU command and torchrun with one rank: no spawn (the worker is a lambda,
    which mp.spawn could not pickle), no process group, ``distributed`` False."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    distributed.add_distributed_arguments(parser)
    args = parser.parse_args(["--device", "cpu", *argv])
    seen = distributed.launch(
        lambda rank, a: (rank, a.world_size, a.rank, a.distributed, distributed.is_distributed()),
        args,
    )
    assert seen == (local_rank, 1, 0, False, False)
    assert distributed.procs_per_node(args) == 1
