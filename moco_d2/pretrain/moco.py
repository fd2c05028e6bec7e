"""The MoCo model: query/key encoders, momentum update, queue, InfoNCE logits (as released), and
shuffling BN.

Shuffling BN encodes the keys in a random order so that BatchNorm cannot leak the positive pair.
Across processes (released MoCo): gather the keys' images from every rank, permute them with a
permutation broadcast from rank 0, let each rank encode its slice, and undo the permutation on
the gathered features. In one process the same is emulated by a local permutation, which matters
together with SplitBatchNorm (each BN group then sees a random mix of the batch).
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco_d2.launch import all_gather_cat, is_distributed
from moco_d2.pretrain.split_bn import convert_split_bn

SHUFFLE_MODES = ("auto", "ddp", "local", "none")


def projection_head(in_features: int, dim: int, mlp: bool) -> nn.Module:
    """MoCo v2 MLP (Linear→ReLU→Linear) or the v1 linear head; names fc.0/fc.2 or fc as released."""
    if mlp:
        return nn.Sequential(
            nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, dim)
        )
    return nn.Linear(in_features, dim)


def build_encoder(
    base_encoder: Callable[..., nn.Module], dim: int, mlp: bool, bn_splits: int = 1
) -> nn.Module:
    """``base_encoder(num_classes=dim)`` with its ``fc`` replaced by the projection head."""
    encoder = base_encoder(num_classes=dim)
    fc = getattr(encoder, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError("MoCo needs a torchvision-style encoder whose classifier is a Linear `fc`")
    encoder.fc = projection_head(fc.in_features, dim, mlp)
    return convert_split_bn(encoder, bn_splits)


class MoCo(nn.Module):
    """MoCo with a key queue. ``forward(im_q, im_k)`` returns ``(logits, labels)``.

    ``shuffle``: how keys are shuffled for BatchNorm: ``ddp`` across processes, ``local`` inside
    this process (useful with ``bn_splits`` > 1), ``none``; ``auto`` picks ``ddp`` when a process
    group is running, else ``local``.
    """

    queue: torch.Tensor  # buffer (dim, K): the queued keys, one per column
    queue_ptr: torch.Tensor  # buffer (1,) long: the column the next keys go to

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.2,
        mlp: bool = True,
        bn_splits: int = 1,
        shuffle: str = "auto",
        foreach_momentum: bool = True,
    ) -> None:
        super().__init__()
        if shuffle not in SHUFFLE_MODES:
            raise ValueError(f"shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
        self.K = K
        self.m = m
        self.T = T
        self.shuffle = shuffle
        self.foreach_momentum = foreach_momentum
        self.encoder_q = build_encoder(base_encoder, dim, mlp, bn_splits)
        self.encoder_k = build_encoder(base_encoder, dim, mlp, bn_splits)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # the pointer mirrored on the host, so that a step never reads the device; the buffer
        # stays the saved state
        self._host_ptr = 0

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """key = m·key + (1−m)·query: two foreach kernels over all parameters, or the released
        per-parameter loop when ``foreach_momentum`` is off (same result)."""
        params_q = [p.data for p in self.encoder_q.parameters()]
        params_k = [p.data for p in self.encoder_k.parameters()]
        if self.foreach_momentum:
            torch._foreach_mul_(params_k, self.m)
            torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)
            return
        for param_q, param_k in zip(params_q, params_k):
            param_k.mul_(self.m).add_(param_q, alpha=1.0 - self.m)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_ptr = int(self.queue_ptr)  # once per load, outside any step

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = all_gather_cat(keys)
        batch = keys.shape[0]
        ptr = self._host_ptr
        if self.K % batch:
            raise ValueError(
                f"queue size K={self.K} must be a multiple of the global batch {batch}"
            )
        self.queue[:, ptr : ptr + batch] = keys.T.to(self.queue.dtype)
        self._host_ptr = (ptr + batch) % self.K
        self.queue_ptr.fill_(self._host_ptr)

    def _shuffle_mode(self):
        if self.shuffle == "auto":
            return "ddp" if is_distributed() else "local"
        return self.shuffle

    @torch.no_grad()
    def _encode_keys(self, im_k):
        mode = self._shuffle_mode()
        if mode == "ddp":
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
            return batch_unshuffle_ddp(F.normalize(self.encoder_k(im_k), dim=1), idx_unshuffle)
        if mode == "local":
            im_k, idx_unshuffle = batch_shuffle_local(im_k)
            return batch_unshuffle_local(F.normalize(self.encoder_k(im_k), dim=1), idx_unshuffle)
        return F.normalize(self.encoder_k(im_k), dim=1)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._encode_keys(im_k)
        l_pos = torch.einsum("nc,nc->n", q, k.to(q.dtype)).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach().to(q.dtype))
        logits = torch.cat([l_pos, l_neg], dim=1).float() / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


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
    return x_all[idx_unshuffle.view(world, -1)[dist.get_rank()]]


@torch.no_grad()
def batch_shuffle_local(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx_shuffle = torch.randperm(x.shape[0], device=x.device)
    return x[idx_shuffle], torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle_local(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    return x[idx_unshuffle]
