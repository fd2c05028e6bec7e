"""The demo's positive control and its feature measure.

``train_supervised``: the same ResNet-50 trained with the pretraining images' family labels
(cross-entropy, the same images, epochs, batch and steps as the MoCo row), saved as a
torchvision checkpoint that the converter reads like any other. ``knn_top1``: the kNN monitor's
measure on held-out labelled images, for any weights file the converter reads (or none).
"""

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import models, transforms

from moco_d2 import IMAGENET_MEAN, IMAGENET_STD
from moco_d2.io import atomic_torch_save, seed_all
from moco_d2.pretrain.data import TolerantImageFolder
from moco_d2.pretrain.knn import KNNMonitor


def train_supervised(
    train_dir: str,
    output: str,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    crop_size: int,
    device: str,
    workers: int = 0,
    seed: int = 0,
) -> list[float]:
    """Train, write ``output`` (``{"arch", "state_dict"}``) atomically; return each step's loss.

    Supervised ImageNet training's augmentation (random resized crop, flip) and recipe (SGD,
    momentum 0.9, weight decay 1e-4, cosine schedule), with Goyal et al.'s zero-initialised
    residual branches and one epoch of linear warmup: without them a fresh ResNet-50 at the
    MoCo row's unscaled lr blows its loss up to about 10× chance in the first epoch."""
    seed_all(seed)
    augment = transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip
    data = TolerantImageFolder(train_dir, augment)
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers
    )
    model = models.resnet50(num_classes=len(data.classes), zero_init_residual=True).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * len(loader)
    losses: list[float] = []
    for _ in range(epochs):
        for images, targets, _ in loader:
            warmup = min(1.0, (len(losses) + 1) / len(loader))
            for group in optimizer.param_groups:  # cosine, per step
                group["lr"] = lr * warmup * 0.5 * (1 + math.cos(math.pi * len(losses) / steps))
            loss = F.cross_entropy(model(images.to(device)), targets.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    atomic_torch_save({"arch": "resnet50", "state_dict": model.state_dict()}, output)
    return losses


def knn_top1(weights: str | None, knn_root: str, crop_size: int, device: str) -> float:
    """kNN top-1 (%) of a ResNet-50 trunk's pooled features: ``knn_root/val`` classified by
    ``knn_root/train``. ``weights`` None: the random initialization (seed 0)."""
    from moco_d2.lincls.loading import load_pretrained

    seed_all(0)
    model = models.resnet50()
    if weights is not None:
        load_pretrained(model, weights, "resnet50")
    model.fc = torch.nn.Identity()
    monitor = KNNMonitor(knn_root, crop_size=crop_size, k=20)
    return monitor.evaluate(model.to(device), torch.device(device))
