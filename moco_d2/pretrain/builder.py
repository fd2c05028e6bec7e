"""The MoCo model: query/key encoders, momentum update, queue, InfoNCE logits (as released)."""

import torch
import torch.nn.functional as F
from torch import nn

from moco_d2.pretrain import shuffle
from moco_d2.pretrain.split_bn import convert_split_bn
from moco_d2.training.distributed import all_gather_cat, is_distributed

SHUFFLE_MODES = ("auto", "ddp", "local", "none")


def projection_head(in_features, dim, mlp):
    """MoCo v2 MLP (Linear→ReLU→Linear) or the v1 linear head; names fc.0/fc.2 or fc as released."""
    if mlp:
        return nn.Sequential(
            nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, dim)
        )
    return nn.Linear(in_features, dim)


def build_encoder(base_encoder, dim, mlp, bn_splits=1):
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

    def __init__(
        self, base_encoder, dim=128, K=65536, m=0.999, T=0.2, mlp=True, bn_splits=1, shuffle="auto"
    ):
        super().__init__()
        if shuffle not in SHUFFLE_MODES:
            raise ValueError(f"shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
        self.K = K
        self.m = m
        self.T = T
        self.shuffle = shuffle
        self.encoder_q = build_encoder(base_encoder, dim, mlp, bn_splits)
        self.encoder_k = build_encoder(base_encoder, dim, mlp, bn_splits)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.mul_(self.m).add_(param_q.data, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = all_gather_cat(keys)
        batch = keys.shape[0]
        ptr = int(self.queue_ptr)
        if self.K % batch:
            raise ValueError(
                f"queue size K={self.K} must be a multiple of the global batch {batch}"
            )
        self.queue[:, ptr : ptr + batch] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch) % self.K

    def _shuffle_mode(self):
        if self.shuffle == "auto":
            return "ddp" if is_distributed() else "local"
        return self.shuffle

    @torch.no_grad()
    def _encode_keys(self, im_k):
        mode = self._shuffle_mode()
        if mode == "ddp":
            im_k, idx_unshuffle = shuffle.batch_shuffle_ddp(im_k)
            return shuffle.batch_unshuffle_ddp(
                F.normalize(self.encoder_k(im_k), dim=1), idx_unshuffle
            )
        if mode == "local":
            im_k, idx_unshuffle = shuffle.batch_shuffle_local(im_k)
            return shuffle.batch_unshuffle_local(
                F.normalize(self.encoder_k(im_k), dim=1), idx_unshuffle
            )
        return F.normalize(self.encoder_k(im_k), dim=1)

    def forward(self, im_q, im_k):
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
