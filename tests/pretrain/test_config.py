"""The run configs of pretrain_moco.py and lincls.py: the released flags with the same meaning in
both tools, the lr schedules, the config as plain data, and the resume rules of ``diff``."""

import argparse
import dataclasses
import json
import math

import pytest
import torch

from moco_d2.cli import non_negative_float, non_negative_int, positive_float, positive_int
from moco_d2.config import per_process_batch
from moco_d2.errors import UserError
from moco_d2.launch import Launch, one_process
from moco_d2.lincls.main import LinclsConfig
from moco_d2.pretrain.config import PretrainConfig

CPU = torch.device("cpu")
SHARED = [
    "-a", "-j", "--epochs", "--start-epoch", "-b", "--lr", "--schedule", "--momentum", "--wd",
    "-p", "--resume", "--seed",
]  # fmt: skip


def options(config_class):
    parser = argparse.ArgumentParser()
    config_class.add_arguments(parser)
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize(
    "parse, good, bad",
    [
        (positive_int, [("1", 1), ("256", 256)], ["0", "-3", "2.5", "x"]),
        (non_negative_int, [("0", 0), ("7", 7)], ["-1", "1e3"]),
        (positive_float, [("0.03", 0.03), ("1e30", 1e30)], ["0", "-1", "nan?"]),
        (non_negative_float, [("0", 0.0), ("1e-4", 1e-4)], ["-0.1", ""]),
    ],
)
def test_types_accept_and_reject(parse, good, bad):
    assert [parse(text) for text, _ in good] == [value for _, value in good]
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_both_tools_share_the_released_flags_with_the_same_meaning():
    pretrain, lincls = options(PretrainConfig), options(LinclsConfig)
    for flag in SHARED:
        assert pretrain[flag].option_strings == lincls[flag].option_strings, flag
        assert pretrain[flag].dest == lincls[flag].dest, flag
        assert pretrain[flag].type is lincls[flag].type, flag
    for flag in ("-b", "-j"):
        assert pretrain[flag].help.split(" (default")[0] == lincls[flag].help.split(" (default")[0]
    assert "one node" in lincls["-b"].help and "per process" in lincls["-j"].help
    # Per-tool defaults of the released scripts.
    assert (pretrain["--lr"].default, lincls["--lr"].default) == (0.03, 30.0)
    assert (pretrain["--schedule"].default, lincls["--schedule"].default) == ([120, 160], [60, 80])
    assert (pretrain["--wd"].default, lincls["--wd"].default) == (1e-4, 0.0)


def test_released_long_names_still_parse(tmp_path):
    argv = [str(tmp_path), "--learning-rate", "10", "--weight-decay", "0.1", "--batch-size", "64"]
    for config_class in (PretrainConfig, LinclsConfig):
        config = config_class.parse(argv + ["--schedule", "5", "7"])
        assert (config.lr, config.weight_decay, config.batch_size) == (10.0, 0.1, 64)
        assert config.schedule == (5, 7)  # a tuple: the config is frozen all the way down


def test_parse_refuses_a_batch_that_the_processes_cannot_share(tmp_path):
    argv = [str(tmp_path), "-b", "9", "--multiprocessing-distributed", "--nproc-per-node", "2"]
    with pytest.raises(UserError, match=r"^-b 9 .* not divisible by its 2 processes"):
        PretrainConfig.parse(argv)


def test_per_process_batch():
    assert [per_process_batch(256, n) for n in (1, 2, 8)] == [256, 128, 32]
    with pytest.raises(UserError, match="-b 12 .* not divisible by its 8 processes"):
        per_process_batch(12, 8)


def test_cosine_matches_the_released_formula():
    config = PretrainConfig(lr=0.03, epochs=200)
    assert config.lr_at(0) == pytest.approx(0.03)
    assert config.lr_at(100) == pytest.approx(0.015)
    assert config.lr_at(150) == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 0.75)))


def test_step_schedule_at_the_released_milestones():
    steps = PretrainConfig(lr=0.03, schedule=(120, 160), cos=False)
    lrs = [steps.lr_at(e) for e in (0, 119, 120, 159, 160, 199)]
    assert lrs == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
    lincls = LinclsConfig()  # the released main_lincls.py: 30, times 0.1 at 60 and 80
    assert [lincls.lr_at(e) for e in (59, 60, 80)] == pytest.approx([30.0, 3.0, 0.3])


def _resolved(launch=None, seed=7, **flags):
    return PretrainConfig(**flags).resolved(launch or one_process(), seed)


def test_the_config_is_plain_data_that_survives_json_and_a_weights_only_load(tmp_path):
    config = _resolved(arch="resnet18", batch_size=16, crop_size=64, moco_k=64)
    saved = config.to_dict()
    assert saved["schedule"] == [120, 160] and saved["device"] == "auto"
    assert (saved["batch"], saved["global_batch"], saved["bn_splits"], saved["bn_group"]) == (
        16, 16, 4, 4,
    )  # fmt: skip
    assert json.loads(json.dumps(saved)) == saved
    torch.save({"config": saved}, tmp_path / "checkpoint.pth.tar")
    loaded = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["config"]
    assert loaded == saved
    assert config.diff(loaded) == ([], [])  # what a resume compares it with


def test_the_config_is_frozen():
    config = _resolved(arch="resnet18", batch_size=8, crop_size=64, moco_k=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0


def test_fixed_fields_are_refused_free_ones_allowed_and_the_rest_ignored():
    saved = _resolved().to_dict()
    now = _resolved(
        seed=8, lr=0.06, epochs=400, amp=True, workers=3, output_dir="elsewhere", knn_k=5
    )
    refused, allowed = now.diff(saved)
    assert refused == ["--lr 0.06 (checkpoint: 0.03)"]
    assert allowed == [
        "--epochs 400 (checkpoint: 200)",
        "--seed 8 (checkpoint: 7)",
        "--amp (checkpoint: --no-amp)",
    ]
    older = {k: v for k, v in saved.items() if k not in ("lr", "epochs")}  # an older version's
    assert now.diff(older) == ([], ["--seed 8 (checkpoint: 7)", "--amp (checkpoint: --no-amp)"])


def test_the_cosine_ignores_the_schedule():
    assert _resolved(schedule=(5,)).diff(_resolved().to_dict()) == ([], [])
    steps = _resolved(cos=False).to_dict()
    assert _resolved(cos=False, schedule=(5,)).diff(steps)[0] == [
        "--schedule 5 (checkpoint: 120 160)"
    ]


def test_more_processes_with_the_same_batchnorm_groups_may_resume():
    one = _resolved()  # one process of 256: 8 groups of 32
    eight_gpus = _resolved(Launch(8, 3, 8, torch.device("cpu")))  # 8 processes of 32
    assert (one.bn_splits, one.bn_group, eight_gpus.bn_splits, eight_gpus.bn_group) == (
        8,
        32,
        1,
        32,
    )
    assert eight_gpus.diff(one.to_dict()) == ([], [])
    four_groups = _resolved(bn_splits=4)
    assert four_groups.diff(one.to_dict())[0] == [
        "images per BatchNorm group (-b / --bn-splits / processes) 64 (checkpoint: 32)"
    ]
    two_nodes = _resolved(Launch(16, 0, 8, CPU))
    assert two_nodes.diff(eight_gpus.to_dict())[0] == [
        "global batch (-b x nodes) 512 (checkpoint: 256)"
    ]
