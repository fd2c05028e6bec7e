"""The counted cost of the step (benchmarks/cost.py, benchmarks/step_cost.py): the GPU
emulation on the meta device counts what real autocast runs, the whole fast step counts no host
sync and no copy for the BN emulation in NCHW, and the stated model gives back its fit point."""

import collections

import common
import pytest
import step_cost
import torch
import torch.nn.functional as F
import torchvision
from cost import GpuStepCounter, StepCount, fast_step_cost
from op_count import OpCount, OpCounter

SMALL = {"arch": "resnet18", "batch": 8, "crop_size": 64, "moco_k": 64}


def _forward_backward(device):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    labels = torch.zeros(4, dtype=torch.long, device=device)
    return model, x, labels


def test_gpu_step_counter_counts_what_autocast_runs():
    """A ResNet-18 step under real bf16 autocast (CPU tensors) against the emulation on meta
    tensors: the same ops with the same bytes, but for the casts, which autocast caches."""
    model, x, labels = _forward_backward("cpu")
    with OpCounter() as real:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
    model, x, labels = _forward_backward("meta")
    with GpuStepCounter() as emulated:
        F.cross_entropy(model(x).float(), labels).backward()
    casts = ("_to_copy",)
    for count in (real.count, emulated.count):
        count.by_op = collections.Counter({k: v for k, v in count.by_op.items() if k not in casts})
        count.bytes_by_op = collections.Counter(
            {k: v for k, v in count.bytes_by_op.items() if k not in casts}
        )
    assert emulated.count.by_op == real.count.by_op
    assert emulated.count.bytes_by_op == real.count.bytes_by_op
    assert emulated.count.by_op["convolution"] == 20  # conv1, 16 in the blocks, 3 shortcuts


def test_gpu_step_counter_keeps_channels_last_through_convolutions():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, device="meta").to(memory_format=torch.channels_last)
    x = torch.empty(2, 8, 16, 16, device="meta").contiguous(memory_format=torch.channels_last)
    with GpuStepCounter():
        y = conv(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.bfloat16
    assert conv(x).is_contiguous()  # without it, meta's convolution returns NCHW


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return common.make_jpeg_folder(str(tmp_path_factory.mktemp("img")), 2, size=(32, 32))


def test_fast_step_counts_no_sync_and_no_copy_for_split_bn_in_nchw(folder):
    counts = {
        (splits, cl): fast_step_cost(folder, splits, channels_last=cl, **SMALL)
        for splits in (1, 2)
        for cl in (True, False)
    }
    for step in counts.values():
        assert step.count.syncs == 0
        assert step.flops == counts[1, True].flops > 0  # the same convolutions whatever the BN
        assert step.compute_ops == counts[1, True].compute_ops > 0
        assert step.count.by_op["index_select"] > 0  # the augmentation ran in the step
    nchw_split, nchw_plain = counts[2, False].count, counts[1, False].count
    assert nchw_split.bytes <= 1.01 * nchw_plain.bytes  # no CopySlices behind the in-place ReLU
    assert nchw_split.by_op["clone"] == nchw_plain.by_op["clone"]
    # channels_last: one native BN per group and layer, forward (query and key) and backward
    layers = counts[1, True].count.by_op["native_batch_norm"]
    assert counts[2, True].count.by_op["native_batch_norm"] == 2 * layers


def test_the_stated_model_gives_back_its_fit_point():
    gpu = step_cost.MEASURED_GPU
    bandwidth, peak = step_cost.GPUS[gpu]
    one_second = bandwidth * step_cost.MEM_EFFICIENCY
    assert step_cost.predicted_ms(one_second, 0, gpu) == pytest.approx(1000)
    assert step_cost.predicted_ms(0, 250, gpu) == pytest.approx(250 * step_cost.LAUNCH_US / 1e3)
    step = StepCount(OpCount(ops=1000, bytes=int(150e9)), flops=int(8.3e12), compute_ops=200,
                     compute_bytes=int(40e9))  # fmt: skip
    memory_ms = step_cost.predicted_ms(110e9, 1000, gpu)
    measured_ms = 1e3 * step_cost.STEP_BATCH / step_cost.MEASURED_IMG_PER_S
    efficiency = step.flops / (peak * (measured_ms - memory_ms) / 1e3)
    assert step_cost.step_ms(step, gpu, efficiency) == pytest.approx(measured_ms)
