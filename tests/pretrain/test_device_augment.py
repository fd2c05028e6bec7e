"""--augment-on device: batched ops against torchvision's per-image functional ops, parameter
distributions against the PIL path's, the counted cost of a view and its host-drawn parameters,
and the worker-side decode + two crops."""

import math

import numpy as np
import pytest
import torch
from cost import augment_cost
from op_count import OpCounter
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from moco_d2.pretrain.device_augment import (
    BLUR_KERNEL,
    HUE,
    AugmentParams,
    DeviceAugment,
    TwoCropsLoader,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _reference(image, p, i, aug_plus):
    """One image through torchvision.transforms.v2.functional with the batch's parameters."""
    ops = [
        lambda im: TF.adjust_brightness(im, float(p.brightness[i])),
        lambda im: TF.adjust_contrast(im, float(p.contrast[i])),
        lambda im: TF.adjust_saturation(im, float(p.saturation[i])),
        lambda im: TF.adjust_hue(im, float(p.hue[i])),
    ]

    def jitter(im):
        if p.jitter[i]:
            for j in p.order[i].tolist():
                im = ops[j](im)
        return im

    def gray(im):
        return TF.rgb_to_grayscale(im, num_output_channels=3) if p.grayscale[i] else im

    im = gray(jitter(image)) if aug_plus else jitter(gray(image))
    if p.blur[i]:
        im = TF.gaussian_blur(im, [BLUR_KERNEL] * 2, [float(p.sigma[i])] * 2)
    if p.flip[i]:
        im = TF.horizontal_flip(im)
    return (im - MEAN.to(im.device)) / STD.to(im.device)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("aug_plus", [True, False])
def test_batched_ops_equal_torchvision_per_image(aug_plus, device):
    torch.manual_seed(0)
    n = 48
    images = torch.rand(n, 3, 20, 24, device=device)
    images[:4] = images[:4, :1]  # grey images: hue and saturation on a degenerate input
    aug = DeviceAugment(aug_plus)
    p = aug.sample(n)
    out = aug.apply(images, p)
    assert out.shape == images.shape and out.dtype == torch.float32
    # every branch is taken somewhere in the batch
    optional = (p.jitter, p.blur) if aug_plus else ()  # v1 always jitters, never blurs
    for flag in (p.grayscale, p.flip) + optional:
        assert flag.any() and not flag.all()
    for i in range(n):
        expected = _reference(images[i], p, i, aug_plus)
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)


def test_images_without_any_op_are_only_normalised_and_uint8_is_scaled():
    torch.manual_seed(1)
    crops = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    aug = DeviceAugment(True)
    p = aug.sample(6)
    for flag in (p.jitter, p.grayscale, p.blur, p.flip):
        flag.zero_()
    out = aug.apply(crops, p)
    # Normalize runs as one affine map: within float rounding of (x - mean) / std
    torch.testing.assert_close(out, (crops.float() / 255 - MEAN) / STD, atol=1e-6, rtol=0)


def _hue_only(hue):
    """Parameters that jitter every image with hue first and factors of 1 (exact no-ops)."""
    n = len(hue)
    ones, no = torch.ones(n), torch.zeros(n, dtype=torch.bool)
    order = torch.tensor([HUE, 0, 1, 2]).repeat(n, 1)
    return AugmentParams(order, ~no, ones, ones, ones, hue, no, no, ones, no)


def test_hue_at_the_edges_equals_torchvision():
    # primaries and secondaries, ties of the max channel, grey, black, white, hues just below
    # and above a full turn, and values that land exactly on sector borders after the shift
    pixels = torch.tensor(
        [
            [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1],
            [0.5, 0.5, 0.2], [0.5, 0.2, 0.5], [0.2, 0.5, 0.5], [0.3, 0.3, 0.3],
            [0, 0, 0], [1, 1, 1], [0.9, 0.1, 0.1000001], [0.9, 0.1000001, 0.1],
            [0.75, 0.25, 0.5], [0.6, 0.6, 0.6000001], [1e-8, 0, 0], [0.2, 0.6, 1.0],
        ]
    )  # fmt: skip
    images = pixels.T.reshape(1, 3, 3, 6).expand(11, 3, 3, 6).contiguous()
    hue = torch.tensor([-0.5, -0.4, -1 / 6, -0.1, -1e-7, 0.0, 1e-7, 0.1, 1 / 6, 0.4, 0.5])
    p = _hue_only(hue)
    out = DeviceAugment(True).apply(images, p)
    for i in range(len(hue)):
        torch.testing.assert_close(out[i], _reference(images[i], p, i, True), atol=1e-5, rtol=0)


COUNTED = (256, 3, 224, 224)  # one view of the default batch, as docs/speed.md counts it


@pytest.mark.parametrize("aug_plus", [True, False])
def test_one_view_meets_the_counted_traffic_and_launch_targets(aug_plus):
    """On the meta device (no computing, no values to read back): at most 64 full-batch fp32
    passes and 300 aten ops per view, and no host sync."""
    torch.manual_seed(0)
    count = augment_cost(aug_plus, COUNTED)
    assert count.syncs == 0
    assert count.ops <= 300, count.by_op
    assert count.passes(math.prod(COUNTED) * 4) <= 64, count.bytes_by_op


