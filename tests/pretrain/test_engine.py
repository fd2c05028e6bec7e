"""The sync-free training step against the released per-step one, and the device-augmented
batch path, on CPU."""

import copy

import pytest
import torch
import torchvision

from moco_d2.pretrain import MoCo
from moco_d2.pretrain.device_augment import DeviceAugment
from moco_d2.pretrain.engine import TrainingDiverged, train_one_epoch, views_to_device

CPU = torch.device("cpu")


def _batches(n_iters=6, batch=8, size=32, uint8=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_iters):
        if uint8:
            images = torch.randint(0, 256, (batch, 2, 3, size, size), generator=g).to(torch.uint8)
        else:
            images = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
        out.append(
            (images, torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
        )
    return out


def _setup(released):
    torch.manual_seed(0)
    model = MoCo(torchvision.models.resnet18, K=32, bn_splits=2, foreach_momentum=not released)
    kernel = {"foreach": False} if released else {"foreach": True}
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        0.05,
        momentum=0.9,
        weight_decay=1e-4,
        **kernel,
    )
    return model, opt


def _train(released, batches, **kw):
    model, opt = _setup(released)
    torch.manual_seed(1)
    stats = train_one_epoch(
        model,
        batches,
        opt,
        0,
        CPU,
        0.05,
        print_freq=4,
        show_progress=False,
        sync_every_step=released,
        **kw,
    )
    return model, stats


def test_sync_free_step_gives_the_per_step_losses_and_weights():
    batches = _batches()
    released, a = _train(True, batches)
    fast, b = _train(False, batches)
    assert len(a["losses"]) == len(b["losses"]) == 6
    assert a["losses"] == b["losses"]
    assert a["acc1"] == b["acc1"] and a["loss"] == pytest.approx(sum(a["losses"]) / 6)
    for (name, x), y in zip(released.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(x, y), name
    assert len(set(a["losses"])) > 1  # it trained


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


def test_non_finite_loss_reports_the_iteration_range():
    batches = _batches(n_iters=6)
    model, opt = _setup(False)
    with pytest.raises(
        TrainingDiverged, match=r"non-finite loss \(nan\) at epoch 0, iterations 0-3"
    ):
        batches[2][0][0][:] = float("nan")
        train_one_epoch(model, batches, opt, 0, CPU, 0.05, print_freq=4, show_progress=False)


def test_uint8_crops_are_augmented_on_the_device_query_first():
    batches = _batches(n_iters=1, batch=4, uint8=True)
    crops = batches[0][0]
    aug = DeviceAugment(True)
    torch.manual_seed(7)
    im_q, im_k = views_to_device(crops, CPU, aug, channels_last=True)
    torch.manual_seed(7)
    assert torch.equal(im_q, aug(crops[:, 0])) and torch.equal(im_k, aug(crops[:, 1]))
    assert im_q.is_contiguous(memory_format=torch.channels_last)
    assert im_q.dtype == torch.float32 and im_q.shape == (4, 3, 32, 32)
