"""Augmentations: every parameter of the released code (v2 aug+ and v1), the blur, the two views."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from moco_d2.pretrain.augment import GaussianBlur, TwoCropsTransform, moco_augmentation

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _check_rrc(t, size):
    assert isinstance(t, T.RandomResizedCrop)
    assert tuple(t.size) == (size, size) and tuple(t.scale) == (0.2, 1.0)
    assert t.ratio == pytest.approx((3 / 4, 4 / 3))


def _check_jitter(t, hue):
    assert isinstance(t, T.ColorJitter)
    for name in ("brightness", "contrast", "saturation"):
        assert tuple(getattr(t, name)) == pytest.approx((0.6, 1.4))
    assert tuple(t.hue) == pytest.approx((-hue, hue))


def _check_tail(steps):
    assert isinstance(steps[-3], T.RandomHorizontalFlip) and steps[-3].p == 0.5
    assert isinstance(steps[-2], T.ToTensor)
    assert isinstance(steps[-1], T.Normalize)
    assert list(steps[-1].mean) == MEAN and list(steps[-1].std) == STD


def test_v2_aug_plus_parameters():
    steps = moco_augmentation(aug_plus=True).transforms
    assert len(steps) == 7
    _check_rrc(steps[0], 224)
    assert isinstance(steps[1], T.RandomApply) and steps[1].p == 0.8
    _check_jitter(steps[1].transforms[0], hue=0.1)
    assert isinstance(steps[2], T.RandomGrayscale) and steps[2].p == 0.2
    assert isinstance(steps[3], T.RandomApply) and steps[3].p == 0.5
    assert isinstance(steps[3].transforms[0], GaussianBlur) and steps[3].transforms[0].sigma == (
        0.1,
        2.0,
    )
    _check_tail(steps)


def test_v1_parameters():
    steps = moco_augmentation(aug_plus=False, crop_size=96).transforms
    assert len(steps) == 6
    _check_rrc(steps[0], 96)
    assert isinstance(steps[1], T.RandomGrayscale) and steps[1].p == 0.2
    _check_jitter(steps[2], hue=0.4)
    _check_tail(steps)


def test_gaussian_blur_sigma_range_and_output():
    blur = GaussianBlur((0.1, 2.0))
    torch.manual_seed(0)
    sigmas = np.array([blur.sample_sigma() for _ in range(4000)])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert sigmas.min() < 0.12 and sigmas.max() > 1.98 and abs(sigmas.mean() - 1.05) < 0.03
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    torch.manual_seed(5)
    sigma = blur.sample_sigma()
    torch.manual_seed(5)
    out = blur(image)
    assert np.array_equal(
        np.asarray(out), np.asarray(image.filter(ImageFilter.GaussianBlur(radius=sigma)))
    )
    assert not np.array_equal(np.asarray(out), np.asarray(image))


def test_two_crops_are_independent_views_of_one_image():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    q, k = TwoCropsTransform(moco_augmentation(True, crop_size=32))(image)
    assert q.shape == k.shape == (3, 32, 32) and q.dtype == torch.float32
    assert not torch.equal(q, k)
