"""pretrain_moco.py --resume keeps the run it resumes: run-defining flags that differ are refused
on one line, a finished run has nothing to do, and --start-epoch past --epochs is refused."""

import copy
import shutil

import pytest
import torch

from moco_d2.errors import UserError
from moco_d2.pretrain import main as pretrain
from moco_d2.synthetic import make_synthetic_image_folder
from moco_d2.pretrain.resume import NothingToDo, check_resume, check_unfinished, recorded_settings


def _args(**changes):
    args = pretrain.build_parser().parse_args(["data"])
    args.augment_on, args.channels_last = "loader", False  # as resolved on CPU
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def _record(args, bn_splits=8, batch=256, global_batch=256, seed=7):
    return {
        **recorded_settings(args, bn_splits, batch, global_batch),
        "arch": args.arch,
        "seed": seed,
    }


def _checkpoint(**changes):
    return {**_record(_args(**changes)), "epoch": 10, "state_dict": {}, "optimizer": {}}


def test_the_record_holds_every_run_defining_flag():
    record = _record(_args(), bn_splits=4, batch=64, global_batch=512)
    assert record["moco"] == {
        "dim": 128, "K": 65536, "m": 0.999, "T": 0.2, "mlp": True, "aug_plus": True,
        "cos": True, "bn_splits": 4, "bn_group": 16, "global_batch": 512,
    }  # fmt: skip
    assert record["train"] == {
        "crop_size": 224, "lr": 0.03, "schedule": [120, 160], "momentum": 0.9,
        "weight_decay": 1e-4, "epochs": 200,
    }  # fmt: skip


def test_every_difference_is_listed_on_one_line():
    state = _checkpoint()
    now = _record(
        _args(moco_t=0.07, aug_plus=False, crop_size=160, lr=0.06, arch="resnet18"),
        global_batch=512,
    )
    with pytest.raises(UserError) as raised:
        check_resume(state, "ck.pth.tar", now)
    message = str(raised.value)
    assert message.startswith("--resume ck.pth.tar: the run was started with other settings: ")
    listed = message.split("settings: ")[1].split("; ")[0].split(", ")
    assert listed == [
        "-a resnet18 (checkpoint: resnet50)",
        "--moco-t 0.07 (checkpoint: 0.2)",
        "--no-aug-plus (checkpoint: --aug-plus)",
        "global batch (-b x nodes) 512 (checkpoint: 256)",
        "--crop-size 160 (checkpoint: 224)",
        "--lr 0.06 (checkpoint: 0.03)",
    ]
    assert "\n" not in message


def test_the_schedule_counts_only_without_the_cosine():
    assert check_resume(_checkpoint(), "c", _record(_args(schedule=[5]))) == []
    state = _checkpoint(cos=False)
    with pytest.raises(UserError, match=r"--schedule 5 \(checkpoint: 120 160\)"):
        check_resume(state, "c", _record(_args(cos=False, schedule=[5])))


def test_more_processes_with_the_same_batchnorm_groups_may_resume():
    state = {**_record(_args(), bn_splits=8, batch=256), "epoch": 1}  # one process, 8 groups
    eight_gpus = _record(_args(), bn_splits=1, batch=32)  # 8 processes of 32: same groups
    assert check_resume(state, "c", eight_gpus) == []
    with pytest.raises(UserError, match=r"BatchNorm group .* 64 \(checkpoint: 32\)"):
        check_resume(state, "c", _record(_args(), bn_splits=4, batch=256))


def test_allowed_changes_are_logged_and_recorded_and_the_record_accumulates(caplog):
    state = {**_checkpoint(), "resume_changes": [{"epoch": 5, "changes": ["--amp"]}]}
    now = _record(_args(epochs=400, amp=True), seed=8)
    history = check_resume(state, "c", now)
    assert history == [
        {"epoch": 5, "changes": ["--amp"]},
        {"epoch": 10, "changes": ["--epochs 400 (checkpoint: 200)", "--seed 8 (checkpoint: 7)",
                                  "--amp (checkpoint: --no-amp)"]},
    ]  # fmt: skip
    assert "keep what is trained but not bit-exactness: --epochs 400" in caplog.text
    assert state["resume_changes"] == [{"epoch": 5, "changes": ["--amp"]}]  # not mutated


def test_an_older_record_is_compared_where_it_has_values():
    old = _checkpoint()
    old["moco"] = {k: old["moco"][k] for k in ("dim", "K", "T", "bn_splits")}  # no bn_group
    del old["train"], old["speed"], old["seed"]
    assert check_resume(old, "c", _record(_args(lr=1.0, amp=True))) == []
    with pytest.raises(UserError, match=r"--moco-k 4096 \(checkpoint: 65536\), "):
        check_resume(old, "c", _record(_args(moco_k=4096), bn_splits=4))
    with pytest.raises(UserError, match=r"--bn-splits 4 \(checkpoint: 8\)"):
        check_resume(old, "c", _record(_args(), bn_splits=4))
    legacy = {"epoch": 3, "arch": "resnet50", "state_dict": {}, "optimizer": {}}
    assert check_resume(legacy, "c", _record(_args(moco_t=0.07))) == []


def test_a_finished_run_has_nothing_to_do():
    with pytest.raises(NothingToDo, match="^nothing to do: --resume c already finished epoch 10 "):
        check_unfinished(_checkpoint(), "c", 10)
    check_unfinished(_checkpoint(), "c", 11)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-epoch run: (data folder, output folder, its argv)."""
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
    assert state["train"]["crop_size"] == 64 and state["moco"]["bn_group"] == 4
    assert state["resume_changes"] == [] and state["seed"] == 3
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
        pretrain.parse_args(argv + extra)
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
    weights = [v for v in state["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)
    first = torch.load(out / "checkpoint_0000.pth.tar", weights_only=True)["state_dict"]
    assert not torch.equal(
        first["module.encoder_q.conv1.weight"], state["state_dict"]["module.encoder_q.conv1.weight"]
    )  # it trained on
