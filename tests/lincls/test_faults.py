"""tools/lincls.py on bad input, run as a user does: one line, exit 2, nothing lost."""

import json
import os

import pytest
import torch
import torchvision
from PIL import Image

from tools import assert_error, snapshot, tool


@pytest.fixture(scope="module")
def lincls_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lincls_data")
    for split, count in (("train", 4), ("val", 2)):
        for name, rgb in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            os.makedirs(root / split / name)
            for i in range(count):
                Image.new("RGB", (40, 40), rgb).save(root / split / name / f"{i}.png")
    return root


def lincls(data, out, *extra):
    return tool(
        "lincls.py", data, "-a", "resnet18", "-b", "4", "-j", "0", "--epochs", "1",
        "--crop-size", "32", "--resize", "36", "--device", "cpu", "--seed", "0",
        "--output-dir", out, *extra,
    )  # fmt: skip


def test_lincls_negative_lr(lincls_data, tmp_path):
    assert_error(lincls(lincls_data, tmp_path / "out", "--lr", "-1"), "--lr", "-1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--pretrained", "--resume"])
def test_lincls_random_bytes(lincls_data, tmp_path, flag):
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(os.urandom(4096))
    line = assert_error(lincls(lincls_data, tmp_path / "out", flag, junk), junk)
    assert "weights_only" not in line


def test_lincls_stops_on_a_nan_loss_and_writes_no_results(lincls_data, tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "broken.pth")
    result = lincls(lincls_data, tmp_path / "out", "--pretrained", tmp_path / "broken.pth")
    assert_error(result, "not finite", tmp_path / "broken.pth")
    assert not (tmp_path / "out" / "results.json").exists()


def test_lincls_nan_loss_under_multiprocessing_is_one_line(lincls_data, tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "broken.pth")
    result = lincls(
        lincls_data, tmp_path / "out", "--pretrained", tmp_path / "broken.pth",
        "--multiprocessing-distributed", "--nproc-per-node", "2",
    )  # fmt: skip
    assert_error(result, "not finite", tmp_path / "broken.pth")
    assert "ProcessExitedException" not in result.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_lincls_cleans_temporaries_writes_strict_json_and_resume_of_a_finished_run(
    lincls_data, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".checkpoint.pth.tar.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    (out / "notes.tmp").write_text("not ours")
    first = lincls(lincls_data, out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not stale.exists() and (out / "notes.tmp").exists()
    json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON

    before = snapshot(out)
    again = lincls(lincls_data, out, "--resume", out / "checkpoint.pth.tar")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout and snapshot(out) == before


def test_lincls_resume_given_a_pretraining_checkpoint(lincls_data, tmp_path):
    state = {
        "module.encoder_q." + k: v for k, v in torchvision.models.resnet18().state_dict().items()
    }
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state}, tmp_path / "moco.pth.tar")
    result = lincls(lincls_data, tmp_path / "out", "--resume", tmp_path / "moco.pth.tar")
    assert_error(result, tmp_path / "moco.pth.tar", "--pretrained")
