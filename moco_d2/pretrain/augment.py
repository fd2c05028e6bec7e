"""MoCo augmentations (v2 "aug+" and v1) and the two-view wrapper, with the released
main_moco.py parameters."""

from collections.abc import Callable

import torch
from PIL import ImageFilter
from torchvision import transforms

from moco_d2 import IMAGENET_MEAN, IMAGENET_STD


class GaussianBlur:
    """PIL Gaussian blur with σ drawn uniformly from ``sigma`` (SimCLR's blur, as in MoCo v2)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = tuple(sigma)

    def sample_sigma(self) -> float:
        low, high = self.sigma
        return low + (high - low) * torch.rand(()).item()

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=self.sample_sigma()))

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


def moco_augmentation(aug_plus: bool = True, crop_size: int = 224) -> transforms.Compose:
    """MoCo v2 aug+ (``aug_plus``) or the MoCo v1 augmentation, ending in ToTensor+Normalize."""
    normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if aug_plus:
        steps = [
            transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        steps = [
            transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.0)),
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
        ]
    return transforms.Compose(steps + [transforms.ToTensor(), normalize])


def eval_transform(crop_size: int = 224) -> transforms.Compose:
    """Resize(256/224·crop)+CenterCrop(crop): the evaluation view (kNN monitor)."""
    return transforms.Compose(
        [
            transforms.Resize(round(crop_size * 256 / 224)),
            transforms.CenterCrop(crop_size),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


class TwoCropsTransform:
    """Two independent augmentations of one image: ``[query, key]``."""

    def __init__(self, base_transform: Callable) -> None:
        self.base_transform = base_transform

    def __call__(self, x):
        return [self.base_transform(x), self.base_transform(x)]

    def __repr__(self):
        return f"{type(self).__name__}({self.base_transform!r})"