def test_parameters_are_drawn_on_the_host_once_per_call():
    aug = DeviceAugment(True)
    p = aug.sample(5)
    assert all(v.device.type == "cpu" for v in vars(p).values())
    # the same draw from torch's CPU generator whatever the device of the crops
    meta = torch.empty(5, 3, 8, 8, dtype=torch.uint8, device="meta")
    torch.manual_seed(11)
    aug(meta)
    after_meta = torch.get_rng_state()
    torch.manual_seed(11)
    aug.sample(5)
    assert torch.equal(after_meta, torch.get_rng_state())
    # a seed fixes the result, and nothing is read back from the device
    crops = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        with OpCounter() as counter:
            runs.append(aug(crops))
        assert counter.count.syncs == 0
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("aug_plus", [True, False])
def test_on_cuda_no_sync_no_device_generator_and_the_cpu_result(aug_plus):
    crops = torch.randint(0, 256, (32, 2, 3, 40, 48), dtype=torch.uint8)
    aug = DeviceAugment(aug_plus)
    torch.manual_seed(13)
    expected = aug(crops[:, 0])
    on_device = crops.cuda()
    torch.cuda.synchronize()
    cuda_rng = torch.cuda.get_rng_state()
    torch.manual_seed(13)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug(on_device[:, 0])  # a strided view, as views_to_device passes it
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(cuda_rng, torch.cuda.get_rng_state())
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)


def _within(observed, expected, n, p=None, sd=None):
    """|observed − expected| below 5 standard errors of a mean over n draws."""
    sd = math.sqrt(p * (1 - p)) if sd is None else sd
    return abs(observed - expected) < 5 * sd / math.sqrt(n)


def test_parameter_distributions_match_the_pil_path():
    torch.manual_seed(2)
    n = 40000
    p = DeviceAugment(True).sample(n)
    on = p.jitter
    assert _within(on.float().mean().item(), 0.8, n, p=0.8)
    assert _within(p.grayscale.float().mean().item(), 0.2, n, p=0.2)
    assert _within(p.blur.float().mean().item(), 0.5, n, p=0.5)
    assert _within(p.flip.float().mean().item(), 0.5, n, p=0.5)
    uniform_sd = 0.8 / math.sqrt(12)  # U(0.6, 1.4)
    for factor in (p.brightness, p.contrast, p.saturation):
        assert factor.min() >= 0.6 and factor.max() <= 1.4
        assert factor.min() < 0.601 and factor.max() > 1.399
        assert _within(factor.mean().item(), 1.0, n, sd=uniform_sd)
    hue = p.hue
    assert (
        hue.min() >= -0.1
        and hue.max() <= 0.1
        and _within(hue.mean().item(), 0.0, n, sd=0.2 / 12**0.5)
    )
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    assert _within(p.sigma.mean().item(), 1.05, n, sd=1.9 / math.sqrt(12))
    # a random order per image: every op at every position a quarter of the time, all 24 orders
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()
    for position in range(4):
        for op in range(4):
            share = (p.order[:, position] == op).float().mean().item()
            assert _within(share, 0.25, n, p=0.25)
    assert len({tuple(o) for o in p.order.tolist()}) == 24


def test_v1_parameters_jitter_always_hue_04_no_blur():
    torch.manual_seed(3)
    n = 20000
    p = DeviceAugment(False).sample(n)
    assert p.jitter.all() and not p.blur.any()
    assert p.hue.min() >= -0.4 and p.hue.max() <= 0.4 and p.hue.abs().max() > 0.399
    assert _within(p.grayscale.float().mean().item(), 0.2, n, p=0.2)


def test_views_of_one_batch_get_independent_parameters():
    torch.manual_seed(4)
    crops = torch.full((8, 3, 16, 16), 128, dtype=torch.uint8)
    crops[..., :8] = 30
    aug = DeviceAugment(True)
    q, k = aug(crops), aug(crops)
    assert not torch.equal(q, k)
    assert not all(torch.equal(q[0], q[i]) for i in range(1, 8))


def _jpeg(tmp_path, size=(500, 375)):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.BICUBIC)
    path = tmp_path / "photo.jpg"
    image.save(path, quality=90)
    return path


def test_two_crops_loader_without_draft_is_torchvision_random_resized_crop(tmp_path):
    path = _jpeg(tmp_path)
    loader = TwoCropsLoader(64, draft=False)
    torch.manual_seed(5)
    crops = loader(str(path))
    assert crops.shape == (2, 3, 64, 64) and crops.dtype == torch.uint8
    assert not torch.equal(crops[0], crops[1])
    torch.manual_seed(5)
    image = Image.open(path).convert("RGB")
    rrc = T.RandomResizedCrop(64, scale=(0.2, 1.0))
    params = [rrc.get_params(image, rrc.scale, rrc.ratio) for _ in range(2)]
    pixels = T.functional.pil_to_tensor(image)
    for crop, (top, left, h, w) in zip(crops, params):
        expected = TF.resized_crop(pixels, top, left, h, w, [64, 64], antialias=True)
        assert torch.equal(crop, expected)
        pil = T.functional.pil_to_tensor(
            T.functional.resized_crop(image, top, left, h, w, [64, 64])
        )
        assert (crop.int() - pil.int()).abs().max() <= 2  # the loader path's PIL resize


def test_draft_decoding_stays_close_to_full_decoding(tmp_path):
    path = _jpeg(tmp_path, size=(1600, 1200))
    torch.manual_seed(6)
    full = TwoCropsLoader(32, draft=False)(str(path)).float()
    torch.manual_seed(6)
    drafted = TwoCropsLoader(32, draft=True)(str(path)).float()
    # a reduced-scale decode, with crop boxes snapped to its grid: close, unlike another crop
    assert (full - drafted).abs().mean() < 8
    assert (full[0] - full[1]).abs().mean() > 3 * (full - drafted).abs().mean()
