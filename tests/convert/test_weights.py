"""No code runs from a weights file, whichever tool reads it.

Each payload, when unpickled, would create a marker file. It is stored alone, and inside a
file that also holds a full set of real weights (so that nothing but the payload is wrong),
as ``.pkl`` (Detectron2 weights) and as ``.pth``, also inside the one object a checkpoint may
hold (an ``argparse.Namespace``, as DINO, PixPro and timm save their arguments). Every entry
point must refuse the file with one line naming it, and the marker must never appear.
"""

import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from transfer_tiny import TINY_OPTS

from moco_d2 import io
from moco_d2.convert import trunk
from moco_d2.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "voc_R50_C4.yaml")


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pkl(path, content):
    with open(path, "wb") as f:
        pickle.dump(content, f)
    return str(path)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a payload in a weights file ran"


@pytest.fixture
def d2_payloads(converted_weights, marker, tmp_path):
    """Detectron2 weights files with a payload: .pkl and .pth, alone and among real trunk."""
    with open(converted_weights, "rb") as f:
        real = pickle.load(f)  # our own converter's output, trusted here
    tensors = {k: torch.from_numpy(v) for k, v in real["model"].items()}
    embedded = dict(real, model=dict(real["model"], **{"res2.0.extra": Payload(marker)}))
    return {
        "pkl alone": write_pkl(tmp_path / "alone.pkl", Payload(marker)),
        "pkl embedded": write_pkl(tmp_path / "embedded.pkl", embedded),
        "pth alone": _torch_save(tmp_path / "alone.pth", Payload(marker)),
        "pth embedded": _torch_save(
            tmp_path / "embedded.pth", {"model": tensors, "iteration": 1, "x": Payload(marker)}
        ),
    }


@pytest.fixture
def trunk_payloads(marker, tmp_path):
    """Pretraining-side files with a payload: alone, and beside a full ResNet-18 state_dict."""
    state = {"module." + k: v for k, v in torchvision.models.resnet18().state_dict().items()}
    return {
        "pth alone": _torch_save(tmp_path / "alone.pth.tar", Payload(marker)),
        "pth embedded": _torch_save(
            tmp_path / "embedded.pth.tar",
            {"epoch": 1, "arch": "resnet18", "state_dict": state, "hook": Payload(marker)},
        ),
        "pkl embedded": write_pkl(
            tmp_path / "embedded.pkl", {"state_dict": state, "x": Payload(marker)}
        ),
        "namespace embedded": _torch_save(
            tmp_path / "namespace.pth",
            {"state_dict": state, "args": argparse.Namespace(lr=0.1, hook=Payload(marker))},
        ),
        # DeepMind's BYOL checkpoints are JAX/Haiku objects pickled with dill.
        "byol pkl": _write_bytes(tmp_path / "byol.pkl", b"\x80\x02cdill._dill\n_load_type\n)R."),
    }


def _write_bytes(path, content):
    path.write_bytes(content)
    return str(path)


def _torch_save(path, content):
    torch.save(content, path)
    return str(path)


def assert_refused(error, path):
    message = str(error.value)
    assert "\n" not in message and path in message, message
    assert "refused to load" in message and "weights_only=False" not in message


# The reader itself.


def test_restricted_unpickler_loads_plain_containers_and_numpy(tmp_path):
    content = {
        "model": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5)},
        "__author__": "x",
        "tuple": (1, "two", None, True),
        "set": {1, 2},
    }
    path = write_pkl(tmp_path / "ok.pkl", content)
    loaded = io.load_file(path)
    assert np.array_equal(loaded["model"]["a"], content["model"]["a"])
    assert loaded["model"]["b"] == 2.5 and loaded["tuple"] == content["tuple"]
    assert loaded["set"] == {1, 2}
    assert io.load_pickle(write_pkl(tmp_path / "p2.pkl", content)) is not None
    with open(tmp_path / "p2.pkl", "wb") as f:
        pickle.dump(content, f, protocol=2)  # how Python 2 era model-zoo files are written
    assert np.array_equal(
        io.load_file(str(tmp_path / "p2.pkl"))["model"]["a"], content["model"]["a"]
    )


TRUNK_CASES = ["pth alone", "pth embedded", "pkl embedded", "namespace embedded", "byol pkl"]


@pytest.mark.parametrize("case", TRUNK_CASES)
def test_reader_refuses_payloads(trunk_payloads, case):
    with pytest.raises(UserError) as e:
        trunk.read_trunk(trunk_payloads[case])
    assert_refused(e, trunk_payloads[case])


