"""Online kNN monitor: weighted kNN top-1 of the query encoder's features on a labelled folder.

Memory bank = ``DIR/train`` features, queries = ``DIR/val`` features, both with the evaluation
view; the vote is the similarity-weighted kNN of InstDisc (k=200, τ=0.1 by default). It shows
that features improve without running a linear evaluation.
"""

import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from moco_d2.errors import UserError
from moco_d2.pretrain.augment import eval_transform
from moco_d2.pretrain.data import TolerantImageFolder


class KNNMonitor:
    def __init__(
        self,
        root: str,
        crop_size: int = 224,
        batch_size: int = 64,
        workers: int = 0,
        k: int = 200,
        t: float = 0.1,
    ) -> None:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split)):
                raise UserError(
                    f"--knn-data {root}: expected labelled folders {root}/train and {root}/val"
                )
        transform = eval_transform(crop_size)
        self.train = TolerantImageFolder(os.path.join(root, "train"), transform)
        self.val = TolerantImageFolder(os.path.join(root, "val"), transform)
        if self.train.classes != self.val.classes:
            raise UserError(f"--knn-data {root}: train/ and val/ have different class folders")
        self.batch_size = batch_size
        self.workers = workers
        self.k = k
        self.t = t

    def _features(self, encoder, dataset, device):
        loader = DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers
        )
        feats, labels = [], []
        for images, targets, _ in loader:
            feats.append(F.normalize(encoder(images.to(device)).float(), dim=1))
            labels.append(targets.to(device))
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def evaluate(self, encoder: torch.nn.Module, device: torch.device) -> float:
        """Top-1 accuracy in percent; ``encoder`` is put back in its previous mode."""
        was_training = encoder.training
        encoder.eval()
        try:
            bank, bank_labels = self._features(encoder, self.train, device)
            queries, query_labels = self._features(encoder, self.val, device)
        finally:
            encoder.train(was_training)
        pred = knn_predict(queries, bank, bank_labels, len(self.train.classes), self.k, self.t)
        return (pred == query_labels).float().mean().item() * 100.0


def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int,
    t: float,
) -> torch.Tensor:
    """Class with the largest sum of exp(sim/t) over the k most similar bank features."""
    sim = queries @ bank.T
    k = min(k, bank.shape[0])
    sim_k, idx_k = sim.topk(k, dim=1)
    weights = (sim_k / t).exp()
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    votes.scatter_add_(1, bank_labels[idx_k], weights)
    return votes.argmax(dim=1)
