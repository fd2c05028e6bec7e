"""SplitBatchNorm against per-group F.batch_norm references, in both memory formats; its counted
cost against BatchNorm2d; torch.compile against eager; the rules for BatchNorm groups (default
--bn-splits, degenerate groups refused)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from cost import FORMATS, bn_layer_cost
from torch import nn

from moco_d2.errors import UserError
from moco_d2.pretrain import main as pretrain
from moco_d2.pretrain.config import PretrainConfig
from moco_d2.pretrain.moco import MoCo
from moco_d2.pretrain.split_bn import (
    MIN_BN_VALUES,
    SplitBatchNorm,
    convert_split_bn,
    last_stage_positions,
    resolve_bn_splits,
)
from moco_d2.synthetic import make_synthetic_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

S = 3  # groups


def _bn(c=5, device="cpu", **kwargs):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(c, device=device, **kwargs)
    if bn.affine:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    if bn.track_running_stats:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def groups(x):
    """Batch positions of each group: interleaved in NCHW, contiguous chunks in channels_last."""
    n = x.shape[0]
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return [slice(g * n // S, (g + 1) * n // S) for g in range(S)]
    return [slice(g, None, S) for g in range(S)]


class Reference:
    """Each group of ``groups(x)`` through F.batch_norm with its own running buffers."""

    def __init__(self, bn):
        self.bn = bn
        self.weight = None if bn.weight is None else bn.weight.detach().clone().requires_grad_()
        self.bias = None if bn.bias is None else bn.bias.detach().clone().requires_grad_()
        track = bn.track_running_stats
        self.mean = [bn.running_mean.clone() if track else None for _ in range(S)]
        self.var = [bn.running_var.clone() if track else None for _ in range(S)]
        self.steps = 0

    def __call__(self, x):
        self.steps += 1
        momentum = self.bn.momentum if self.bn.momentum is not None else 1.0 / self.steps
        out = torch.empty_like(x)
        for g, group in enumerate(groups(x)):
            out[group] = F.batch_norm(
                x[group], self.mean[g], self.var[g], self.weight, self.bias, True, momentum, 1e-5
            )
        return out

    def running(self):
        return torch.stack(self.mean).mean(0), torch.stack(self.var).mean(0)


def _check_steps(split, ref, fmt, dtype, device, tol, amp=False):
    """Two training steps: outputs, input/weight/bias gradients and running statistics."""
    c = split.num_features
    for step in (1, 2):
        x = (torch.randn(12, c, 4, 3, device=device) * 3 + 1).to(dtype, memory_format=fmt)
        grad = torch.randn_like(x)
        x_split = x.clone().requires_grad_()
        x_ref = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = split(x_split)
            expected = ref(x_ref)
        out.backward(grad)
        expected.backward(grad)
        assert out.dtype == expected.dtype and out.shape == x.shape
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, expected, **tol)
        torch.testing.assert_close(x_split.grad, x_ref.grad, **tol)
        if split.affine:
            torch.testing.assert_close(split.weight.grad, ref.weight.grad, **tol)
            torch.testing.assert_close(split.bias.grad, ref.bias.grad, **tol)
            split.weight.grad = split.bias.grad = ref.weight.grad = ref.bias.grad = None
        if split.track_running_stats:
            mean, var = ref.running()
            assert split.running_mean.dtype == split.running_var.dtype == torch.float32
            torch.testing.assert_close(split.running_mean, mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(split.running_var, var, rtol=1e-5, atol=1e-6)
            assert int(split.num_batches_tracked) == step
        else:
            assert split.running_mean is None and split.num_batches_tracked is None


KWARGS = pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
    ids=["default", "cumulative", "no-affine", "no-running-stats"],
)


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@KWARGS
def test_matches_per_group_reference_fp32(fmt, kwargs):
    bn = _bn(**kwargs)
    split = convert_split_bn(copy.deepcopy(bn), S)
    assert isinstance(split, SplitBatchNorm)
    _check_steps(split, Reference(bn), fmt, torch.float32, "cpu", {"rtol": 1e-5, "atol": 1e-5})


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@KWARGS
def test_matches_per_group_reference_under_bf16_autocast(fmt, kwargs):
    bn = _bn(**kwargs)
    split = convert_split_bn(copy.deepcopy(bn), S)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what BatchNorm2d gives a bf16 input
        assert copy.deepcopy(bn)(torch.randn(6, 5, 2, 2, dtype=torch.bfloat16)).dtype == (
            torch.bfloat16
        )
    _check_steps(
        split, Reference(bn), fmt, torch.bfloat16, "cpu", {"rtol": 2e-2, "atol": 5e-2}, True
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_matches_per_group_reference_on_cuda(fmt):
    bn = _bn(device="cuda")
    split = convert_split_bn(copy.deepcopy(bn), S)
    _check_steps(split, Reference(bn), fmt, torch.float32, "cuda", {"rtol": 1e-4, "atol": 1e-4})
    bn = _bn(device="cuda")
    split = convert_split_bn(copy.deepcopy(bn), S)
    tol = {"rtol": 2e-2, "atol": 5e-2}
    _check_steps(split, Reference(bn), fmt, torch.bfloat16, "cuda", tol, True)


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_no_copy_of_the_input_is_kept_for_backward(fmt):
    """What backward keeps of a full-size tensor is the input itself, not a regrouped copy."""
    split = convert_split_bn(_bn(), S)
    x = torch.randn(12, 5, 4, 3).contiguous(memory_format=fmt).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        split(x)
    full = [t for t in saved if t.numel() == x.numel()]
    assert full
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in full)


def test_non_contiguous_input_matches_reference():
    bn = _bn()
    split = convert_split_bn(copy.deepcopy(bn), S)
    x = torch.randn(12, 5, 3, 8)[..., ::2].transpose(2, 3)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(split(x), Reference(bn)(x), rtol=1e-5, atol=1e-5)


def test_eval_mode_and_state_dict_are_batchnorm2d():
    bn = _bn()
    split = convert_split_bn(copy.deepcopy(bn), S)
    sd, expected = split.state_dict(), bn.state_dict()
    assert list(sd) == list(expected)
    assert all(sd[k].shape == v.shape and sd[k].dtype == v.dtype for k, v in expected.items())
    x = torch.randn(7, 5, 4, 4)  # any batch in eval mode
    split.eval()
    bn.eval()
    for fmt in FORMATS.values():
        torch.testing.assert_close(split(x.contiguous(memory_format=fmt)), bn(x))


def test_one_split_is_batchnorm2d():
    bn = _bn()
    assert convert_split_bn(bn, 1) is bn
    one = SplitBatchNorm(5, 1)
    one.load_state_dict(bn.state_dict())
    x = torch.randn(5, 5, 3, 3)
    torch.testing.assert_close(one(x), bn(x))
    torch.testing.assert_close(one.running_var, bn.running_var)


def test_convert_keeps_state_dtype_and_nesting():
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.Sequential(_bn().double()))
    converted = convert_split_bn(copy.deepcopy(model), S)
    split = converted[1][0]
    assert isinstance(split, SplitBatchNorm) and split.num_splits == S
    for k, v in model[1][0].state_dict().items():
        assert torch.equal(split.state_dict()[k], v) and split.state_dict()[k].dtype == v.dtype


def test_bad_batches_are_refused():
    split = SplitBatchNorm(5, S)
    with pytest.raises(ValueError, match="batch 10 is not divisible by num_splits 3"):
        split(torch.randn(10, 5, 2, 2))
    with pytest.raises(ValueError, match="one value per channel"):
        split(torch.randn(3, 5, 1, 1))
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        SplitBatchNorm(5, 0)


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_counted_cost_is_close_to_batchnorm2d(fmt):
    """SplitBatchNorm(8) on (64, 256, 28, 28): at most 12x the aten ops of BatchNorm2d, and the
    bytes of BatchNorm2d (NCHW: the free view) plus, in channels_last, one full-size copy: the
    ``cat`` that joins the per-chunk input gradients (BatchNorm2d moves 5 full-size tensors)."""
    plain, split = (
        bn_layer_cost(nn.BatchNorm2d(256), fmt),
        bn_layer_cost(SplitBatchNorm(256, 8), fmt),
    )
    assert plain.ops == 3  # native BN, its backward, num_batches_tracked += 1
    assert split.ops <= 12 * plain.ops
    assert split.syncs == 0
    limit = 1.01 if fmt == torch.contiguous_format else 1.41
    assert split.bytes <= limit * plain.bytes, split.bytes / plain.bytes
    if fmt == torch.channels_last:
        assert split.by_op["native_batch_norm"] == split.by_op["native_batch_norm_backward"] == 8
        assert split.by_op["cat"] == 1


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_an_inplace_relu_after_it_adds_no_copy(fmt):
    """As in a ResNet block (``ReLU(inplace=True)`` on the BN output): the output is no
    autograd view, so the backward copies nothing more than BatchNorm2d's does."""

    def bn_relu(module, x):
        return F.relu(module(x), inplace=True)

    plain = bn_layer_cost(nn.BatchNorm2d(256), fmt, forward=bn_relu)
    split = bn_layer_cost(SplitBatchNorm(256, 8), fmt, forward=bn_relu)
    for op in ("clone", "new_zeros", "as_strided_scatter"):
        assert split.by_op[op] == 0, op
    extra = split.bytes_by_op["cat"] + 2 * split.bytes_by_op["copy_"]  # cat: channels_last only
    assert split.bytes - extra <= 1.01 * plain.bytes, split.bytes / plain.bytes


