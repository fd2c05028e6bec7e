"""MoCo augmentations after the crop, batched on the training device (``--augment-on device``).

The DataLoader workers only decode and RandomResizedCrop (:class:`TwoCropsLoader`); everything
else runs here on whole batches: color jitter in a random order per image, grayscale, Gaussian
blur, flip and normalize. Every image draws its own parameters from the same distributions as
the PIL path (:func:`moco_d2.pretrain.augment.moco_augmentation`), and with the same parameters
the result equals ``torchvision.transforms.v2.functional`` applied image by image.

The parameters are drawn on the host, from torch's CPU generator (seeded per epoch like every
generator of the training process), so the host knows which op each image takes: every op runs
only on its images (:mod:`moco_d2.pretrain.augment_plan`), and what the device needs arrives in
one asynchronous copy. Nothing here reads a value back from the device.

Numerics that differ from the PIL path: the blur is a true Gaussian kernel of fixed size
(:data:`BLUR_KERNEL`, reflect padding) where PIL approximates it with box blurs, and colour ops
run in float on the crop instead of on 8-bit PIL images.
"""

import math
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from moco_d2.pretrain.augment_plan import (
    BRIGHTNESS,
    CONSTANTS,
    CONTRAST,
    GRAY_WEIGHTS,
    HUE,
    ROW,
    SATURATION,
    build_plan,
)

BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # ±3σ of the largest σ: 13 taps
_TINY = float(np.finfo(np.float32).tiny)
Constants = dict[str, torch.Tensor]  # augment_plan.CONSTANTS on the device, (1, 3, 1, 1) each


