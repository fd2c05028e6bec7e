"""benchmarks/dali_feed.py, the DALI peer feed: on DALI's CPU operators (and on a GPU where there
is one) it gives two normalised aug+ views of the shape, type, layout and range the training step
takes, the two views differ, and the ops keep a flat grey image flat and grey. Skipped where DALI
does not install (``make test`` installs it where pip has a wheel)."""

import os

import common
import pytest
import torch
from PIL import Image

from moco_d2 import IMAGENET_MEAN, IMAGENET_STD

pytest.importorskip("nvidia.dali", reason="DALI is not installed here")
import dali_feed  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
BATCH, CROP = 4, 32


def _views(files, device, steps, channels_last=True):
    views = dali_feed.DaliTwoViews(files, BATCH, CROP, torch.device(device), 1, steps, 0,
                                   channels_last)  # fmt: skip
    return [[v.cpu() for v in pair] for pair in views]


def _pixels(view):
    """The uint8 levels the view was normalised from."""
    return view * STD * 255 + MEAN * 255


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_two_normalised_views_of_photos(tmp_path, device, channels_last):
    files = common.image_paths(common.make_jpeg_folder(str(tmp_path), 6, size=(96, 72)))
    batches = _views(files, device, 3, channels_last)
    assert len(batches) == 3
    memory = torch.channels_last if channels_last else torch.contiguous_format
    for query, key in batches:
        for view in (query, key):
            assert view.shape == (BATCH, 3, CROP, CROP) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=memory)
            pixels = _pixels(view)
            # every op before the normalisation works on uint8: levels 0..255, whole numbers
            assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
            assert (pixels - pixels.round()).abs().max() < 1e-3
            assert (view.amax(dim=(1, 2, 3)) - view.amin(dim=(1, 2, 3))).min() > 0.5
        # two views of one image: a different crop, jitter and flip
        assert (query - key).abs().mean(dim=(1, 2, 3)).min() > 0.05
    assert not torch.equal(batches[0][0], batches[1][0])


@pytest.mark.parametrize("device", DEVICES)
def test_a_flat_grey_image_stays_flat_and_grey(tmp_path, device):
    """A flat grey image stays flat and grey through every op (a blur that padded with zeros
    would darken the borders). Only brightness, and contrast after it, move the level: 128 × b
    with b in [0.6, 1.4], then at most 1.4 times further from contrast's centre, mid-grey
    (torchvision's centre, the image's mean, would leave a flat image as it is)."""
    files = []
    for i in range(BATCH):
        files.append(os.path.join(tmp_path, f"{i}.jpg"))
        Image.new("RGB", (80, 60), (128, 128, 128)).save(files[-1], quality=95)
    levels = torch.cat([_pixels(v) for views in _views(files, device, 8) for v in views])
    per_channel = levels.flatten(2)
    assert (per_channel - per_channel[..., :1]).abs().max() < 1e-3  # flat
    # grey: DALI's float colour matrices may round one channel the other way
    assert (per_channel[:, :, 0].amax(1) - per_channel[:, :, 0].amin(1)).max() <= 1 + 1e-3
    level = per_channel[:, 1, 0]
    spread = 0.4 * 128 * 1.4
    assert level.min() >= 128 - spread - 1 and level.max() <= 128 + spread + 1
    # p=0.8 jitter: some views keep 128, most do not
    assert 0 < (level.round() == 128).sum() < len(level) // 2
