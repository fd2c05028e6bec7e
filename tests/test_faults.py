"""Fault injection: bad input and failures met by the real tools, at tiny scale on CPU.

Each case runs the tool as a user does (a subprocess) and asserts the exit code, that no
traceback is printed, that the one error line names the file or setting at fault, and that
no earlier output was lost or changed.
"""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
import torchvision
from PIL import Image
from transfer_tiny import TINY_OPTS

from moco_d2.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "voc_R50_C4.yaml")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def tool(name, *args, env=None, timeout=300):
    command = [sys.executable, os.path.join(REPO, "tools", name), *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=REPO
    )


def assert_error(result, *names):
    """Exit 2, no traceback, and a last line ``error: ...`` that names each of ``names``."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr[-3000:]
    for name in names:
        assert str(name) in line, (name, line)
    assert "weights_only=False" not in line
    return line


def snapshot(directory):
    """name → bytes of every file under ``directory``: to show nothing earlier changed."""
    found = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


@pytest.fixture(scope="module")
def resnet50_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


# Converter.


def test_converter_directory_as_output(resnet50_pth, tmp_path):
    (tmp_path / "out.pkl").mkdir()
    result = tool("convert-to-d2.py", resnet50_pth, tmp_path / "out.pkl")
    assert_error(result, tmp_path / "out.pkl", "is a directory")
    assert os.listdir(tmp_path / "out.pkl") == []


def _unshare_works():
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def on_full_disk(tmp_path, script):
    """Run ``script`` (sh) with ``$0`` a fresh 1 MiB tmpfs, in a private mount namespace."""
    if not _unshare_works():
        pytest.skip("needs unshare -rm (user and mount namespaces) to make a full disk")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    command = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs $0 && {script}"]
    return subprocess.run(
        command + [str(mount)], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO
    )


def test_converter_on_a_full_disk(resnet50_pth, tmp_path):
    result = on_full_disk(
        tmp_path,
        f"echo old > $0/moco.pkl && {sys.executable} tools/convert-to-d2.py {resnet50_pth} "
        "$0/moco.pkl; rc=$?; cat $0/moco.pkl; ls -A $0; exit $rc",
    )
    line = assert_error(result, "no space left", "moco.pkl")
    assert "nothing was written" in line
    assert result.stdout.split()[-2:] == ["old", "moco.pkl"]  # old file intact, no temporary


def test_checkpoint_write_on_a_full_disk(tmp_path):
    """Pretraining checkpoints go through the same atomic writer."""
    script = (
        "from moco_d2.cli import run_tool; import sys; sys.argv[1:] = [sys.argv[1]]; "
        "run_tool('full_disk_writer')"
    )
    writer = tmp_path / "full_disk_writer.py"
    writer.write_text(
        "import torch\n"
        "from moco_d2.training.checkpoint import save_checkpoint\n"
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


# Linear classification.


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


# Pretraining input.


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
    from moco_d2.pretrain.builder import MoCo
    from moco_d2.pretrain.data import make_synthetic_image_folder

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


# Detection: weights files, and everything checked before launch.


@pytest.fixture
def voc_copy(synthetic_voc_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(synthetic_voc_root, root)
    return root


def train_net(voc_root, *opts, args=()):
    env = dict(ENV, DETECTRON2_DATASETS=str(voc_root))
    return tool(
        "train_net.py", "--config-file", CONFIG, *args, *TINY_OPTS, "SOLVER.MAX_ITER", "1", *opts,
        env=env,
    )  # fmt: skip


def test_train_net_random_bytes_pkl(synthetic_voc_root, tmp_path):
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(os.urandom(4096))
    line = assert_error(
        train_net(synthetic_voc_root, "MODEL.WEIGHTS", junk, "OUTPUT_DIR", tmp_path / "o"), junk
    )
    assert "not a readable Detectron2 .pkl" in line


def test_train_net_given_a_moco_checkpoint(synthetic_voc_root, tmp_path):
    state = {
        "module.encoder_q." + k: v for k, v in torchvision.models.resnet18().state_dict().items()
    }
    moco = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, moco)
    result = train_net(synthetic_voc_root, "MODEL.WEIGHTS", moco, "OUTPUT_DIR", tmp_path / "o")
    assert_error(result, moco, "pretraining checkpoint", "tools/convert-to-d2.py")


def prepare_voc_check(voc_root):
    script = os.path.join(REPO, "datasets", "prepare_voc.py")
    return subprocess.run(
        [sys.executable, script, "check", "--root", str(voc_root)],
        capture_output=True, text=True, env=ENV, timeout=120, cwd=REPO,
    )  # fmt: skip


def _edit_first_box(voc_root, split, **values):
    """Set coordinates of object 1 in the first image of ``split``; return the XML path."""
    first = (voc_root / "VOC2007" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[0]
    path = voc_root / "VOC2007" / "Annotations" / f"{first}.xml"
    tree = ET.parse(path)
    box = tree.getroot().find("object").find("bndbox")
    for tag, value in values.items():
        box.find(tag).text = str(value)
    tree.write(path)
    return path


@pytest.mark.parametrize(
    "case, opts, args, says",
    [
        ("unregistered test set", ["DATASETS.TEST", "('voc_2007_tst',)"], [], "voc_2007_test"),
        ("steps", ["SOLVER.STEPS", "(1,)"], [], "SOLVER.STEPS"),
        (
            "two processes",
            ["DATASETS.TEST", "('voc_2007_tst',)"],
            ["--num-gpus", "2"],
            "voc_2007_tst",
        ),
    ],
)
def test_train_net_refuses_before_launch(
    converted_weights, synthetic_voc_root, tmp_path, case, opts, args, says
):
    out = tmp_path / "out"
    result = train_net(
        synthetic_voc_root, "MODEL.WEIGHTS", converted_weights, "OUTPUT_DIR", out, *opts, args=args
    )
    assert_error(result, says)
    assert not (out / "model_final.pth").exists() and not (out / "metrics.json").exists()


def test_train_net_output_dir_not_writable(converted_weights, synthetic_voc_root, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    result = train_net(
        synthetic_voc_root,
        "MODEL.WEIGHTS",
        converted_weights,
        "OUTPUT_DIR",
        tmp_path / "file" / "out",
    )
    assert_error(result, "OUTPUT_DIR", tmp_path / "file" / "out")


@pytest.mark.parametrize("split", ["test", "trainval"])
def test_empty_split_is_refused_by_train_net_and_check(
    voc_copy, converted_weights, tmp_path, split
):
    split_file = voc_copy / "VOC2007" / "ImageSets" / "Main" / f"{split}.txt"
    split_file.write_text("")
    result = train_net(voc_copy, "MODEL.WEIGHTS", converted_weights, "OUTPUT_DIR", tmp_path / "o")
    assert_error(result, split_file, "no images")
    check = prepare_voc_check(voc_copy)
    assert_error(check, split_file)
    assert "OK" not in check.stdout


def test_inverted_box_is_refused_by_train_net_check_and_loader(
    voc_copy, converted_weights, tmp_path
):
    from moco_d2.detection.data.voc import load_voc_instances

    xml = _edit_first_box(voc_copy, "test", xmin=50, xmax=10)
    result = train_net(voc_copy, "MODEL.WEIGHTS", converted_weights, "OUTPUT_DIR", tmp_path / "o")
    assert_error(result, xml, "object 1", "xmin 50", "xmax 10")
    assert_error(prepare_voc_check(voc_copy), xml, "object 1")
    with pytest.raises(UserError, match="object 1"):
        load_voc_instances(str(voc_copy / "VOC2007"), "test")


def test_unreadable_difficult_in_the_test_split_is_refused_before_training(
    voc_copy, converted_weights, tmp_path
):
    """The evaluator scores the loader's dicts, so preflight's loading is its check too."""
    xml = _edit_first_box(voc_copy, "test")
    tree = ET.parse(xml)
    tree.getroot().find("object").find("difficult").text = "maybe"
    tree.write(xml)
    out = tmp_path / "o"
    result = train_net(voc_copy, "MODEL.WEIGHTS", converted_weights, "OUTPUT_DIR", out)
    assert_error(result, xml, "object 1", "<difficult> is 'maybe'")
    assert not (out / "model_final.pth").exists()
    assert_error(prepare_voc_check(voc_copy), xml, "object 1")


def test_box_far_outside_is_an_error_and_on_the_border_is_clipped(voc_copy, caplog):
    from moco_d2.detection.data.voc import load_voc_instances

    tree = voc_copy / "VOC2007"
    (record,) = [r for r in load_voc_instances(str(tree), "test")][:1]
    width = record["width"]
    xml = _edit_first_box(voc_copy, "test", xmin=0, xmax=width + 1)  # a pixel over each side
    with caplog.at_level("INFO"):
        dicts = load_voc_instances(str(tree), "test")
    box = dicts[0]["annotations"][0]["bbox"]
    assert box[0] == 0.0 and box[2] == float(width)
    assert "1 boxes touching or crossing the image border clipped" in caplog.text
    _edit_first_box(voc_copy, "test", xmax=width + 3)
    with pytest.raises(UserError, match=f"{xml}, object 1 .*outside"):
        load_voc_instances(str(tree), "test")


def test_non_finite_training_loss_stops_train_net_without_metrics(synthetic_voc_root, tmp_path):
    """Undefined metrics are reported, but a NaN loss still ends the run with an error.

    A zero PIXEL_STD makes every input, hence the loss, non-finite at the first iteration.
    (Of 2: Detectron2's EvalHook also evaluates after a failure in the last iteration.)
    """
    out = tmp_path / "o"
    result = train_net(
        synthetic_voc_root, "MODEL.WEIGHTS", "", "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]",
        "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out,
    )  # fmt: skip
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Starting training from iteration 0" in (out / "log.txt").read_text()
    assert "nan" in result.stderr.lower()
    assert not (out / "metrics_voc.json").exists() and not (out / "model_final.pth").exists()


def test_resuming_a_finished_train_net_run_has_nothing_to_do(synthetic_voc_root, tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    torch.save({"model": {}, "iteration": 0}, tmp_path / "model_final.pth")  # MAX_ITER 1 done
    (tmp_path / "metrics_voc.json").write_text('{"voc_2007_test": {"AP": 1.0}}')
    before = snapshot(tmp_path)
    result = train_net(synthetic_voc_root, "OUTPUT_DIR", tmp_path, args=["--resume"])
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stderr[-2000:]
    assert snapshot(tmp_path) == before
