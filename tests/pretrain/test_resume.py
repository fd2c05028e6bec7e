"""pretrain_moco.py --resume keeps the run it resumes: run-defining settings that differ from the
checkpoint's config are refused on one line (an earlier version's checkpoint too), a finished run
has nothing to do, and --start-epoch past --epochs is refused."""

import copy
import json
import math
import shutil

import pytest
import torch

from moco_d2 import io
from moco_d2.errors import UserError
from moco_d2.launch import one_process
from moco_d2.pretrain import main as pretrain
from moco_d2.pretrain.config import PretrainConfig
from moco_d2.synthetic import make_synthetic_image_folder


def _config(seed=7, **flags):
    return PretrainConfig(**flags).resolved(one_process(), seed)


def _checkpoint(**flags):
    config = _config(**flags)
    return {
        "epoch": 10,
        "arch": config.arch,
        "state_dict": {},
        "optimizer": {},
        "config": config.to_dict(),
    }


def test_every_difference_is_listed_on_one_line():
    state = _checkpoint()
    now = _config(
        moco_t=0.07, aug_plus=False, crop_size=160, lr=0.06, arch="resnet18", batch_size=512
    )
    with pytest.raises(UserError) as raised:
        pretrain.check_resume(now, state, "ck.pth.tar")
    listed = [
        "--arch resnet18 (checkpoint: resnet50)",
        "--lr 0.06 (checkpoint: 0.03)",
        "--crop-size 160 (checkpoint: 224)",
        "--moco-t 0.07 (checkpoint: 0.2)",
        "--no-aug-plus (checkpoint: --aug-plus)",
        "global batch (-b x nodes) 512 (checkpoint: 256)",
        "images per BatchNorm group (-b / --bn-splits / processes) 64 (checkpoint: 32)",
    ]
    message = str(raised.value)
    assert message.startswith(
        "--resume ck.pth.tar: the run was started with other settings: " + ", ".join(listed) + "; "
    )
    assert "\n" not in message


def test_allowed_changes_are_logged_and_recorded_and_the_record_accumulates(caplog):
    state = {**_checkpoint(), "resume_changes": [{"epoch": 5, "changes": ["--amp"]}]}
    history = pretrain.check_resume(_config(seed=8, epochs=400, amp=True), state, "c")
    assert history == [
        {"epoch": 5, "changes": ["--amp"]},
        {"epoch": 10, "changes": ["--epochs 400 (checkpoint: 200)", "--seed 8 (checkpoint: 7)",
                                  "--amp (checkpoint: --no-amp)"]},
    ]  # fmt: skip
    assert "keep what is trained but not bit-exactness: --epochs 400" in caplog.text
    assert state["resume_changes"] == [{"epoch": 5, "changes": ["--amp"]}]  # not mutated


def test_a_checkpoint_of_an_earlier_version_of_this_tool_is_refused_on_one_line():
    old = {"epoch": 3, "arch": "resnet50", "state_dict": {}, "optimizer": {}}
    old["moco"] = {"dim": 128, "K": 65536, "T": 0.2, "bn_splits": 8}
    with pytest.raises(UserError, match="^--resume c: written by an earlier version of this tool"):
        pretrain.check_resume(_config(), old, "c")


def test_a_released_main_moco_checkpoint_is_compared_by_its_arch_only():
    released = {"epoch": 3, "arch": "resnet50", "state_dict": {}, "optimizer": {}}
    assert pretrain.check_resume(_config(moco_t=0.07, lr=1.0), released, "c") == []
    with pytest.raises(UserError, match=r"settings: --arch resnet18 \(checkpoint: resnet50\); "):
        pretrain.check_resume(_config(arch="resnet18"), released, "c")


