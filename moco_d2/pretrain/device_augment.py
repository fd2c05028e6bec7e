"""MoCo augmentations after the crop, batched on the training device (``--augment-on device``).

The DataLoader workers only decode and RandomResizedCrop (:class:`TwoCropsLoader`); everything
else runs here on whole batches: color jitter in a random order per image, grayscale, Gaussian
blur, flip and normalize. Every image draws its own parameters from the same distributions as
the PIL path (:func:`moco_d2.pretrain.augment.moco_augmentation`), and with the same parameters
the result equals ``torchvision.transforms.v2.functional`` applied image by image.

Numerics that differ from the PIL path: the blur is a true Gaussian kernel of fixed size
(:data:`BLUR_KERNEL`, reflect padding) where PIL approximates it with box blurs, and colour ops
run in float on the crop instead of on 8-bit PIL images.
"""

import math
from dataclasses import dataclass
from typing import BinaryIO

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from moco_d2.training.constants import IMAGENET_MEAN, IMAGENET_STD

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # ±3σ of the largest σ: 13 taps


@dataclass
class AugmentParams:
    """Per-image parameters of one batch (tensors of length N on the batch's device).

    ``order[:, j]`` is the jitter op applied j-th; ``jitter`` says whether jitter applies at
    all, ``grayscale``, ``blur`` and ``flip`` likewise.
    """

    order: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    flip: torch.Tensor


