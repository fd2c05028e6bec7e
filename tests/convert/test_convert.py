"""The converter: names, input layouts, and every bad input → one line, exit 2, no output."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from moco_d2.cli import run_tool
from moco_d2.convert import resnet, trunk
from moco_d2.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert-to-d2.py")
BN = ("weight", "bias", "running_mean", "running_var")


def hand_table():
    """torchvision name → Detectron2 name, written by hand, not from moco_d2."""
    table = {"conv1.weight": "stem.conv1.weight"}
    table.update({f"bn1.{t}": f"stem.conv1.norm.{t}" for t in BN})
    for tv_stage, d2_stage, blocks in (
        ("layer1", "res2", 3),
        ("layer2", "res3", 4),
        ("layer3", "res4", 6),
        ("layer4", "res5", 3),
    ):
        for b in range(blocks):
            tv, d2 = f"{tv_stage}.{b}", f"{d2_stage}.{b}"
            for k in "123":
                table[f"{tv}.conv{k}.weight"] = f"{d2}.conv{k}.weight"
                table.update({f"{tv}.bn{k}.{t}": f"{d2}.conv{k}.norm.{t}" for t in BN})
            if b == 0:
                table[f"{tv}.downsample.0.weight"] = f"{d2}.shortcut.weight"
                table.update({f"{tv}.downsample.1.{t}": f"{d2}.shortcut.norm.{t}" for t in BN})
    return table


@pytest.fixture(scope="module")
def r50():
    """A torchvision ResNet-50 state_dict with random weights (fc: ImageNet classifier)."""
    torch.manual_seed(0)
    return torchvision.models.resnet50().state_dict()


def trunk_of(state):
    return {
        k: v
        for k, v in state.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def released(state, module="module."):
    """The released MoCo checkpoint layout around ``state`` as the query encoder."""
    q = {
        **trunk_of(state),
        "fc.0.weight": torch.zeros(2048, 2048),
        "fc.0.bias": torch.zeros(2048),
        "fc.2.weight": torch.zeros(128, 2048),
        "fc.2.bias": torch.zeros(128),
    }
    sd = {f"{module}encoder_q.{k}": v for k, v in q.items()}
    sd.update({f"{module}encoder_k.{k}": v for k, v in q.items()})
    sd.update({f"{module}queue": torch.randn(128, 64), f"{module}queue_ptr": torch.zeros(1)})
    return {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}}}


# ---- names ---------------------------------------------------------------------------------


def test_all_265_tensors_map_as_the_hand_written_table_says():
    table = hand_table()
    assert len(table) == 265 == 53 + 4 * 53
    assert list(resnet.resnet50_shapes()) == list(table)
    assert {name: resnet.to_detectron2(name) for name in table} == table


def test_expected_shapes_are_torchvision_resnet50s_in_its_order(r50):
    expected = [(k, tuple(v.shape)) for k, v in trunk_of(r50).items()]
    assert list(resnet.resnet50_shapes().items()) == expected


@pytest.mark.parametrize(
    "name",
    [
        "fc.weight",
        "layer5.0.conv1.weight",
        "layer1.0.bn1.foo.x",
        "layer1.0.downsample.2.weight",
        "layer1.x.conv1.weight",
    ],
)
def test_a_name_outside_the_trunk_is_not_renamed(name):
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        resnet.to_detectron2(name)


def test_complete_trunk_passes(r50):
    resnet.check_complete(trunk_of(r50))


def test_missing_bn_buffer_is_named(r50):
    tensors = trunk_of(r50)
    del tensors["layer2.1.bn2.running_var"]
    with pytest.raises(
        UserError,
        match=r"^not a complete ResNet-50 trunk: 1 missing "
        r"\(layer2\.1\.bn2\.running_var\)$",
    ):
        resnet.check_complete(tensors)


def test_extra_and_wrong_shape_are_named(r50):
    tensors = trunk_of(r50)
    tensors["layer2.0.se.weight"] = torch.zeros(512)
    tensors["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(UserError) as e:
        resnet.check_complete(tensors)
    assert str(e.value) == (
        "not a complete ResNet-50 trunk: 1 unexpected (layer2.0.se.weight); "
        "1 with the wrong shape (conv1.weight [64, 3, 3, 3] ≠ [64, 3, 7, 7])"
    )


def test_resnet18_is_recognised_and_refused():
    with pytest.raises(UserError) as e:
        resnet.check_complete(trunk_of(torchvision.models.resnet18().state_dict()))
    message = str(e.value)
    assert message.startswith("not a complete ResNet-50 trunk; it looks like ResNet-18: ")
    assert "missing (conv1.weight" not in message and "layer1.0.conv3.weight" in message
    assert "wrong shape" in message and "\n" not in message


# ---- input layouts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, fmt, n_dropped",
    [
        (
            lambda sd: released(sd),
            "MoCo checkpoint, state_dict with module.encoder_q.*",
            4 + 269 + 2,
        ),
        (
            lambda sd: released(sd, module=""),
            "MoCo checkpoint, state_dict with encoder_q.*",
            4 + 269 + 2,
        ),
        (
            lambda sd: {
                k[len("encoder_q.") :]: v
                for k, v in released(sd, "")["state_dict"].items()
                if k.startswith("encoder_q.")
            },
            "bare query-encoder state_dict",
            4,
        ),
        (lambda sd: sd, "torchvision ResNet state_dict with an ImageNet classifier", 2 + 53),
    ],
)
def test_each_layout_is_detected_and_gives_the_query_trunk(r50, make, fmt, n_dropped):
    found = trunk.find_trunk(make(r50), "x.pth")
    assert found.format.startswith(fmt)
    assert found.tensors.keys() == trunk_of(r50).keys()
    assert all(found.tensors[k] is v for k, v in trunk_of(r50).items())
    assert len(found.dropped) == n_dropped  # head, key encoder, queue, BN counters


def test_a_moco_checkpoint_drops_key_encoder_queue_and_head(r50):
    found = trunk.find_trunk(released(r50), "x.pth")
    assert "module.queue" in found.dropped and "module.queue_ptr" in found.dropped
    assert "module.encoder_q.fc.2.weight" in found.dropped
    assert "module.encoder_k.conv1.weight" in found.dropped


# ---- the tool ------------------------------------------------------------------------------


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_tool("moco_d2.convert.tool", argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_converts_released_checkpoint_with_report(r50, tmp_path, capsys):
    src, dst = tmp_path / "checkpoint_0199.pth.tar", tmp_path / "out" / "moco.pkl"
    torch.save(released(r50), src)
    code, out, err = run([str(src), str(dst), "--report"], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:3] == [
        "input format: MoCo checkpoint, state_dict with module.encoder_q.*",
        "second trunks dropped (--trunk takes one instead): module.encoder_k",
        "input normalisation: RGB with ImageNet mean/std (PyTorch releases): "
        'MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]" MODEL.PIXEL_STD "[58.395, 57.12, 57.375]" '
        "INPUT.FORMAT RGB",
    ]
    assert lines[3].split() == ["conv1.weight", "->", "stem.conv1.weight", "[64,", "3,", "7,", "7]"]
    assert len(lines) == 3 + 265 + 275 + 1 and lines[-1] == f"wrote 265 tensors to {dst}"
    dropped = {line.split()[1] for line in lines[268:-1] if line.startswith("dropped  ")}
    assert len(dropped) == 275 and {"module.queue", "module.encoder_q.fc.2.bias"} <= dropped
    with open(dst, "rb") as f:
        data = pickle.load(f)
    assert data["matching_heuristics"] is True and data["__author__"].startswith("moco_d2")
    expected = {d2: r50[tv].numpy() for tv, d2 in hand_table().items()}
    assert data["model"].keys() == expected.keys()
    for name, array in data["model"].items():
        assert isinstance(array, np.ndarray) and np.array_equal(array, expected[name]), name
    assert os.listdir(dst.parent) == ["moco.pkl"]  # no temporary left behind


class Custom:
    pass


def bad_inputs(r50, d):
    """name → (file to convert, what the error line must say)."""
    r18 = {
        "state_dict": {
            "module.encoder_q." + k: v
            for k, v in torchvision.models.resnet18().state_dict().items()
        }
    }
    no_buffer = released(r50)
    del no_buffer["state_dict"]["module.encoder_q.layer3.5.bn3.running_mean"]
    # A prefix no release uses: no rule says it is the trunk to take.
    wrong_prefix = {"state_dict": {"module.trunk." + k: v for k, v in r50.items()}}
    nan = released(r50)  # two bad tensors: the first in torchvision order is named
    nan["state_dict"] = {k: v.clone() for k, v in nan["state_dict"].items()}
    nan["state_dict"]["module.encoder_q.layer4.2.conv3.weight"][0, 0] = float("inf")
    nan["state_dict"]["module.encoder_q.layer2.1.bn2.running_var"][:3] = float("nan")
    cases = {
        "missing": (d / "nope.pth", None, "no such file: "),
        "directory": (d, None, "is a directory"),
        "text": (
            d / "notes.txt",
            b"epoch 200, top-1 67.5\n",
            "is not a readable PyTorch checkpoint",
        ),
        "empty": (d / "empty.pth", b"", "is not a readable PyTorch checkpoint"),
        "no tensors": (
            d / "meta.pth",
            {"epoch": 3, "arch": "resnet50"},
            "is not a checkpoint of tensors",
        ),
        "resnet18": (d / "r18.pth", r18, "it looks like ResNet-18"),
        "bn buffer": (d / "nobuf.pth", no_buffer, "1 missing (layer3.5.bn3.running_mean)"),
        "prefix": (d / "prefix.pth", wrong_prefix, "trunks under module.trunk, and no rule"),
        "code": (d / "code.pth", {"state_dict": {}, "hook": Custom()}, "refused to load"),
        "non-finite": (
            d / "nan.pth.tar",
            nan,
            "tensor module.encoder_q.layer2.1.bn2.running_var holds non-finite values "
            "(3 NaN, 0 inf of 128)",
        ),
        "plain pickle": (
            d / "converted.pkl",
            pickle.dumps({"model": {"a": np.zeros(2)}}),
            "holds Detectron2 weights",
        ),
    }
    good = d / "good.pth"
    torch.save(r50, good)
    cases["truncated"] = (
        d / "truncated.pth",
        good.read_bytes()[: os.path.getsize(good) // 2],
        "is truncated or corrupt",
    )
    for path, content, _ in cases.values():
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
    return cases


@pytest.fixture(scope="module")
def bad(r50, tmp_path_factory):
    return bad_inputs(r50, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "text",
        "empty",
        "no tensors",
        "resnet18",
        "bn buffer",
        "prefix",
        "code",
        "plain pickle",
        "truncated",
        "non-finite",
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(bad, case, tmp_path, capsys):
    path, _, says = bad[case]
    out_file = tmp_path / "out.pkl"
    code, out, err = run([str(path), str(out_file)], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert os.listdir(tmp_path) == []


def test_arbitrary_pickle_code_is_refused_with_the_reason(bad, tmp_path, capsys):
    _, _, err = run([str(bad["code"][0]), str(tmp_path / "o.pkl")], capsys)
    assert "test_convert.Custom" in err and "can run arbitrary code" in err


def test_output_must_be_pkl_for_detectron2(bad, tmp_path, capsys):
    code, _, err = run([str(bad["truncated"][0]), str(tmp_path / "o.pth")], capsys)
    assert code == 2 and "must end in .pkl" in err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", ["truncated", "resnet18", "non-finite"])
def test_real_tool_fails_cleanly(bad, case, tmp_path):
    path, _, says = bad[case]
    result = subprocess.run(
        [sys.executable, TOOL, str(path), str(tmp_path / "o.pkl")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and says in errors[0], result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "dtype, suffix", [(torch.bfloat16, ".pth"), (torch.float16, ".safetensors")]
)
def test_half_precision_trunks_convert_to_float32_and_say_so(r50, tmp_path, capsys, dtype, suffix):
    from safetensors.torch import save_file

    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in r50.items()}
    src, dst = tmp_path / f"r50{suffix}", tmp_path / "r50.pkl"
    (save_file if suffix == ".safetensors" else torch.save)(half, str(src))
    code, out, err = run([str(src), str(dst)], capsys)
    assert (code, err) == (0, "")
    assert f"stored as {str(dtype).removeprefix('torch.')}" in out and "converted to float32" in out
    with open(dst, "rb") as f:
        model = pickle.load(f)["model"]
    for tv, d2 in hand_table().items():
        assert model[d2].dtype == np.float32, d2
        assert np.array_equal(model[d2], half[tv].float().numpy()), d2


def test_converts_this_projects_pretraining_checkpoint(tmp_path, capsys):
    from moco_d2 import io as ckpt
    from moco_d2.pretrain import MoCo

    torch.manual_seed(0)
    moco = MoCo(torchvision.models.resnet50, K=256)
    state = {
        "epoch": 1,
        "arch": "resnet50",
        "state_dict": ckpt.add_module_prefix(moco.state_dict()),
        "rng": ckpt.get_rng_state(),
    }
    src = ckpt.save_checkpoint(state, str(tmp_path), 0)
    code, out, _ = run([src, str(tmp_path / "moco.pkl")], capsys)
    assert code == 0 and out.startswith("input format: MoCo checkpoint, state_dict with module.")
    with open(tmp_path / "moco.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    q = moco.encoder_q.state_dict()
    assert all(np.array_equal(model[d2], q[tv].numpy()) for tv, d2 in hand_table().items())
