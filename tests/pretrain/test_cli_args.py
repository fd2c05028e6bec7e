"""The training flags shared by pretrain_moco.py and lincls.py: same names, same meaning."""

import argparse

import pytest

from moco_d2.errors import UserError
from moco_d2.lincls.main import build_parser as lincls_parser
from moco_d2.pretrain.main import build_parser as pretrain_parser
from moco_d2.training.cli_args import (
    non_negative_float,
    non_negative_int,
    per_process_batch,
    positive_float,
    positive_int,
)

SHARED = [
    "-a", "-j", "--epochs", "--start-epoch", "-b", "--lr", "--schedule", "--momentum", "--wd",
    "-p", "--resume", "--seed",
]  # fmt: skip


def options(parser):
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
    pretrain, lincls = options(pretrain_parser()), options(lincls_parser())
    for flag in SHARED:
        assert pretrain[flag].option_strings == lincls[flag].option_strings, flag
        assert pretrain[flag].type is lincls[flag].type, flag
    for flag in ("-b", "-j"):
        assert pretrain[flag].help.split(" (default")[0] == lincls[flag].help.split(" (default")[0]
    assert "one node" in lincls["-b"].help and "per process" in lincls["-j"].help
    # Per-tool defaults of the released scripts.
    assert (pretrain["--lr"].default, lincls["--lr"].default) == (0.03, 30.0)
    assert (pretrain["--schedule"].default, lincls["--schedule"].default) == ([120, 160], [60, 80])
    assert (pretrain["--wd"].default, lincls["--wd"].default) == (1e-4, 0.0)


def test_released_long_names_still_parse(tmp_path):
    args = lincls_parser().parse_args(
        [str(tmp_path), "--learning-rate", "10", "--weight-decay", "0.1", "--batch-size", "64"]
    )
    assert (args.lr, args.weight_decay, args.batch_size) == (10.0, 0.1, 64)


def test_per_process_batch():
    assert [per_process_batch(256, n) for n in (1, 2, 8)] == [256, 128, 32]
    with pytest.raises(UserError, match="-b 12 .* not divisible by its 8 processes"):
        per_process_batch(12, 8)
