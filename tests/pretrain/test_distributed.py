"""Shuffling BN across 2 real gloo processes on CPU (torch.multiprocessing, file:// rendezvous)."""

import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision

from moco_d2.pretrain import MoCo
from moco_d2.pretrain.moco import batch_shuffle_ddp, batch_unshuffle_ddp

WORLD, BATCH, STEPS, M = 2, 4, 3, 0.9


def _images(rank, step):
    """Random key images whose pixel [0, 0, 0] holds their global index in the step's batch."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    im_q, im_k = (
        torch.randn(BATCH, 3, 32, 32, generator=g),
        torch.randn(BATCH, 3, 32, 32, generator=g),
    )
    im_k[:, 0, 0, 0] = torch.arange(BATCH, dtype=torch.float32) + rank * BATCH
    return im_q, im_k


def _gather(t):
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check_shuffle_roundtrip(rank)
        _check_moco_steps(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _check_shuffle_roundtrip(rank):
    torch.manual_seed(rank)  # different local RNG: the permutation must still be rank 0's
    x = torch.arange(BATCH * 3, dtype=torch.float32).reshape(BATCH, 3) + 100 * rank
    shuffled, idx_unshuffle = batch_shuffle_ddp(x)
    assert torch.equal(batch_unshuffle_ddp(shuffled, idx_unshuffle), x)
    every_idx = _gather(idx_unshuffle)
    assert all(torch.equal(every_idx[0], i) for i in every_idx)
    ids = torch.cat(_gather(shuffled))[:, 0]
    all_ids = torch.cat([torch.arange(0, BATCH * 3, 3) + 100 * r for r in range(WORLD)]).float()
    assert torch.equal(
        ids.sort().values, all_ids.sort().values
    )  # a permutation of the global batch


def _check_moco_steps(rank, out_dir):
    torch.manual_seed(0)
    model = MoCo(torchvision.models.resnet18, dim=16, K=WORLD * BATCH * 2, m=M, T=0.2, mlp=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    seen = []
    model.encoder_k.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().clone()))
    mixed = False
    for step in range(STEPS):
        im_q, im_k = _images(rank, step)
        reference_k = copy.deepcopy(model.encoder_k)
        with torch.no_grad():
            for p_k, p_q in zip(reference_k.parameters(), model.encoder_q.parameters()):
                p_k.mul_(M).add_(p_q, alpha=1 - M)
        ptr = int(model.queue_ptr)
        logits, labels = ddp(im_q, im_k)
        F.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()

        encoded = seen[-1]  # what this rank's key encoder (and its BN) saw
        ids = encoded[:, 0, 0, 0].long()
        every_ids = torch.cat(_gather(ids))
        assert torch.equal(every_ids.sort().values, torch.arange(WORLD * BATCH))
        mixed |= bool((ids // BATCH != rank).any())
        with torch.no_grad():
            feats = torch.cat(_gather(F.normalize(reference_k(encoded), dim=1)))
        expected = torch.empty_like(feats)
        expected[every_ids] = feats  # back to the global input order
        torch.testing.assert_close(
            model.queue[:, ptr : ptr + WORLD * BATCH].T, expected, rtol=1e-4, atol=1e-5
        )
    assert mixed, "the key encoder never saw another rank's images"
    # BN running statistics are per rank until DDP broadcasts rank 0's at the next forward
    state = {
        "queue": model.queue,
        "queue_ptr": model.queue_ptr,
        **{f"encoder_k.{k}": v for k, v in model.encoder_k.named_parameters()},
    }
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_shuffle_bn(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys() and "queue" in r0 and "encoder_k.conv1.weight" in r0
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert int(r0["queue_ptr"]) == (STEPS * WORLD * BATCH) % (WORLD * BATCH * 2)
