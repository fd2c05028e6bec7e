"""The training step as the tool builds it (``Pretrainer``): an epoch that reads the loss back
only every ``--print-freq`` iterations equals the released per-step ``.item()`` run, and the step
reads nothing back from the device.

On CPU the step is counted with OpCounter: no ``aten::_local_scalar_dense`` (a host read of a
device value; on CUDA each is a stream sync). On CUDA three steps run under
``torch.cuda.set_sync_debug_mode("error")``. ``decode_jpeg`` is exempt: nvJPEG's batched decode
synchronises inside torchvision, so that one call runs with the mode relaxed (the real decoder,
wrapped); everything else in the step is checked. Logging at ``--print-freq`` and the health
check run outside the step (``Pretrainer.train_epoch``) and are not counted.
"""

import contextlib
import copy

import pytest
import torch
import torchvision
from op_count import OpCounter

from moco_d2 import io
from moco_d2.launch import one_process
from moco_d2.pretrain import MoCo, device_decode
from moco_d2.pretrain.config import PretrainConfig
from moco_d2.pretrain.device_augment import DeviceAugment
from moco_d2.pretrain.main import (
    Pretrainer,
    build_model,
    build_optimizer,
    epoch_seed,
    train_step,
    views_to_device,
)
from moco_d2.synthetic import make_synthetic_image_folder

BATCH = 8
CPU = torch.device("cpu")


def _pretrainer(data, out, device, *extra):
    argv = [str(data), "-a", "resnet18", "-b", str(BATCH), "--crop-size", "64", "--moco-k", "32"]
    argv += ["-j", "0", "--seed", "0", "--epochs", "1", "--device", str(device)]
    argv += ["--output-dir", str(out), *extra]
    return Pretrainer(PretrainConfig.parse(argv), one_process(device))


def test_the_sync_free_epoch_gives_the_released_per_step_losses_and_weights(tmp_path):
    """The tool's epoch (foreach SGD and momentum, the loss read every 3 iterations) against the
    released loop built from the same config: per-parameter SGD and momentum update, and the
    loss read after every forward. Four iterations: a window of three, then the epoch's last."""
    data = make_synthetic_image_folder(str(tmp_path / "data"), num_images=32, size=40)
    trainer = _pretrainer(data, tmp_path / "out", CPU, "-p", "3")
    fast = trainer.train_epoch(0)

    c = trainer.config
    io.seed_all(c.seed)
    model = build_model(c, CPU, foreach_momentum=False)
    optimizer = build_optimizer(model, c, CPU, kernel={"foreach": False})
    io.seed_all(epoch_seed(c.seed, 0, 0))
    for group in optimizer.param_groups:
        group["lr"] = c.lr_at(0)
    model.train()
    losses = []
    for images, _, _ in trainer.loader.epoch(0):
        train_step(
            model, images, optimizer, trainer.data, c, CPU, lambda x: losses.append(x.item())
        )

    assert len(losses) == len(fast["losses"]) == 4 and len(set(losses)) > 1  # it trained
    assert fast["losses"] == losses
    assert fast["loss"] == pytest.approx(sum(losses) / 4)
    for (name, x), y in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(x, y), name


def test_foreach_momentum_update_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    loop = MoCo(torchvision.models.resnet18, K=16, m=0.9, foreach_momentum=False)
    with torch.no_grad():
        for p in loop.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    fused = copy.deepcopy(loop)
    fused.foreach_momentum = True
    before = {n: p.detach().clone() for n, p in loop.encoder_k.named_parameters()}
    query = {n: p.detach().clone() for n, p in loop.encoder_q.named_parameters()}
    loop._momentum_update_key_encoder()
    fused._momentum_update_key_encoder()
    for (name, x), y in zip(loop.encoder_k.named_parameters(), fused.encoder_k.parameters()):
        assert torch.equal(x, y), name
        torch.testing.assert_close(x, 0.9 * before[name] + 0.1 * query[name])
        assert not torch.equal(x, before[name]), name


def test_uint8_crops_are_augmented_on_the_device_query_first():
    crops = torch.randint(0, 256, (4, 2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    crops = crops.to(torch.uint8)
    aug = DeviceAugment(True)
    torch.manual_seed(7)
    im_q, im_k = views_to_device(crops, CPU, aug, channels_last=True)
    torch.manual_seed(7)
    assert torch.equal(im_q, aug(crops[:, 0])) and torch.equal(im_k, aug(crops[:, 1]))
    assert im_q.is_contiguous(memory_format=torch.channels_last)
    assert im_q.dtype == torch.float32 and im_q.shape == (4, 3, 32, 32)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """JPEGs (decoded on the device) and PNGs (the CPU path's crops): mixed batches."""
    root = tmp_path_factory.mktemp("fast_step")
    make_synthetic_image_folder(str(root / "jpg"), num_images=12, size=72, seed=0)
    make_synthetic_image_folder(str(root / "png"), num_images=4, size=72, seed=1, ext="png")
    return root


class FastStep:
    """The tool's run of ``--decode-on device`` on ``device``, one process: its loader's batches
    and its step."""

    def __init__(self, data, out, device, *extra):
        self.trainer = _pretrainer(data, out, device, "--decode-on", "device", *extra)
        self.batches = iter(self.trainer.loader.epoch(0))

    def next_batch(self):
        images, _, _ = next(self.batches)
        return images

    def __call__(self, images):
        t = self.trainer
        return train_step(t.train_model, images, t.optimizer, t.data, t.config, t.device)


def test_the_fast_step_reads_nothing_back_on_cpu(mixed_dir, tmp_path):
    step = FastStep(mixed_dir, tmp_path, CPU)
    assert step.trainer.config.augment_on == "device" and step.trainer.data.decode is not None
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
def test_three_fast_steps_on_cuda_never_sync(mixed_dir, tmp_path, monkeypatch):
    real_decode = device_decode.decode_jpeg

    def decode_jpeg(*args, **kwargs):  # exempt: nvJPEG synchronises inside torchvision
        with _syncs_allowed():
            return real_decode(*args, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", decode_jpeg)
    step = FastStep(mixed_dir, tmp_path, torch.device("cuda"), "--amp")
    assert step.trainer.config.channels_last and step.trainer.data.decode is not None
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