def _inductor_finds_a_compiler():
    """Whether inductor's CPU backend finds the C++ compiler it builds its kernels with."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or the helper moved in another torch
        return False
    return True


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_resnet_encoder_with_split_bn_has_no_graph_break(fmt):
    """Dynamo alone (no compiler needed): a torchvision ResNet as the encoders are built."""
    import torchvision

    torch._dynamo.reset()
    encoder = convert_split_bn(torchvision.models.resnet18(num_classes=8), 2)
    encoder = encoder.to(memory_format=fmt).train()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=fmt)
    explanation = torch._dynamo.explain(encoder)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


class TinyEncoder(nn.Module):
    """Two conv-BN-ReLU blocks and a Linear ``fc``: a torchvision-style encoder cheap to compile."""

    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


@pytest.mark.skipif(not _inductor_finds_a_compiler(), reason="inductor finds no C++ compiler")
@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_compiled_encoders_equal_eager(fmt):
    """Two MoCo steps with the encoders compiled as ``build_model`` compiles them for
    ``--compile``: no graph break, and the same logits, query-encoder gradients, running
    statistics and queue as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MoCo(TinyEncoder, dim=8, K=16, bn_splits=2, shuffle="local").to(memory_format=fmt)
    compiled = copy.deepcopy(eager)
    compiled.encoder_q.compile()
    compiled.encoder_k.compile()
    images = [torch.randn(8, 3, 8, 8).contiguous(memory_format=fmt) for _ in range(4)]
    torch._dynamo.utils.counters.clear()
    results = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the same key shuffles
        for step in range(2):
            logits, labels = model(images[2 * step], images[2 * step + 1])
            F.cross_entropy(logits, labels).backward()
        results.append(logits.detach())
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both encoders compiled
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled.named_parameters()):
        if p_e.grad is not None:
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-5, msg=name)
    sd_e, sd_c = eager.state_dict(), compiled.state_dict()
    assert list(sd_e) == list(sd_c)
    assert any("running_var" in k for k in sd_e)
    for k, v in sd_e.items():
        torch.testing.assert_close(sd_c[k], v, rtol=1e-4, atol=1e-5, msg=k)
    torch._dynamo.reset()


