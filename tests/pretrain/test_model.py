"""MoCo model: logits, momentum update, queue and shuffled SplitBatchNorm keys vs references."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from moco_d2.pretrain import MoCo


class LinearEncoder(nn.Module):
    """BN-free encoder: its output for a sample does not depend on the rest of the batch."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _numpy_params(module):
    return {k: v.detach().numpy().copy() for k, v in module.named_parameters()}


def _normalize(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_logits_momentum_and_queue_match_hand_computation():
    torch.manual_seed(0)
    n, dim, K, m, T = 4, 8, 12, 0.9, 0.2
    model = MoCo(LinearEncoder, dim=dim, K=K, m=m, T=T, mlp=True, shuffle="local")
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    for _ in range(4):  # 4 steps of 4 keys wrap the 12-key ring once
        im_q, im_k = torch.randn(n, 3, 6, 6), torch.randn(n, 3, 6, 6)
        q_params, k_params = _numpy_params(model.encoder_q), _numpy_params(model.encoder_k)
        queue, ptr = model.queue.numpy().copy(), int(model.queue_ptr)

        logits, labels = model(im_q, im_k)

        new_k = {name: m * k_params[name] + (1 - m) * q_params[name] for name in k_params}
        for name, value in model.encoder_k.named_parameters():
            np.testing.assert_allclose(value.detach().numpy(), new_k[name], rtol=1e-6, atol=1e-7)
        ref_k_encoder = copy.deepcopy(model.encoder_q)
        ref_k_encoder.load_state_dict(
            {k: torch.from_numpy(v) for k, v in new_k.items()}, strict=False
        )
        with torch.no_grad():
            q = _normalize(model.encoder_q(im_q).numpy())
            k = _normalize(ref_k_encoder(im_k).numpy())
        expected = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue], axis=1) / T
        np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
        assert logits.shape == (n, 1 + K) and labels.dtype == torch.long and not labels.any()

        expected_queue = queue.copy()
        expected_queue[:, ptr : ptr + n] = k.T
        np.testing.assert_allclose(model.queue.numpy(), expected_queue, rtol=1e-5, atol=1e-6)
        assert int(model.queue_ptr) == (ptr + n) % K

        opt.zero_grad()
        F.cross_entropy(logits, labels).backward()
        opt.step()
        assert not any(p.grad is not None for p in model.encoder_k.parameters())
    assert int(model.queue_ptr) == (4 * n) % K


def test_released_state_dict_names_and_heads():
    v2 = MoCo(torchvision.models.resnet50, K=256)
    sd = v2.state_dict()
    assert sd["encoder_q.fc.0.weight"].shape == (2048, 2048)
    assert sd["encoder_q.fc.2.weight"].shape == (128, 2048)
    assert isinstance(v2.encoder_q.fc[1], nn.ReLU)
    assert {k.split(".")[0] for k in sd} == {"encoder_q", "encoder_k", "queue", "queue_ptr"}
    assert sd["queue"].shape == (128, 256) and sd["queue_ptr"].dtype == torch.long
    torch.testing.assert_close(sd["queue"].norm(dim=0), torch.ones(256))
    for (name_q, p_q), (name_k, p_k) in zip(
        v2.encoder_q.named_parameters(), v2.encoder_k.named_parameters()
    ):
        assert name_q == name_k and torch.equal(p_q, p_k) and not p_k.requires_grad
    v1 = MoCo(torchvision.models.resnet18, dim=64, K=128, mlp=False)
    assert v1.state_dict()["encoder_q.fc.weight"].shape == (64, 512)
    assert "encoder_q.fc.0.weight" not in v1.state_dict()


def test_local_shuffle_with_split_bn_matches_per_group_reference():
    """Keys are encoded in a shuffled order by per-group BN, then put back in input order."""
    torch.manual_seed(2)
    n, splits = 8, 2
    model = MoCo(
        torchvision.models.resnet18, dim=16, K=16, m=0.5, bn_splits=splits, shuffle="local"
    )
    plain_k = MoCo(torchvision.models.resnet18, dim=16, K=16, bn_splits=1).encoder_k
    im_q, im_k = torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32)
    with torch.no_grad():
        for p_q, p_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
            p_k.mul_(0.0).add_(
                torch.randn_like(p_k) * 0.01 + p_q
            )  # make the momentum update visible
    expected_k_params = [
        0.5 * k + 0.5 * q
        for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters())
    ]
    state = torch.get_rng_state()
    model(im_q, im_k)
    keys = model.queue[:, :n].T.clone()

    torch.set_rng_state(state)
    perm = torch.randperm(n)  # the permutation the model drew
    assert not torch.equal(perm, torch.arange(n))
    plain_k.load_state_dict(model.encoder_k.state_dict())
    with torch.no_grad():
        for p, value in zip(plain_k.parameters(), expected_k_params):
            p.copy_(value)
        plain_bns = [copy.deepcopy(plain_k) for _ in range(splits)]
        expected = torch.empty_like(keys)
        for g, enc in enumerate(plain_bns):  # group g: shuffled positions g, g + splits, ...
            expected[perm[g::splits]] = F.normalize(enc(im_k[perm[g::splits]]), dim=1)
    torch.testing.assert_close(keys, expected, rtol=1e-4, atol=1e-5)
    unshuffled = F.normalize(copy.deepcopy(plain_bns[0])(im_k[::splits]), dim=1)
    assert not torch.allclose(unshuffled, keys[::splits], atol=1e-3)  # BN groups saw a mixed batch


def test_queue_size_must_be_multiple_of_batch():
    model = MoCo(LinearEncoder, dim=4, K=10, shuffle="none")
    with pytest.raises(ValueError, match="multiple of the global batch"):
        model(torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5))
