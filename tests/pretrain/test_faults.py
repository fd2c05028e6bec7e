"""tools/pretrain_moco.py on bad input and its checkpoints on a full disk, run as a user does:
one line, exit 2."""

import os
import sys

import torch
import torchvision

from moco_d2.pretrain import MoCo
from moco_d2.synthetic import make_synthetic_image_folder
from tools import REPO, assert_error, on_full_disk, tool


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


def test_checkpoint_write_on_a_full_disk(tmp_path):
    """Pretraining checkpoints go through the same atomic writer."""
    script = (
        "from moco_d2.cli import run_tool; import sys; sys.argv[1:] = [sys.argv[1]]; "
        "run_tool('full_disk_writer')"
    )
    writer = tmp_path / "full_disk_writer.py"
    writer.write_text(
        "import torch\n"
        "from moco_d2.io import save_checkpoint\n"
        "def main(argv):\n"
        "    save_checkpoint({'epoch': 1, 'w': torch.ones(4)}, argv[0], 0)\n"
        "    save_checkpoint({'epoch': 2, 'w': torch.ones(2**20)}, argv[0], 0)\n"
    )
    result = on_full_disk(
        tmp_path,
        f'cd {tmp_path} && PYTHONPATH={REPO}:{tmp_path} {sys.executable} -c "{script}" $0; '
        f'rc=$?; {sys.executable} -c "import torch,sys; '
        "print(torch.load(sys.argv[1], weights_only=True)['epoch'])\" "
        "$0/checkpoint_0000.pth.tar; ls -A $0; exit $rc",
    )
    assert_error(result, "no space left", "checkpoint_0000.pth.tar")
    assert result.stdout.split() == ["1", "checkpoint_0000.pth.tar"]
