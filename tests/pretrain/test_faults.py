"""tools/pretrain_moco.py on bad input, run as a user does: one line, exit 2."""

import os

import torch
import torchvision

from moco_d2.pretrain import MoCo
from moco_d2.synthetic import make_synthetic_image_folder
from tools import assert_error, tool


def pretrain(data, out, *extra):
    return tool(
        "pretrain_moco.py", data, "-a", "resnet18", "-b", "8", "--moco-k", "16",
        "--workers", "0", "--crop-size", "64", "--epochs", "1", "--device", "cpu",
        "--output-dir", out, *extra,
    )  # fmt: skip


def test_pretrain_folder_of_only_corrupt_images(tmp_path):
    folder = tmp_path / "data" / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(b"not an image")
    result = pretrain(tmp_path / "data", tmp_path / "out")
    assert_error(result, "no readable image", tmp_path / "data")


def test_pretrain_resume_random_bytes_and_mismatch(tmp_path):
    make_synthetic_image_folder(str(tmp_path / "data" / "train"), num_images=8, size=40)
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(os.urandom(4096))
    assert_error(pretrain(tmp_path / "data", tmp_path / "out", "--resume", junk), junk)

    model = MoCo(torchvision.models.resnet18, dim=128, K=16, mlp=True)
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    checkpoint = tmp_path / "checkpoint_0000.pth.tar"
    torch.save(
        {"epoch": 1, "arch": "resnet18", "state_dict": state, "optimizer": optimizer.state_dict()},
        checkpoint,
    )
    result = pretrain(
        tmp_path / "data", tmp_path / "out", "--resume", checkpoint, "--moco-dim", "64"
    )
    line = assert_error(result, checkpoint, "size mismatch")
    assert "encoder_q.fc" in line  # the detail after "Error(s) in loading state_dict for MoCo:"
