"""tools/lincls.py end to end on a tiny ImageFolder: frozen backbone, fc-only SGD, errors."""

import json
import os
import shutil

import pytest
import torch
import torchvision
from PIL import Image

from moco_d2.cli import run_tool
from moco_d2.errors import UserError
from moco_d2.launch import Launch
from moco_d2.lincls.engine import accuracy, evaluate
from moco_d2.lincls.main import LinclsConfig, _loaders, main
from moco_d2.lincls.model import build_model, build_optimizer

CPU = torch.device("cpu")
COLORS = {"blue": (20, 40, 230), "green": (30, 200, 40), "red": (220, 30, 30)}
SMALL = [
    "-a",
    "resnet18",
    "-b",
    "8",
    "-j",
    "0",
    "--crop-size",
    "16",
    "--resize",
    "18",
    "--device",
    "cpu",
    "--seed",
    "0",
]


def make_image_folder(root, splits=(("train", 8), ("val", 4))):
    """Flat-coloured images, one class per colour: any crop has the same (fixed) features."""
    for split, count in splits:
        for name, rgb in COLORS.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (40, 40), rgb).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A MoCo-layout resnet18 checkpoint whose BN running stats differ from the defaults."""
    torch.manual_seed(0)
    encoder = torchvision.models.resnet18(num_classes=128)
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.9, 1.1)
    state = {"module.encoder_q." + k: v for k, v in encoder.state_dict().items()}
    state.update({"module.encoder_k." + k: v.clone() for k, v in encoder.state_dict().items()})
    state["module.queue"] = torch.nn.functional.normalize(torch.randn(128, 64), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path_factory.mktemp("pretrained") / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {}}, path)
    return str(path)


def run_cli(argv, capsys):
    """Run the tool as a user does; return (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        run_tool("moco_d2.lincls.main", argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_one_epoch_trains_only_the_fc(data, pretrained, tmp_path):
    out = tmp_path / "out"
    main(
        [
            str(data),
            *SMALL,
            "--pretrained",
            pretrained,
            "--epochs",
            "1",
            "--lr",
            "0.05",
            "--output-dir",
            str(out),
        ]
    )

    saved = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    source = torch.load(pretrained, weights_only=True)["state_dict"]
    weights = saved["state_dict"]
    for key, value in weights.items():
        name = key[len("module.") :]
        if name.startswith("fc."):
            continue
        assert torch.equal(value, source["module.encoder_q." + name]), name  # BN stats included
    assert weights["module.fc.weight"].shape == (3, 512)
    assert weights["module.fc.bias"].abs().sum() > 0  # the fc did train
    # Momentum buffers exist exactly for the parameters the optimizer updated: fc.weight, fc.bias.
    shapes = sorted(tuple(s["momentum_buffer"].shape) for s in saved["optimizer"]["state"].values())
    assert shapes == [(3,), (3, 512)]
    results = json.loads((out / "results.json").read_text())
    assert results["backbone_unchanged"] is True and len(results["history"]) == 1
    assert (out / "model_best.pth.tar").is_file() and os.listdir(out / "tb")
    assert "sanity check passed" in (out / "log.txt").read_text()


def test_linearly_separable_toy_set_reaches_100_percent(data, pretrained, tmp_path):
    main(
        [
            str(data),
            *SMALL,
            "--pretrained",
            pretrained,
            "--epochs",
            "5",
            "--lr",
            "0.05",
            "--schedule",
            "4",
            "--output-dir",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    history = results["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 5
    assert results["acc1"] == 100.0 and results["best_acc1"] == 100.0
    assert [h["lr"] for h in history] == pytest.approx([0.05] * 4 + [0.005])


def test_resume_continues_the_run(data, pretrained, tmp_path):
    common = [
        str(data),
        *SMALL,
        "--pretrained",
        pretrained,
        "--lr",
        "0.05",
        "--output-dir",
        str(tmp_path),
    ]
    main([*common, "--epochs", "1"])
    main([*common, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pth.tar")])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [0, 1]

    main([*common, "--evaluate", "--resume", str(tmp_path / "checkpoint.pth.tar")])
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert (evaluation["acc1"], evaluation["acc5"]) == (results["acc1"], results["acc5"])
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_resume_with_other_pretrained_weights_is_refused_before_training(
    data, pretrained, tmp_path, capsys
):
    common = [str(data), *SMALL, "--lr", "0.05", "--output-dir", str(tmp_path / "run")]
    main([*common, "--epochs", "1", "--pretrained", pretrained])
    checkpoint = tmp_path / "run" / "checkpoint.pth.tar"
    before = checkpoint.read_bytes()
    other = torchvision.models.resnet18().state_dict()  # another (random) trunk
    torch.save(other, tmp_path / "other.pth")
    capsys.readouterr()  # the first run's progress bars
    code, err = run_cli(
        [*common, "--epochs", "2", "--pretrained", str(tmp_path / "other.pth")]
        + ["--resume", str(checkpoint)],
        capsys,
    )
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(
        f"error: --resume {checkpoint} was trained on other pretrained weights than "
        f"--pretrained {tmp_path / 'other.pth'}: "
    )
    assert "trunk tensors differ (bn1.running_mean, bn1.running_var, conv1.weight, " in err[0]
    assert checkpoint.read_bytes() == before  # no epoch ran


def test_resume_from_a_pretraining_checkpoint(data, pretrained, tmp_path, capsys):
    code, err = run_cli(
        [str(data), *SMALL, "--resume", pretrained, "--output-dir", str(tmp_path)], capsys
    )
    assert code == 2 and len(err) == 1
    assert "is a MoCo pretraining checkpoint, not a tools/lincls.py one" in err[0]


def test_optimizer_holds_only_the_fc():
    model = build_model("resnet18", num_classes=5)
    optimizer = build_optimizer(model, lr=30.0, momentum=0.9, weight_decay=0.0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in params] == [id(model.fc.weight), id(model.fc.bias)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert model.fc.bias.abs().sum() == 0
    assert 0.008 < model.fc.weight.std().item() < 0.012  # N(0, 0.01) over 2,560 draws


def test_top1_top5_on_a_hand_made_batch():
    # 6 classes; correct class ranked 1st, 1st, 2nd, 6th, 5th for the five samples.
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],
            [0.0, 9, 1, 2, 3, 4],
            [5.0, 1, 9, 2, 3, 4],
            [1.0, 2, 3, 4, 5, 9],
            [6.0, 5, 4, 3, 2, 1],
        ]
    )
    target = torch.tensor([0, 1, 5, 0, 4])
    top1, top5 = accuracy(logits, target, topk=(1, 5))
    assert top1.item() == pytest.approx(100 * 2 / 5)
    assert top5.item() == pytest.approx(100 * 4 / 5)
    # evaluate() weights unequal batches by their size: 2 of 5 and 1 of 1 → 3 of 6 top-1.
    last = (torch.tensor([[0.0, 0, 0, 0, 0, 1]]), torch.tensor([5]))
    batches = [(logits, target, torch.zeros(5, dtype=torch.long)), (*last, torch.zeros(1))]
    acc1, acc5, unreadable = evaluate(torch.nn.Identity(), batches, torch.device("cpu"))
    assert (acc1, acc5, unreadable) == (pytest.approx(50.0), pytest.approx(100 * 5 / 6), 0)
    # An item with skipped > 0 stands for an unreadable image: the rows of the 3rd and 4th
    # samples (top-1 miss, top-5 miss) are left out, not scored: 2 of 3 top-1, 3 of 3 top-5.
    skipped = torch.tensor([0, 0, 1, 2, 0])
    batches = [(logits, target, skipped), (*last, torch.ones(1, dtype=torch.long))]
    acc1, acc5, unreadable = evaluate(torch.nn.Identity(), batches, torch.device("cpu"))
    assert (acc1, acc5, unreadable) == (pytest.approx(100 * 2 / 3), pytest.approx(100.0), 3)
    # None readable (files broken after launch): no accuracy to give, one line instead of 0 %.
    with pytest.raises(UserError, match="no val image could be read: all 6 were unreadable"):
        evaluate(torch.nn.Identity(), [(logits, target, skipped + 1), last + (torch.ones(1),)], CPU)


def test_missing_val_folder(pretrained, tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", splits=(("train", 1),))
    code, err = run_cli([str(data), *SMALL, "--pretrained", pretrained], capsys)
    assert code == 2 and len(err) == 1 and "val is not a folder" in err[0]


def test_images_without_class_folders(pretrained, tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", splits=(("val", 1),))
    os.makedirs(data / "train")
    Image.new("RGB", (8, 8)).save(data / "train" / "loose.png")
    code, err = run_cli([str(data), *SMALL, "--pretrained", pretrained], capsys)
    assert code == 2 and len(err) == 1 and "train is not an ImageFolder" in err[0]


def test_class_folder_without_images(pretrained, tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", splits=(("train", 1), ("val", 1)))
    for image in (data / "val" / "green").iterdir():
        image.unlink()
    code, err = run_cli([str(data), *SMALL, "--pretrained", pretrained], capsys)
    assert code == 2 and err == [
        f"error: {data / 'val'} is not an ImageFolder (one sub-folder of images per class): "
        "no images in green"
    ]


def test_train_and_val_classes_differ(pretrained, tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", splits=(("train", 1), ("val", 1)))
    os.rename(data / "val" / "red", data / "val" / "yellow")
    code, err = run_cli([str(data), *SMALL, "--pretrained", pretrained], capsys)
    assert code == 2 and len(err) == 1 and "different classes" in err[0]


def test_checkpoint_of_another_arch(data, pretrained, tmp_path, capsys):
    argv = [str(data), *SMALL, "--pretrained", pretrained, "--output-dir", str(tmp_path)]
    argv[argv.index("resnet18")] = "resnet34"
    code, err = run_cli(argv, capsys)
    assert code == 2 and err == [
        f"error: {pretrained} is a resnet18 checkpoint, but -a/--arch is resnet34"
    ]
    assert not os.listdir(tmp_path)  # nothing written before the input was checked


@pytest.mark.parametrize(
    "launch, procs",
    [([], 1), (["--multiprocessing-distributed", "--nproc-per-node", "2", "--world-size", "3"], 2)],
)
def test_batch_is_per_node_and_workers_per_process(data, launch, procs):
    """As in the released main_lincls.py: -b 8 is split over the node's processes (not over all
    nodes' processes), and every process gets -j 2 workers."""
    config = LinclsConfig.parse([str(data), *SMALL, "-j", "2", *launch])
    here = Launch(1, 0, procs, CPU)  # no process group: the split is what is checked
    train_loader, val_loader, _ = _loaders(data_set(data), data_set(data), config, here)
    assert (train_loader.batch_size, val_loader.batch_size) == (8 // procs, 8 // procs)
    assert (train_loader.num_workers, val_loader.num_workers) == (2, 2)


def data_set(root):
    return torchvision.datasets.ImageFolder(str(root / "train"))


def test_batch_not_divisible_by_the_processes_of_a_node(data, capsys):
    argv = [str(data), *SMALL, "--multiprocessing-distributed", "--nproc-per-node", "3"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err == [
        "error: -b 8 (the batch of one node) is not divisible by its 3 processes"
    ]


@pytest.mark.parametrize(
    "flag, value, expected",
    [("-b", "0", "an integer >= 1"), ("-j", "-1", "an integer >= 0"), ("--lr", "0", "> 0")],
)
def test_flag_values_are_checked_by_their_types(data, flag, value, expected, capsys):
    code, (line,) = run_cli([str(data), *SMALL, flag, value], capsys)
    assert code == 2 and flag in line and expected in line and value in line


# Unreadable images: train ones replaced and counted, val ones left out and counted.


def add_unreadable_images(root, split):
    """A 0-byte file in red/ and a truncated JPEG in green/: each sorts last in its class, so
    the two are never neighbours in the folder's order. Returns their paths."""
    empty = root / split / "red" / "zero.jpg"
    empty.write_bytes(b"")
    cut = root / split / "green" / "cut.jpg"
    noise = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=torch.Generator())
    Image.fromarray(noise.numpy()).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    with pytest.raises(OSError):  # what the tool meets: PIL cannot decode either
        Image.open(cut).convert("RGB")
    return [empty, cut]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """(data with 2 unreadable images in train/ and in val/, the same data without them, the
    unreadable paths). One val image of red/ is blue, so top-1 is below 100 % for any good
    classifier and depends on which images it is taken over."""
    clean = make_image_folder(tmp_path_factory.mktemp("clean"))
    Image.new("RGB", (40, 40), COLORS["blue"]).save(clean / "val" / "red" / "3.png")
    data = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(clean, data)
    bad = add_unreadable_images(data, "train") + add_unreadable_images(data, "val")
    return data, clean, bad


def evaluate_on(data, checkpoint, out):
    """top-1, top-5 of the saved classifier on ``data``, by the tool's -e."""
    main([str(data), *SMALL, "-e", "--resume", str(checkpoint), "--output-dir", str(out)])
    return json.loads((out / "evaluation.json").read_text())


def scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_unreadable_images_are_counted_and_left_out_of_val(damaged, pretrained, tmp_path):
    data, clean, bad = damaged
    out = tmp_path / "run"
    argv = [str(data), *SMALL, "--pretrained", pretrained, "--lr", "0.05", "--epochs", "2"]
    assert main([*argv, "-j", "1", "--output-dir", str(out)]) == 0  # a worker reads and logs

    results = json.loads((out / "results.json").read_text())
    assert [(h["train_unreadable"], h["val_unreadable"]) for h in results["history"]] == [
        (2, 2),
        (2, 2),
    ]
    assert results["val_unreadable"] == 2
    assert scalars(out / "tb", "train_unreadable") == [2, 2]
    assert scalars(out / "tb", "val_unreadable") == [2, 2]
    log = (out / "log.txt").read_text()
    for path in bad:
        assert f"unreadable image skipped: {path}" in log
    assert "epoch 1: 2 unreadable train images were replaced by the next readable one" in log
    assert "epoch 1: 2 unreadable val images were left out" in log

    # top-1/top-5 are those of the same classifier on val/ without the unreadable files: 12
    # images, not 14 (unreadable ones counted as misses) nor 14 with two counted twice.
    checkpoint = out / "checkpoint.pth.tar"
    reference = evaluate_on(clean, checkpoint, tmp_path / "clean")
    assert reference["val_unreadable"] == 0
    assert (results["acc1"], results["acc5"]) == (reference["acc1"], reference["acc5"])
    assert round(results["acc1"] * 12 / 100, 6).is_integer()
    assert evaluate_on(data, checkpoint, out)["val_unreadable"] == 2


def test_two_processes_on_cpu(damaged, pretrained, tmp_path):
    """gloo, 2 processes: the unreadable counts are summed, and top-1/top-5 over the readable
    val images equal one process's evaluation of the same classifier without them."""
    data, clean, _ = damaged
    argv = [str(data), *SMALL, "--pretrained", pretrained, "--epochs", "1", "--lr", "0.05"]
    launch = ["--multiprocessing-distributed", "--nproc-per-node", "2"]
    assert main([*argv, *launch, "--output-dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["backbone_unchanged"] is True and len(results["history"]) == 1
    assert results["batch_size"] == 8
    # 26 train images split 13/13 (no padding): each unreadable one is met once.
    assert results["history"][0]["train_unreadable"] == 2 and results["val_unreadable"] == 2
    reference = evaluate_on(clean, tmp_path / "run" / "checkpoint.pth.tar", tmp_path / "clean")
    assert (results["acc1"], results["acc5"]) == (reference["acc1"], reference["acc5"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_of_only_unreadable_images_is_refused_before_launch(
    pretrained, split, tmp_path, capsys
):
    data = make_image_folder(tmp_path / "d", splits=(("train", 1), ("val", 1)))
    for image in (data / split).rglob("*.png"):
        image.write_bytes(b"")
    out = tmp_path / "out"
    argv = [str(data), *SMALL, "--pretrained", pretrained, "--output-dir", str(out)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: no readable image under {data / split}: ")
    assert not out.exists()
