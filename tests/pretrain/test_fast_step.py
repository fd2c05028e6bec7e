"""The fast step reads nothing back from the device: decode (--decode-on device), augmentation,
forward, backward and SGD, built by the tool's own setup functions.

On CPU the step is counted with OpCounter: no ``aten::_local_scalar_dense`` (a host read of a
device value; on CUDA each is a stream sync). On CUDA three steps run under
``torch.cuda.set_sync_debug_mode("error")``. ``decode_jpeg`` is exempt: nvJPEG's batched decode
synchronises inside torchvision, so that one call runs with the mode relaxed (the real decoder,
wrapped); everything else in the step is checked. Logging at ``--print-freq`` and the health
check run outside the step (``train_one_epoch``) and are not counted.
"""

import contextlib

import pytest
import torch

from moco_d2.pretrain import device_decode
from moco_d2.synthetic import make_synthetic_image_folder
from moco_d2.pretrain.engine import train_step
from moco_d2.pretrain.main import build_parser
from moco_d2.pretrain.setup import (
    bn_splits_for,
    build_model,
    build_optimizer,
    build_train_data,
    build_train_loader,
    wrap_for_training,
)
from moco_d2.pretrain.speed_flags import resolve_speed_arguments
from moco_d2.training.distributed import one_process
from moco_d2.utils.op_count import OpCounter

BATCH = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """JPEGs (decoded on the device) and PNGs (the CPU path's crops): mixed batches."""
    root = tmp_path_factory.mktemp("fast_step")
    make_synthetic_image_folder(str(root / "jpg"), num_images=12, size=72, seed=0)
    make_synthetic_image_folder(str(root / "png"), num_images=4, size=72, seed=1, ext="png")
    return root


class FastStep:
    """The tool's run of ``argv`` on ``device``, one process: its loader's batches and its step."""

    def __init__(self, data_dir, device, *extra):
        argv = [str(data_dir), "-a", "resnet18", "-b", str(BATCH), "--crop-size", "64"]
        argv += ["--moco-k", "32", "-j", "0", "--decode-on", "device", "--seed", "0"]
        argv += ["--device", str(device), *extra]
        args = one_process(build_parser().parse_args(argv))
        resolve_speed_arguments(args, device)
        self.args, self.device = args, device
        self.data = build_train_data(args, str(data_dir))
        self.batches = iter(build_train_loader(self.data, args, BATCH, 0, device).epoch(0))
        torch.manual_seed(0)
        model = build_model(args, device, bn_splits_for(args, BATCH))
        self.optimizer = build_optimizer(model, args, device)
        self.model = wrap_for_training(model, args, device)

    def next_batch(self):
        images, _, _ = next(self.batches)
        return images

    def __call__(self, images):
        a = self.args
        return train_step(
            self.model,
            images,
            self.optimizer,
            self.device,
            a.amp,
            self.data.augment,
            a.channels_last,
            self.data.decode,
        )


def test_the_fast_step_reads_nothing_back_on_cpu(data_dir):
    step = FastStep(data_dir, torch.device("cpu"))
    assert step.args.augment_on == "device" and step.data.decode is not None
    step(step.next_batch())  # warm-up: the optimizer's state is made here
    images = step.next_batch()
    assert images.crops is not None and len(images.paths) > 0  # both kinds in the batch
    with OpCounter() as counter:
        result = step(images)
    count = counter.count
    assert count.syncs == 0, count.by_op
    # the whole step was counted: decode, the batch put in order, augmentation, SGD
    for op in ("decode_jpeg", "index_copy_", "convolution_backward", "_foreach_add_"):
        assert count.by_op[op] > 0, op
    assert result.images == BATCH and result.unreadable == 0
    assert torch.isfinite(result.loss)


@contextlib.contextmanager
def _syncs_allowed():
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_three_fast_steps_on_cuda_never_sync(data_dir, monkeypatch):
    real_decode = device_decode.decode_jpeg

    def decode_jpeg(*args, **kwargs):  # exempt: nvJPEG synchronises inside torchvision
        with _syncs_allowed():
            return real_decode(*args, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", decode_jpeg)
    device = torch.device("cuda")
    step = FastStep(data_dir, device, "--amp")
    assert step.args.channels_last and step.data.decode is not None
    step(step.next_batch())  # warm-up
    batches = [step.next_batch() for _ in range(3)]
    assert all(b.layout.is_pinned() for b in batches)
    assert any(b.crops is not None for b in batches)
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for images in batches:
            losses.append(step(images).loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(loss) for loss in losses)
