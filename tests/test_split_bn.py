"""SplitBatchNorm against per-group F.batch_norm references, in both memory formats."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco_d2.pretrain.split_bn import SplitBatchNorm, convert_split_bn

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
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


class Reference:
    """Group g = samples g, g + S, g + 2S, ...: each through F.batch_norm with its own buffers."""

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
        for g in range(S):
            out[g::S] = F.batch_norm(
                x[g::S], self.mean[g], self.var[g], self.weight, self.bias, True, momentum, 1e-5
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


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
    ids=["default", "cumulative", "no-affine", "no-running-stats"],
)
def test_matches_per_group_reference_fp32(fmt, kwargs):
    bn = _bn(**kwargs)
    split = convert_split_bn(copy.deepcopy(bn), S)
    assert isinstance(split, SplitBatchNorm)
    _check_steps(split, Reference(bn), fmt, torch.float32, "cpu", {"rtol": 1e-5, "atol": 1e-5})


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_matches_per_group_reference_under_bf16_autocast(fmt):
    bn = _bn()
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