def test_benchmark_reports_every_candidate_with_its_counted_cost(tmp_path):
    out = tmp_path / "split_bn.json"
    shape = ["16", "8", "6", "6"]
    command = [
        sys.executable, os.path.join(REPO, "benchmarks", "split_bn_overhead.py"),
        "--dtype", "bf16", "--shape", *shape, "--num-splits", "4",
        "--iters", "1", "--repeats", "1", "--warmup", "0", "--json", str(out),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    impls = {"module", "transpose", "chunks-cat", "native-view", "chunks"}
    assert {(r["format"], r["impl"]) for r in rows} == {(f, i) for f in FORMATS for i in impls}
    for row in rows:
        assert row["ms_bn2d"] > 0 and row["ms_split"] > 0 and row["ratio"] > 0
        if row["impl"] == "module":
            fmt = FORMATS[row["format"]]
            shape_ = tuple(map(int, shape))
            plain = bn_layer_cost(nn.BatchNorm2d(8), fmt, shape_)
            split = bn_layer_cost(SplitBatchNorm(8, 4), fmt, shape_)
            assert row["bytes_ratio"] == pytest.approx(split.bytes / plain.bytes)
            assert row["ops_ratio"] == pytest.approx(split.ops / plain.ops)


@pytest.mark.parametrize(
    "arch, crop, positions",
    [("resnet50", 224, 49), ("resnet50", 32, 1), ("resnet18", 64, 4), ("resnet18", 100, 16)],
)
def test_last_stage_positions_are_the_res5_grid(arch, crop, positions):
    # torchvision ResNets downsample by 32 with rounding up: 224 -> 7x7, 100 -> 4x4
    assert last_stage_positions(arch, crop) == positions


def test_default_bn_splits_keep_enough_values_per_channel():
    def splits(batch, distributed=False, **flags):
        return resolve_bn_splits(PretrainConfig(**flags), batch, distributed)

    assert splits(256) == 8  # unchanged for the real recipe: resnet50 at 224
    assert splits(32, distributed=True) == 1  # processes shuffle across each other instead
    assert splits(16, arch="resnet18", crop_size=64) == 4  # 4 images x 4 positions
    assert splits(32, crop_size=32) == 2  # not 8: 4 images x 1 position
    with pytest.raises(UserError, match=r"2 images per group x 4 .* = 8 values .*fewer --bn-s"):
        splits(8, arch="resnet18", crop_size=64, bn_splits=4)


def test_degenerate_bn_groups_are_refused_before_training(tmp_path):
    make_synthetic_image_folder(str(tmp_path / "data"), num_images=8, size=40, num_classes=2)
    argv = [str(tmp_path / "data"), "-a", "resnet50", "-b", "8", "--crop-size", "32"]
    argv += ["--device", "cpu", "--output-dir", str(tmp_path / "out"), "--workers", "0"]
    with pytest.raises(UserError) as refused:
        pretrain.main(argv)
    assert str(refused.value) == (
        "BatchNorm groups too small: 8 images per group x 1 last-stage positions at "
        f"--crop-size 32 = 8 values per channel (need >= {MIN_BN_VALUES}); use a larger "
        "--crop-size or a larger -b"
    )
    assert not list((tmp_path / "out").glob("checkpoint_*"))