class MkdirPayload:
    """Names ``os.mkdir``: torch words this refusal "unsupported GLOBAL ... is blocked"."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_blocked_module_payload_is_refused_with_the_object_named(marker, tmp_path, suffix):
    path = str(tmp_path / f"mkdir{suffix}")
    if suffix == ".pkl":
        write_pkl(path, {"model": {"a": np.zeros(2)}, "x": MkdirPayload(marker)})
    else:
        torch.save({"state_dict": {"a": torch.zeros(2)}, "x": MkdirPayload(marker)}, path)
    with pytest.raises(UserError) as e:
        io.load_file(path)
    assert_refused(e, path)
    assert "mkdir" in str(e.value)


def test_random_bytes_are_one_line_without_unsafe_advice(tmp_path):
    for name in ("random.pkl", "random.pth", "random.pth.tar"):
        path = tmp_path / name
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        with pytest.raises(UserError) as e:
            io.load_file(str(path))
        message = str(e.value)
        assert "\n" not in message and str(path) in message and "corrupt" in message
        assert "weights_only" not in message


@pytest.mark.parametrize(
    "content, kind, fmt",
    [
        (
            lambda s: {
                "state_dict": {"module.encoder_q." + k: v for k, v in s.items()},
                "arch": "resnet18",
            },
            trunk.MOCO,
            "MoCo checkpoint",
        ),
        (lambda s: s, trunk.TORCHVISION, "torchvision ResNet state_dict with an ImageNet"),
        (
            lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}, "best_acc1": 1.0},
            trunk.LINCLS,
            "lincls checkpoint",
        ),
    ],
)
def test_reader_describes_what_it_found(tmp_path, content, kind, fmt):
    state = torchvision.models.resnet18().state_dict()
    path = _torch_save(tmp_path / "w.pth", content(state))
    found = trunk.read_trunk(path)
    assert found.kind == kind and found.format.startswith(fmt)
    expected = {k for k in state if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))}
    assert set(found.tensors) == expected
    assert all(torch.equal(found.tensors[k], state[k]) for k in expected)


def test_state_dict_error_keeps_the_detail():
    model = torch.nn.Linear(2, 3)
    with pytest.raises(RuntimeError) as e:
        model.load_state_dict({"weight": torch.zeros(3, 2)})
    line = trunk.state_dict_error(e.value)
    assert "\n" not in line and "Missing key(s)" in line and '"bias"' in line


# The tools.


@pytest.mark.parametrize("case", TRUNK_CASES)
def test_converter_refuses_payloads(trunk_payloads, case, tmp_path):
    from moco_d2.convert import tool

    with pytest.raises(UserError) as e:
        tool.main([trunk_payloads[case], str(tmp_path / "out.pkl")])
    assert_refused(e, trunk_payloads[case])
    assert not (tmp_path / "out.pkl").exists()


@pytest.mark.parametrize(
    "flag, case",
    [
        *(
            (flag, case)
            for flag in ("--pretrained", "--resume")
            for case in ("pth alone", "pth embedded", "namespace embedded")
        ),
        ("--pretrained", "byol pkl"),
    ],
)
def test_lincls_refuses_payloads(trunk_payloads, case, flag, tmp_path):
    from moco_d2.lincls.main import main
    from moco_d2.synthetic import make_synthetic_image_folder

    data = tmp_path / "data"
    for split in ("train", "val"):
        make_synthetic_image_folder(data / split, num_images=4, size=32, num_classes=2)
    with pytest.raises(UserError) as e:
        main(
            [
                str(data),
                "-a",
                "resnet18",
                flag,
                trunk_payloads[case],
                "--device",
                "cpu",
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
    assert_refused(e, trunk_payloads[case])


@pytest.mark.parametrize("case", ["pkl alone", "pkl embedded", "pth alone", "pth embedded"])
def test_detection_checkpointer_refuses_payloads(d2_payloads, case):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone

    from moco_d2.detection.checkpoint import BackboneCheckingCheckpointer

    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    with pytest.raises(UserError) as e:
        BackboneCheckingCheckpointer(backbone).load(d2_payloads[case])
    assert_refused(e, d2_payloads[case])


def _train_net(*argv):
    from moco_d2.detection import train_net

    return train_net.main(["--config-file", CONFIG, *argv, *TINY_OPTS, "SOLVER.MAX_ITER", "1"])


@pytest.mark.parametrize("case", ["pkl alone", "pkl embedded", "pth embedded"])
def test_train_net_train_and_eval_only_refuse_payloads(d2_payloads, registered_voc, case, tmp_path):
    for extra in ([], ["--eval-only"]):
        with pytest.raises(UserError) as e:
            _train_net(*extra, "MODEL.WEIGHTS", d2_payloads[case], "OUTPUT_DIR", str(tmp_path))
        assert_refused(e, d2_payloads[case])
        assert not (tmp_path / "model_final.pth").exists()


@pytest.mark.parametrize("case", TRUNK_CASES)
def test_train_net_refuses_payloads_in_pretraining_checkpoints(
    trunk_payloads, registered_voc, case, tmp_path
):
    """MODEL.WEIGHTS may name a pretraining checkpoint (converted in memory): read as safely."""
    with pytest.raises(UserError) as e:
        _train_net("MODEL.WEIGHTS", trunk_payloads[case], "OUTPUT_DIR", str(tmp_path))
    assert_refused(e, trunk_payloads[case])


def test_train_net_resume_refuses_a_payload_checkpoint(
    d2_payloads, registered_voc, converted_weights, tmp_path
):
    os.replace(d2_payloads["pth embedded"], tmp_path / "model_0000004.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    with pytest.raises(UserError) as e:
        _train_net("--resume", "MODEL.WEIGHTS", str(converted_weights), "OUTPUT_DIR", str(tmp_path))
    assert_refused(e, str(tmp_path / "model_0000004.pth"))


def test_run_trials_refuses_a_payload(d2_payloads, synthetic_voc_root, tmp_path):
    out = tmp_path / "trials"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "run_trials.py"),
            "--config-file",
            CONFIG,
            "--num-trials",
            "1",
            "--output-dir",
            str(out),
            "MODEL.WEIGHTS",
            d2_payloads["pkl embedded"],
            "SOLVER.MAX_ITER",
            "1",
            *TINY_OPTS,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, DETECTRON2_DATASETS=str(synthetic_voc_root)),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"refused to load {d2_payloads['pkl embedded']}" in result.stderr
    assert not (out / "trial_0" / "metrics_voc.json").exists()