def test_what_resume_names_must_be_a_pretraining_checkpoint(tmp_path):
    assert pretrain.load_resume("") == (None, "")
    with pytest.raises(UserError, match="no checkpoint_.* in that folder"):
        pretrain.load_resume(str(tmp_path))
    io.save_checkpoint({"epoch": 1, "state_dict": {}}, str(tmp_path), 0)  # e.g. a lincls one
    with pytest.raises(
        UserError, match=r"not a MoCo pretraining checkpoint \(no arch, optimizer\)"
    ):
        pretrain.load_resume(str(tmp_path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-epoch run: (its output folder, its argv)."""
    root = tmp_path_factory.mktemp("resume")
    make_synthetic_image_folder(str(root / "data" / "train"), num_images=16, size=40)
    argv = [str(root / "data"), "-a", "resnet18", "-b", "8", "--moco-k", "16", "-j", "0"]
    argv += ["--crop-size", "64", "--seed", "3", "--device", "cpu", "--epochs", "1"]
    argv += ["--output-dir", str(root / "out")]
    assert pretrain.main(argv) == 0
    return root / "out", argv


def _snapshot(out):
    return {p.name: p.read_bytes() for p in out.glob("checkpoint_*")}


def test_resume_with_other_flags_is_refused_and_nothing_changes(run):
    out, argv = run
    before = _snapshot(out)
    state = torch.load(out / "checkpoint_0000.pth.tar", weights_only=True)
    assert state["config"]["crop_size"] == 64 and state["config"]["bn_group"] == 4
    assert state["resume_changes"] == [] and state["seed"] == 3
    assert json.loads((out / "config.json").read_text()) == state["config"]
    changed = argv + ["--resume", str(out), "--epochs", "3", "--moco-t", "0.07", "--no-mlp"]
    with pytest.raises(UserError, match=r"--moco-t 0.07 \(checkpoint: 0.2\), --no-mlp "):
        pretrain.main(changed)
    with pytest.raises(UserError):  # said even when the run has nothing left to do
        pretrain.main(argv + ["--resume", str(out), "--moco-t", "0.07"])
    assert _snapshot(out) == before


def test_resume_of_a_finished_run_has_nothing_to_do(run):
    out, argv = run
    before = copy.deepcopy(_snapshot(out))
    assert pretrain.main(argv + ["--resume", str(out)]) == 0
    assert _snapshot(out) == before
    assert "nothing to do: --resume " in (out / "log.txt").read_text()


@pytest.mark.parametrize("resume", [False, True])
def test_start_epoch_at_or_past_epochs_is_refused_before_anything_starts(run, tmp_path, resume):
    out, argv = run
    argv = [a if a != str(out) else str(tmp_path / "new") for a in argv]
    extra = ["--start-epoch", "5", "--epochs", "2"] + (["--resume", str(out)] if resume else [])
    with pytest.raises(UserError, match="^--start-epoch 5 is not below --epochs 2: nothing would"):
        PretrainConfig.parse(argv + extra)
    assert not (tmp_path / "new").exists()


def test_resume_after_the_first_epoch_passes_the_health_check_and_finishes(run, tmp_path):
    """The shared weight bound, checked at every iteration (-p 1), lets a resumed run go on:
    what it judges is divergence, not how far the checkpoint's weights are from zero."""
    out, argv = run
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    argv = [a if a != str(out) else str(resumed) for a in argv]
    assert pretrain.main(argv + ["--resume", str(resumed), "--epochs", "2", "-p", "1"]) == 0
    assert "resumed from" in (resumed / "log.txt").read_text()
    state = torch.load(resumed / "checkpoint_0001.pth.tar", weights_only=True)
    assert state["epoch"] == 2
    lr = 0.03 * 0.5 * (1 + math.cos(math.pi / 2))  # the cosine at epoch 1 of 2
    assert state["lr"] == pytest.approx(lr)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([lr])
    weights = [v for v in state["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)
    first = torch.load(out / "checkpoint_0000.pth.tar", weights_only=True)["state_dict"]
    assert not torch.equal(
        first["module.encoder_q.conv1.weight"], state["state_dict"]["module.encoder_q.conv1.weight"]
    )  # it trained on
