"""tools/pretrain_moco.py end to end on CPU: acceptance command, exact resume after SIGKILL,
multi-process launch, divergence stop and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moco_d2.errors import TrainingDiverged, UserError
from moco_d2.pretrain import main as pretrain
from moco_d2.pretrain.device_decode import jpeg_size
from moco_d2.synthetic import make_synthetic_image_folder

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "pretrain_moco.py")]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    make_synthetic_image_folder(str(root / "train"), num_images=32, size=40, seed=0, num_classes=4)
    make_synthetic_image_folder(str(root / "val"), num_images=8, size=40, seed=1, num_classes=4)
    return root


def _run(args, **kw):
    return subprocess.run(TOOL + args, env=ENV, capture_output=True, text=True, timeout=240, **kw)


def _tiny(data, out, *extra):
    return [
        str(data),
        "-a",
        "resnet18",
        "-b",
        "8",
        "--moco-k",
        "16",
        "--workers",
        "0",
        "--crop-size",
        "64",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("augment_on", ["loader", "device"])
def test_acceptance_command_resnet50_with_a_corrupt_image(tmp_path, augment_on):
    data = tmp_path / "data"
    make_synthetic_image_folder(str(data), num_images=16, size=40, seed=1, num_classes=2)
    corrupt = sorted(data.rglob("*.jpg"))[3]
    corrupt.write_bytes(b"broken")
    out = tmp_path / "out"
    result = _run(
        [
            str(data),
            "-a",
            "resnet50",
            "-b",
            "4",
            "--moco-k",
            "16",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--mlp",
            "--moco-t",
            "0.2",
            "--aug-plus",
            "--cos",
            "--seed",
            "0",
            "--output-dir",
            str(out),
            "--crop-size",
            "64",
            "--augment-on",
            augment_on,
            "--device",
            "cpu",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "MoCo v2: resnet50, 16 images, batch 4 per process, device cpu" in log
    assert "plain BatchNorm over the batch (--bn-splits 1)" in log
    assert (
        str(corrupt) in log
        and "1 unreadable images were replaced" in log
        and "kept its 4 iterations" in log
    )
    assert list((out / "tb").iterdir())
    ckpt = torch.load(out / "checkpoint_0000.pth.tar", weights_only=True)
    assert {"epoch", "arch", "state_dict", "optimizer"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "resnet50"
    sd = ckpt["state_dict"]
    assert all(k.startswith("module.") for k in sd)
    assert sd["module.encoder_q.fc.0.weight"].shape == (2048, 2048)
    assert sd["module.encoder_q.fc.2.weight"].shape == (128, 2048)
    assert sd["module.queue"].shape == (128, 16) and int(sd["module.queue_ptr"]) == 0
    assert sum(k.startswith("module.encoder_q.") and k.endswith("conv1.weight") for k in sd) == 17
    tool = pytest.importorskip("moco_d2.convert.tool")
    trunk, mapping = tool.convert(str(out / "checkpoint_0000.pth.tar"))
    weights = tool.detectron2_weights(trunk, mapping)["model"]
    assert (weights["stem.conv1.weight"] == sd["module.encoder_q.conv1.weight"].numpy()).all()


def _wait_for(path, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "augment_on, decode_on, workers",
    [
        ("loader", "loader", 0),
        ("device", "loader", 0),
        ("loader", "loader", 2),
        ("device", "device", 2),
    ],
)
def test_sigkill_then_resume_is_bit_identical(data_dir, tmp_path, augment_on, decode_on, workers):
    full, killed = tmp_path / "full", tmp_path / "killed"
    speed = ("--augment-on", augment_on, "--decode-on", decode_on, "--workers", str(workers))
    uninterrupted = subprocess.Popen(
        TOOL + _tiny(data_dir, full, "--epochs", "3", *speed),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        TOOL + _tiny(data_dir, killed, "--epochs", "3", *speed),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(killed / "checkpoint_0000.pth.tar", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "checkpoint_0002.pth.tar").exists(), "killed too late to test anything"
    resumed = _run(_tiny(data_dir, killed, "--epochs", "3", "--resume", str(killed), *speed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert uninterrupted.wait(timeout=240) == 0, uninterrupted.stderr.read()[-3000:]
    assert "resumed from" in (killed / "log.txt").read_text()

    a = torch.load(full / "checkpoint_0002.pth.tar", weights_only=True)
    b = torch.load(killed / "checkpoint_0002.pth.tar", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["lr"] == b["lr"]
    assert (b["config"]["augment_on"], b["config"]["decode_on"]) == (augment_on, decode_on)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]
        ), i
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    first = torch.load(full / "checkpoint_0000.pth.tar", weights_only=True)["state_dict"]
    assert not torch.equal(
        first["module.queue"], a["state_dict"]["module.queue"]
    )  # it did train on


def test_decode_on_device_trains_and_counts_a_truncated_jpeg(tmp_path):
    data = tmp_path / "data"
    make_synthetic_image_folder(str(data), num_images=16, size=40, seed=2, num_classes=2)
    truncated = sorted(data.rglob("*.jpg"))[5]
    truncated.write_bytes(truncated.read_bytes()[:-300])
    assert jpeg_size(truncated.read_bytes()) == (40, 40)  # only the device decoder can tell
    out = tmp_path / "out"
    speed = ("--augment-on", "device", "--decode-on", "device")
    result = _run(_tiny(data, out, "--epochs", "1", *speed))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"unreadable image skipped: {truncated}" in log
    assert "1 unreadable images were replaced" in log and "kept its 2 iterations" in log
    assert json.loads((out / "config.json").read_text())["decode_on"] == "device"
    sd = torch.load(out / "checkpoint_0000.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert int(sd["module.queue_ptr"]) == 0


@pytest.mark.parametrize("decode_on", ["device", "loader"])
def test_one_readable_jpeg_among_fifteen_truncated_ones_trains_and_counts(tmp_path, decode_on):
    """No batch has a readable image but the one holding the good file: each unreadable one is
    replaced from the folder, on both paths, and both count the same (each item counts the files
    from its own to the good one: 1 + 2 + ... + 15 in an epoch of the 16)."""
    data = tmp_path / "data"
    make_synthetic_image_folder(str(data), num_images=16, size=64, seed=2, num_classes=1)
    files = sorted(data.rglob("*.jpg"))
    for path in files[:4] + files[5:]:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        assert jpeg_size(path.read_bytes()) == (64, 64)  # only the decoder can tell
    out = tmp_path / "out"
    speed = ("--augment-on", "device", "--decode-on", decode_on)
    result = _run(_tiny(data, out, "--epochs", "1", *speed))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert json.loads((out / "config.json").read_text())["decode_on"] == decode_on
    assert "120 unreadable images were replaced" in log and "kept its 2 iterations" in log
    assert all(f"unreadable image skipped: {p}" in log for p in files[:4] + files[5:])
    sd = torch.load(out / "checkpoint_0000.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def _same_weights(a, b):
    a = torch.load(a, weights_only=True)["state_dict"]
    b = torch.load(b, weights_only=True)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def test_released_one_process_command_keeps_shuffle_bn(data_dir, tmp_path):
    """One process in total: no spawn, no process group, no DDP; the SplitBN default applies
    and the run equals the plain one-process command."""
    released = ["--multiprocessing-distributed", "--world-size", "1", "--rank", "0"]
    released += ["--nproc-per-node", "1"]
    runs = {}
    for name, extra in (("plain", []), ("released", released)):
        out = tmp_path / name
        result = _run(_tiny(data_dir, out, "--epochs", "2", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out
    log = (runs["released"] / "log.txt").read_text()
    assert "batch 8 per process" in log
    assert (
        "one process in total: no process group or DDP; shuffle-BN emulated with 2 BatchNorm "
        "groups (--bn-splits)" in log
    )
    ckpt = torch.load(runs["released"] / "checkpoint_0001.pth.tar", weights_only=True)
    assert ckpt["config"]["bn_splits"] == 2 and ckpt["config"]["global_batch"] == 8
    assert _same_weights(
        runs["plain"] / "checkpoint_0001.pth.tar", runs["released"] / "checkpoint_0001.pth.tar"
    )


@pytest.mark.parametrize("augment_on", ["loader", "device"])
def test_the_number_of_loader_workers_does_not_change_the_run(data_dir, tmp_path, augment_on):
    outs = [tmp_path / f"j{j}" for j in (0, 2)]
    for out, j in zip(outs, (0, 2)):
        argv = _tiny(data_dir, out, "--epochs", "2", "--augment-on", augment_on, "-j", str(j))
        result = _run(argv)
        assert result.returncode == 0, result.stderr[-3000:]
    assert _same_weights(*(out / "checkpoint_0001.pth.tar" for out in outs))


def test_multiprocessing_distributed_on_cpu(data_dir, tmp_path):
    out = tmp_path / "out"
    result = _run(
        _tiny(
            data_dir,
            out,
            "--epochs",
            "1",
            "--multiprocessing-distributed",
            "--nproc-per-node",
            "2",
            "--knn-data",
            str(data_dir),
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "32 images, batch 4 per process" in log
    assert "2 processes: keys shuffled across processes (DDP), 1 BatchNorm group(s)" in log
    assert "epoch 0: kNN top-1" in log
    sd = torch.load(out / "checkpoint_0000.pth.tar", weights_only=True)["state_dict"]
    assert int(sd["module.queue_ptr"]) == 0 and "module.encoder_k.layer4.1.bn2.weight" in sd


def test_non_finite_loss_stops_with_a_clear_message(data_dir, tmp_path):
    """Read every --print-freq iterations: the window of iterations 0-3 (the epoch's 4) names
    itself."""
    match = r"^non-finite loss \((nan|inf)\) at epoch 0, iterations 0-3, lr 1e\+30: lower --lr"
    with pytest.raises(TrainingDiverged, match=match):
        pretrain.main(_tiny(data_dir, tmp_path / "out", "--epochs", "1", "--lr", "1e30"))
    assert not list((tmp_path / "out").glob("checkpoint_*"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--moco-k", "20"], "multiple of the global batch 8"),
        (["--bn-splits", "3"], "does not divide"),
        (["--resume", "missing.pth.tar"], "no such file"),
        (["-b", "64", "--moco-k", "64"], "fewer than one global batch"),
    ],
)
def test_bad_flags_are_user_errors(data_dir, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        pretrain.main(_tiny(data_dir, tmp_path / "out", *extra))


def test_missing_data_dir_is_one_line_exit_2(tmp_path):
    result = _run([str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: data folder not found: {tmp_path / 'nowhere'}"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_with_amp_writes_a_cpu_loadable_checkpoint(data_dir, tmp_path):
    out = tmp_path / "out"
    argv = _tiny(data_dir, out, "--epochs", "1", "--amp")
    argv[argv.index("--device") + 1] = "cuda"
    assert pretrain.main(argv) == 0
    assert "device cuda:0" in (out / "log.txt").read_text()
    sd = torch.load(out / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    assert sd["module.queue"].dtype == torch.float32 and torch.isfinite(sd["module.queue"]).all()
    assert int(sd["module.queue_ptr"]) == 0
