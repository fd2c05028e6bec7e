"""tools/convert-to-d2.py on a bad output path and a full disk, run as a user does: one line,
exit 2, and the earlier file intact."""

import os
import sys

import pytest
import torch
import torchvision

from tools import assert_error, on_full_disk, tool


@pytest.fixture(scope="module")
def resnet50_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


def test_converter_directory_as_output(resnet50_pth, tmp_path):
    (tmp_path / "out.pkl").mkdir()
    result = tool("convert-to-d2.py", resnet50_pth, tmp_path / "out.pkl")
    assert_error(result, tmp_path / "out.pkl", "is a directory")
    assert os.listdir(tmp_path / "out.pkl") == []


def test_converter_on_a_full_disk(resnet50_pth, tmp_path):
    result = on_full_disk(
        tmp_path,
        f"echo old > $0/moco.pkl && {sys.executable} tools/convert-to-d2.py {resnet50_pth} "
        "$0/moco.pkl; rc=$?; cat $0/moco.pkl; ls -A $0; exit $rc",
    )
    line = assert_error(result, "no space left", "moco.pkl")
    assert "nothing was written" in line
    assert result.stdout.split()[-2:] == ["old", "moco.pkl"]  # old file intact, no temporary