@dataclass
class AugmentParams:
    """Per-image parameters of one batch (CPU tensors of length N).

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

    def sample(self, n: int) -> AugmentParams:
        """Independent parameters for ``n`` images, in one draw from torch's CPU generator."""
        u = torch.rand(n, 13).numpy()

        def uniform(column: int, low: float, high: float) -> torch.Tensor:
            return torch.from_numpy(low + (high - low) * u[:, column])

        return AugmentParams(
            order=torch.from_numpy(np.argsort(u[:, :4], axis=1)),
            jitter=torch.from_numpy(u[:, 4] < self.jitter_p),
            brightness=uniform(5, 0.6, 1.4),
            contrast=uniform(6, 0.6, 1.4),
            saturation=uniform(7, 0.6, 1.4),
            hue=uniform(8, -self.hue_range, self.hue_range),
            grayscale=torch.from_numpy(u[:, 9] < 0.2),
            blur=torch.from_numpy(u[:, 10] < self.blur_p),
            sigma=uniform(11, *BLUR_SIGMA),
            flip=torch.from_numpy(u[:, 12] < 0.5),
        )

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` → normalised float32, each image with its own parameters."""
        return self.apply(crops, self.sample(crops.shape[0]))

    def apply(self, crops: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """The augmentation with the host parameters ``p`` (float crops are taken in [0, 1])."""
        n, _, height, width = crops.shape
        plan = build_plan(p, self.aug_plus, height, width, BLUR_KERNEL)
        packed = torch.from_numpy(plan.packed)
        if crops.device.type == "cuda":
            packed = packed.pin_memory()  # so that the copy does not wait for the device
        packed = packed.to(crops.device, non_blocking=True)
        ints, floats = packed[: plan.ints], packed[plan.ints :].view(torch.float32)
        const = {name: floats[at].view(1, 3, 1, 1) for name, at in CONSTANTS.items()}
        for i, seg in enumerate(plan.segments):
            index = ints[seg.gather : seg.gather + n]
            if i == 0:
                x = crops.index_select(0, index)
                x = x.div(255) if x.dtype == torch.uint8 else x.float()
            else:
                x = x.index_select(0, index)
            for a, b in seg.gray:
                x[a:b] = rgb_to_gray(x[a:b]).expand(b - a, 3, height, width)
            rows = floats[seg.rows : seg.rows + n * ROW].view(n, ROW)
            for run in seg.jitter:
                _JITTER[run.op](x[run.start : run.stop], rows[run.start : run.stop], const)
                if run.clamp is not None:
                    x[run.clamp].clamp_(0.0, 1.0)
        blurred = {}
        for a, b, at in plan.blur:
            kernels = floats[at : at + 3 * (b - a) * plan.kernel_size]
            blurred[a] = gaussian_blur(x[a:b], kernels.view(3 * (b - a), plan.kernel_size))
        out = torch.empty_like(x)
        for a, b, source, flipped in plan.out:
            src = x[a:b] if source is None else blurred[source][a - source : b - source]
            if flipped:
                src = src.flip(-1)
            torch.addcmul(const["shift"], src, const["scale"], out=out[a:b])
        return out.index_select(0, ints[plan.restore : plan.restore + n])


def _per_image(v: torch.Tensor, dims: int = 3) -> torch.Tensor:
    """``(k,)`` → ``(k, 1, ...)`` with ``dims`` trailing singleton dims."""
    return v[(...,) + (None,) * dims]


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision: ``(N, 1, H, W)``."""
    r, g, b = x.unbind(dim=1)
    wr, wg, wb = GRAY_WEIGHTS
    return r.mul(wr).add_(g, alpha=wg).add_(b, alpha=wb).unsqueeze(1)


def _brightness(x: torch.Tensor, rows: torch.Tensor, const: Constants) -> None:
    """Blend with black: ``x * factor`` (clamped by the caller)."""
    x.mul_(_per_image(rows[:, 0]))


def _contrast(x: torch.Tensor, rows: torch.Tensor, const: Constants) -> None:
    """Blend with the mean of the grey image: the mean of the luma is the luma of the channel
    means, and ``rows[:, 1:]`` already holds (1 − factor) × the luma weights."""
    bias = (x.mean(dim=(2, 3)) * rows[:, 1:]).sum(dim=1)
    torch.addcmul(_per_image(bias), x, _per_image(rows[:, 0]), out=x)


def _saturation(x: torch.Tensor, rows: torch.Tensor, const: Constants) -> None:
    """Blend with the grey image, (1 − factor) × luma made with pre-scaled weights."""
    r, g, b = x.unbind(dim=1)
    weights = rows[:, 1:]
    gray = r * _per_image(weights[:, 0], 2)
    gray.addcmul_(g, _per_image(weights[:, 1], 2)).addcmul_(b, _per_image(weights[:, 2], 2))
    torch.addcmul(gray.unsqueeze(1), x, _per_image(rows[:, 0]), out=x)


def _hue(x: torch.Tensor, rows: torch.Tensor, const: Constants) -> None:
    """Rotate the hue, in place: torchvision's RGB → HSV → RGB without building HSV.

    In sixths of a turn the hue is ``offset + (next − prev) / (max − min)``: the max channel
    gives the offset (red 0, green 2, blue 4; on ties red, then green, as torchvision) and
    next/prev are the channels after and before it; ``rows`` holds the shift plus each offset.
    With the shifted hue ``h`` in [0, 6), channel c is ``min + (max − min) · T_c(h)``, where
    ``T_c = clamp(slope_c · |h − centre_c| + offset_c, 0, 1)`` is the channel's trapezoid
    around the circle: red is 1 on [5, 1] and 0 on [2, 4], green 1 on [1, 3] and 0 on [4, 6),
    blue 1 on [3, 5] and 0 on [0, 2], linear in between. A grey pixel (max = min) keeps its
    value.
    """
    r, g, b = x.unbind(dim=1)
    low, high = torch.aminmax(x, dim=1)
    spread = (high - low).clamp_min_(_TINY)  # a grey pixel: 0 / tiny, any hue, no change
    is_r, is_g = r == high, g == high
    nxt = torch.where(is_g, b, r)
    prev = torch.where(is_g, r, g)
    rise = torch.where(is_r, g - b, nxt.sub_(prev))
    offset = torch.where(
        is_r,
        _per_image(rows[:, 0], 2),
        torch.where(is_g, _per_image(rows[:, 1], 2), _per_image(rows[:, 2], 2)),
    )
    h = torch.addcdiv(offset, rise, spread).remainder_(6.0)
    t = torch.sub(h.unsqueeze(1), const["hue_centres"]).abs_()
    torch.addcmul(const["hue_offsets"], t, const["hue_slopes"], out=t).clamp_(0.0, 1.0)
    torch.addcmul(low.unsqueeze(1), spread.unsqueeze(1), t, out=x)


_JITTER = {BRIGHTNESS: _brightness, CONTRAST: _contrast, SATURATION: _saturation, HUE: _hue}


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(k, C, H, W)`` with one 1-D kernel per image and channel
    (``(k·C, size)``), reflect padding."""
    n, c, height, width = x.shape
    size = kernels.shape[1]
    half = size // 2
    y = F.pad(x, (half, half, half, half), mode="reflect")
    y = y.reshape(1, n * c, height + 2 * half, width + 2 * half)
    kx = kernels.view(n * c, 1, 1, size)
    ky = kernels.view(n * c, 1, size, 1)
    y = F.conv2d(F.conv2d(y, kx, groups=n * c), ky, groups=n * c)
    return y.view(n, c, height, width)


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


def resized_views_unrounded(
    pixels: torch.Tensor, boxes: list, crop_size: int
) -> list[torch.Tensor]:
    """float32 ``(3, crop, crop)`` views of uint8 ``pixels``, as torchvision's resize of a uint8
    tensor off the CPU computes them before its final round and cast back to uint8 (it casts the
    crop to float and resizes bilinearly with antialiasing; a crop of the output size it returns
    unchanged)."""
    views = []
    for top, left, h, w in boxes:
        view = pixels[:, top : top + h, left : left + w].float()
        if (h, w) != (crop_size, crop_size):
            view = F.interpolate(
                view[None], size=[crop_size, crop_size], mode="bilinear", align_corners=False,
                antialias=True,
            )[0]  # fmt: skip
        views.append(view)
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
        img: Image.Image = Image.open(f)
        width, height = img.size
        boxes = self.draw_boxes(width, height)
        scale: float = 1
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
