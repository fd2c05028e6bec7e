"""MoCo v2's two aug+ views made by NVIDIA DALI: the peer feed that ``feed_throughput.py`` runs
beside the released recipe and this project's path. A benchmark, not a training path.

DALI is what solo-learn (``--data_backend dali``) and NVIDIA's ResNet-50 references feed a GPU
with. ``fn.readers.file`` reads each file once (the tool's list of the folder's files) and each
view is then made on the ``mixed`` device on a GPU (nvJPEG, the hardware JPEG decoder where the
GPU has one), or by DALI's CPU operators without one:
``decoders.image_random_crop`` (scale 0.2–1.0, ratio 3/4–4/3), ``resize`` to the crop size,
ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2, Gaussian blur σ∈[0.1, 2.0] with
p=0.5, then flip (p=0.5) and ImageNet normalisation in one ``crop_mirror_normalize``, output
float32 NHWC, which is a channels-last NCHW tensor without a copy. The order of the ops is
torchvision's. The probabilities are DALI conditionals (``if`` on a per-image coin), so an op runs
only on the images it applies to.

Where it differs from torchvision's aug+ (``moco_d2/pretrain/augment.py``):

- **Decoding.** Each view decodes its own window of the JPEG (ROI decoding where the decoder
  can): two partial decodes per image, where PIL decodes the whole image once for both views.
- **File order.** The reader shuffles within a buffer of 1,024 files (DALI's default), not the
  whole list every epoch.
- **Crop window.** DALI's generator: area uniform, aspect ratio log-uniform, 10 attempts, as
  torchvision's (over 4,000 draws on 500×375: mean area 0.499 against 0.498, mean ratio 1.055
  against 1.052), from DALI's own generators, not torch's.
- **Resize.** DALI's antialiased linear filter, on uint8.
- **Jitter order.** Random per image, as torchvision's: four uniform keys per image, each op
  applied at the position its key ranks at (16 conditional branches).
- **Contrast** blends towards mid-grey, ``fn.contrast``'s default centre, not towards the
  image's mean grey as torchvision does (that would take a reduction per image and view first).
- **Hue** turns the colours about the grey axis, a linear map in RGB, by 360·h degrees
  (h ∈ [−0.1, 0.1]: ±36°), where torchvision shifts the hue channel of HSV.
- **Brightness, saturation and grayscale** follow torchvision's formulas (saturation and
  grayscale use the same luma weights).
- **Blur.** A true Gaussian of 2·⌈3σ⌉+1 taps (3 to 13), where PIL approximates it with box blurs.

Every op before the normalisation works on uint8, rounding as PIL does. docs/speed.md lists the
measured differences.
"""

from collections.abc import Iterator, Sequence

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from moco_d2 import IMAGENET_MEAN, IMAGENET_STD

SCALE = [0.2, 1.0]
RATIO = [3 / 4, 4 / 3]
JITTER = 0.4  # brightness, contrast and saturation factors in [0.6, 1.4]
HUE_DEGREES = 360 * 0.1  # torchvision's hue factor 0.1 is a tenth of a turn
SIGMA = [0.1, 2.0]
# What NVIDIA's ResNet-50 examples reserve for the mixed decoder, so that it does not reallocate.
MIXED_PADDING = {"device_memory_padding": 211025920, "host_memory_padding": 140544512}


def _factor(spread: float, centre: float = 1.0):
    return fn.random.uniform(range=[centre - spread, centre + spread])


def _jitter(images):
    """ColorJitter(0.4, 0.4, 0.4, 0.1), the four ops in a random order per image."""
    keys = [fn.random.uniform(range=[0.0, 1.0]) for _ in range(4)]
    ranks = [
        sum(fn.cast(keys[j] < keys[i], dtype=types.INT32) for j in range(4) if j != i)
        for i in range(4)
    ]
    for position in range(4):
        if ranks[0] == position:
            images = fn.brightness(images, brightness=_factor(JITTER))
        if ranks[1] == position:
            images = fn.contrast(images, contrast=_factor(JITTER))
        if ranks[2] == position:
            images = fn.saturation(images, saturation=_factor(JITTER))
        if ranks[3] == position:
            images = fn.hue(images, hue=_factor(HUE_DEGREES, 0.0))
    return images


def _coin(probability: float):
    return fn.random.coin_flip(probability=probability, dtype=types.BOOL)


def _view(jpegs, crop_size: int, decoder: str, layout: str):
    padding = MIXED_PADDING if decoder == "mixed" else {}
    images = fn.decoders.image_random_crop(
        jpegs, device=decoder, output_type=types.RGB, random_area=SCALE, random_aspect_ratio=RATIO,
        **padding,
    )  # fmt: skip
    images = fn.resize(images, size=[crop_size, crop_size], interp_type=types.INTERP_LINEAR)
    if _coin(0.8):
        images = _jitter(images)
    if _coin(0.2):
        images = fn.saturation(images, saturation=0.0)
    if _coin(0.5):
        images = fn.gaussian_blur(images, sigma=fn.random.uniform(range=SIGMA))
    return fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip(probability=0.5), dtype=types.FLOAT,
        output_layout=layout, mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
    )  # fmt: skip


@pipeline_def(enable_conditionals=True)
def _two_views(files: Sequence[str], crop_size: int, decoder: str, layout: str):
    jpegs, _ = fn.readers.file(files=list(files), random_shuffle=True)
    return tuple(_view(jpegs, crop_size, decoder, layout) for _ in range(2))


def aug_plus_pipeline(
    files: Sequence[str], batch_size: int, crop_size: int, device: torch.device, threads: int,
    seed: int = 0, channels_last: bool = True,
) -> Pipeline:  # fmt: skip
    """The built pipeline of both views of ``files``: on ``device``'s GPU with the ``mixed``
    decoder, or DALI's CPU operators alone where ``device`` is the CPU; NHWC output where
    ``channels_last``, else NCHW (the step's memory format, so that nothing copies it)."""
    cuda = device.type == "cuda"
    index = (
        (torch.cuda.current_device() if device.index is None else device.index) if cuda else None
    )
    pipe = _two_views(
        files, crop_size, "mixed" if cuda else "cpu", "HWC" if channels_last else "CHW",
        batch_size=batch_size, num_threads=threads, device_id=index, seed=seed,
    )  # fmt: skip
    pipe.build()
    return pipe


class DaliTwoViews:
    """``steps`` batches of ``[query, key]`` per iteration, cycling over ``files``: (N, 3, H, W)
    float32 tensors on ``device``, in channels-last memory where ``channels_last`` (the other
    arguments: :func:`aug_plus_pipeline`'s)."""

    def __init__(
        self, files: Sequence[str], batch_size: int, crop_size: int, device: torch.device,
        threads: int, steps: int, seed: int = 0, channels_last: bool = True,
    ) -> None:  # fmt: skip
        pipe = aug_plus_pipeline(files, batch_size, crop_size, device, threads, seed, channels_last)
        self.batches = DALIGenericIterator([pipe], ["q", "k"])  # no size: endless
        self.steps, self.nhwc = steps, channels_last

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for _ in range(self.steps):
            (out,) = next(self.batches)
            views = [out["q"], out["k"]]
            yield [v.permute(0, 3, 1, 2) for v in views] if self.nhwc else views
