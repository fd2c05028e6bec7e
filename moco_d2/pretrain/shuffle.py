"""Shuffling BN: encode keys in a random order so BatchNorm cannot leak the positive pair.

Across processes (released MoCo): gather the keys' images from every rank, permute them with a
permutation broadcast from rank 0, let each rank encode its slice, and undo the permutation on
the gathered features. In one process the same is emulated by a local permutation, which matters
together with SplitBatchNorm (each BN group then sees a random mix of the batch).
"""

import torch
import torch.distributed as dist

from moco_d2.training.distributed import all_gather_cat


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the globally shuffled batch, and the index that undoes the shuffle."""
    batch_this = x.shape[0]
    x_all = all_gather_cat(x)
    world = x_all.shape[0] // batch_this
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(world, -1)[dist.get_rank()]
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Rows of this rank's original samples, taken from the gathered shuffled outputs."""
    batch_this = x.shape[0]
    x_all = all_gather_cat(x)
    world = x_all.shape[0] // batch_this
    idx_this = idx_unshuffle.view(world, -1)[dist.get_rank()]
    return x_all[idx_this]


@torch.no_grad()
def batch_shuffle_local(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx_shuffle = torch.randperm(x.shape[0], device=x.device)
    return x[idx_shuffle], torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle_local(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    return x[idx_unshuffle]