class DeviceAugment:
    """Batched aug+ (MoCo v2) or v1 augmentation of uint8 crops ``(N, 3, H, W)``.

    aug+: ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale p=0.2, GaussianBlur
    σ∈[0.1, 2.0] with p=0.5, HFlip p=0.5. v1: RandomGrayscale p=0.2, then ColorJitter(0.4, 0.4,
    0.4, 0.4) always, HFlip. Both end with ImageNet Normalize.
    """

    def __init__(self, aug_plus: bool = True) -> None:
        self.aug_plus = aug_plus
        self.hue_range = 0.1 if aug_plus else 0.4
        self.jitter_p = 0.8 if aug_plus else 1.0
        self.blur_p = 0.5 if aug_plus else 0.0

    def sample(self, n: int, device: torch.device) -> AugmentParams:
        """Independent parameters for ``n`` images, drawn from the device's generator."""

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, device=device)

        return AugmentParams(
            order=torch.rand(n, 4, device=device).argsort(dim=1),
            jitter=torch.rand(n, device=device) < self.jitter_p,
            brightness=uniform(0.6, 1.4),
            contrast=uniform(0.6, 1.4),
            saturation=uniform(0.6, 1.4),
            hue=uniform(-self.hue_range, self.hue_range),
            grayscale=torch.rand(n, device=device) < 0.2,
            blur=torch.rand(n, device=device) < self.blur_p,
            sigma=uniform(*BLUR_SIGMA),
            flip=torch.rand(n, device=device) < 0.5,
        )

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` → normalised float32, each image with its own parameters."""
        return self.apply(crops, self.sample(crops.shape[0], crops.device))

    def apply(self, crops: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        x = crops.float() / 255 if crops.dtype == torch.uint8 else crops.float()
        if self.aug_plus:
            x = color_jitter(x, p)
            x = grayscale(x, p.grayscale)
            x = gaussian_blur(x, p.sigma, p.blur)
        else:
            x = grayscale(x, p.grayscale)
            x = color_jitter(x, p)
        x = torch.where(_col(p.flip), x.flip(-1), x)
        return normalize(x)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision: ``(N, 1, H, W)``."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _col(factor)
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def color_jitter(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in each image's own order ``p.order``.

    At every position the three blends are one blend with a per-image partner (black, the
    grey mean, or the grey image); a factor of 1 (hue, or no jitter) leaves an image exactly
    unchanged.
    """
    for j in range(4):
        op = p.order[:, j]
        factor = torch.where(
            op == BRIGHTNESS,
            p.brightness,
            torch.where(op == CONTRAST, p.contrast, torch.where(op == SATURATION, p.saturation, 1)),
        )
        factor = torch.where(p.jitter, factor, 1)
        gray = rgb_to_gray(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        partner = torch.where(
            _col(op == BRIGHTNESS), 0.0, torch.where(_col(op == CONTRAST), mean, gray)
        )
        x = _blend(x, partner, factor)
        x = torch.where(_col((op == HUE) & p.jitter), adjust_hue(x, p.hue), x)
    return x


def grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    return torch.where(_col(apply), rgb_to_gray(x).expand_as(x), x)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift the hue of each image by ``hue[i]`` (fraction of a turn), via HSV as torchvision."""
    h, s, v = _rgb_to_hsv(x).unbind(dim=1)
    h = (h + hue.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(h, s, v)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, _ = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    eqc = maxc == minc
    spread = maxc - minc
    ones = torch.ones_like(maxc)
    s = spread / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, spread).unsqueeze(1)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / divisor).unbind(dim=1)
    not_r = maxc != r
    is_g = maxc == g
    h = (bc - gc) * ~not_r + (2.0 + rc - bc) * (is_g & not_r) + (4.0 + gc - rc) * (not_r & ~is_g)
    h = (h / 6.0 + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    sector = i.to(torch.int32).remainder(6).unsqueeze(1)
    sv = s * v
    w = v - sv
    q = v - sv * f
    t = sv * f + w
    mask = sector == torch.arange(6, device=h.device).view(1, 6, 1, 1)
    r = torch.stack((v, q, w, w, t, v), dim=1)
    g = torch.stack((t, v, v, q, w, w), dim=1)
    b = torch.stack((w, w, t, v, v, q), dim=1)
    return torch.stack([(c * mask).sum(dim=1) for c in (r, g, b)], dim=1)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, size)`` normalised 1-D Gaussians, one per σ, centred on the middle tap."""
    x = torch.arange(size, device=sigma.device, dtype=torch.float32) - (size - 1) / 2
    return torch.softmax(-((x / sigma.view(-1, 1)) ** 2) / 2, dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with each image's σ, reflect padding, where ``apply``."""
    n, c, height, width = x.shape
    size = min(BLUR_KERNEL, 2 * (min(height, width) - 1) + 1)
    half = size // 2
    k = gaussian_kernels(sigma, size)  # (N, size)
    y = F.pad(x, (half, half, half, half), mode="reflect")
    y = y.reshape(1, n * c, height + 2 * half, width + 2 * half)
    kx = k.repeat_interleave(c, dim=0).view(n * c, 1, 1, size)
    ky = kx.view(n * c, 1, size, 1)
    y = F.conv2d(F.conv2d(y, kx, groups=n * c), ky, groups=n * c)
    return torch.where(_col(apply), y.view(n, c, height, width), x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def resized_views(
    pixels: torch.Tensor, boxes: list, crop_size: int, scale: float = 1
) -> list[torch.Tensor]:
    """uint8 ``(3, crop, crop)`` crops from ``(top, left, h, w)`` boxes (host ints) of the full
    image, mapped onto ``pixels`` decoded at 1/``scale`` size; torch's uint8 antialiased
    bilinear resize (within one grey level of PIL's, 2x faster), on whatever device ``pixels``
    is."""
    size = [crop_size, crop_size]
    views = []
    for top, left, h, w in boxes:
        top, left = round(top / scale), round(left / scale)
        h, w = max(1, round(h / scale)), max(1, round(w / scale))
        views.append(TF.resized_crop(pixels, top, left, h, w, size, antialias=True))
    return views


def resized_crops(
    pixels: torch.Tensor, boxes: list, crop_size: int, scale: float = 1
) -> torch.Tensor:
    """The two views of :func:`resized_views` stacked: ``(2, 3, crop, crop)``."""
    return torch.stack(resized_views(pixels, boxes, crop_size, scale))


class TwoCropsLoader:
    """Worker side of ``--augment-on device``: decode one file, return two independent
    RandomResizedCrop(crop, scale 0.2–1.0) views as uint8 ``(2, 3, crop, crop)``.

    JPEGs are decoded at a reduced scale (PIL ``draft``) when both crop boxes stay at least
    ``crop`` pixels wide and high after the reduction; the boxes then snap to that grid. The
    crop is resized with torch's uint8 antialiased bilinear kernel, which is within one grey
    level of PIL's (the loader path).
    """

    def __init__(self, crop_size: int, draft: bool = True) -> None:
        self.crop_size = crop_size
        self.draft = draft
        self.rrc = transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.0))

    def __call__(self, path: str) -> torch.Tensor:
        with open(path, "rb") as f:
            return self.from_file(f)

    def from_file(self, f: BinaryIO) -> torch.Tensor:
        """The two views of the image in the open file ``f`` (a file or in-memory bytes)."""
        img = Image.open(f)
        width, height = img.size
        boxes = self.draw_boxes(width, height)
        scale = 1
        if self.draft and img.format == "JPEG":
            smallest = min(min(h, w) for _, _, h, w in boxes)
            wanted = max(1, smallest // self.crop_size)
            img.draft("RGB", (math.ceil(width / wanted), math.ceil(height / wanted)))
            scale = width / img.size[0]
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        pixels = transforms.functional.pil_to_tensor(img)
        return resized_crops(pixels, boxes, self.crop_size, scale)

    def draw_boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """The query's then the key's RandomResizedCrop box ``(top, left, h, w)`` on a
        ``width``×``height`` image, from torch's generator: every data path draws them here so
        that they share the distribution and the order of random numbers."""
        # an empty (0, H, W) tensor tells get_params the size without decoding anything
        shape_only = torch.empty(0, height, width)
        return [
            transforms.RandomResizedCrop.get_params(shape_only, self.rrc.scale, self.rrc.ratio)
            for _ in range(2)
        ]
