"""JPEG decoding on the training device (``--decode-on device``, with ``--augment-on device``).

Decoding is most of the host work left by ``--augment-on device`` (of 4.3 ms host CPU per
500×375 image, measured on an H200 node). Here the DataLoader workers only read the file, take
its size from the JPEG header and draw the two RandomResizedCrop boxes (with
:meth:`TwoCropsLoader.draw_boxes`: the same distribution and the same random numbers, in the same
order, as ``--decode-on loader``). The batch is then decoded in one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA, libjpeg-turbo on CPU),
cropped and resized there with the same kernel as :class:`TwoCropsLoader`, and handed to
:class:`DeviceAugment`.

Rules:

- The device decodes 8-bit, Huffman-coded baseline, extended or progressive JPEGs with three
  YCbCr components. Anything else (PNG and other formats, grayscale, CMYK/YCCK or RGB-coded
  JPEGs, arithmetic or lossless coding, images over PIL's pixel limit) takes today's CPU path in
  the worker (:class:`TwoCropsLoader`), so it arrives as uint8 crops and counts nothing.
- Files that cannot be read or whose header is not an image are skipped by
  :class:`TolerantImageFolder` exactly as before (the item's ``skipped`` count).
- A JPEG that the device decoder rejects (bad data behind a valid header) is decoded again on
  the host with PIL and the same boxes, so a file counts as unreadable only when PIL fails too,
  as on the CPU path. An unreadable one takes the views of the next readable image of the batch
  (in batch order, wrapping around), is logged with its path and counted in the epoch's
  unreadable images; the batch keeps its size and order.

Numerically, with the same boxes, the crops equal the CPU path without PIL ``draft`` (the
device path always decodes at full size) within what the two JPEG decoders differ by.
"""

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from moco_d2.pretrain.device_augment import TwoCropsLoader, resized_crops

logger = logging.getLogger(__name__)

# Huffman-coded baseline, extended sequential and progressive frames: what nvJPEG decodes
DEVICE_SOF_MARKERS = (0xC0, 0xC1, 0xC2)
_SOS, _APP14 = 0xDA, 0xEE
_NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC share the 0xC? range


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG that the device path decodes, from its markers up to the
    first scan; ``None`` for anything else (see the module's rules)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    frame = None
    rgb_coded = False
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == _SOS:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or 0xD0 <= marker <= 0xD9 or marker == 0x01:
            return None  # a stand-alone marker before the first scan: leave it to PIL
        if marker == _APP14 and segment.startswith(b"Adobe") and len(segment) >= 12:
            rgb_coded = segment[11] == 0  # Adobe transform 0: RGB, not YCbCr
        elif 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            if marker not in DEVICE_SOF_MARKERS or frame is not None or len(segment) < 15:
                return None
            frame = segment
        pos += 2 + length
    if frame is None or frame[0] != 8 or frame[5] != 3:
        return None
    height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
    component_ids = bytes(frame[6 + 3 * k] for k in range(3))
    if rgb_coded or component_ids == b"RGB" or not width or not height:
        return None
    if width * height > (Image.MAX_IMAGE_PIXELS or width * height):
        return None  # PIL's decompression-bomb check stays in charge of huge images
    return width, height


@dataclass
class EncodedViews:
    """A worker's item for the device: the file's bytes, the two crop boxes, the path."""

    data: torch.Tensor  # uint8, the whole file
    boxes: torch.Tensor  # (2, 4) int64: (top, left, h, w) of the query's and the key's crop
    path: str


class EncodedTwoCrops:
    """Worker side of ``--decode-on device``: one file → :class:`EncodedViews`, or, for files
    the device does not decode, the CPU path's uint8 views ``(2, 3, crop, crop)``."""

    def __init__(self, crop_size: int) -> None:
        self.cpu_path = TwoCropsLoader(crop_size)

    def __call__(self, path: str) -> EncodedViews | torch.Tensor:
        with open(path, "rb") as f:
            data = f.read()
        size = jpeg_size(data)
        if size is None:
            return self.cpu_path.from_file(io.BytesIO(data))
        boxes = torch.tensor(self.cpu_path.draw_boxes(*size), dtype=torch.int64)
        return EncodedViews(torch.frombuffer(bytearray(data), dtype=torch.uint8), boxes, path)


@dataclass
class EncodedBatch:
    """A collated batch of mixed items, each kind with its positions in the batch."""

    size: int
    data: list[torch.Tensor]
    boxes: list[torch.Tensor]
    paths: list[str]
    encoded_index: list[int]
    crops: torch.Tensor | None  # (F, 2, 3, crop, crop) uint8 from the CPU path, or None
    crops_index: list[int]


def collate_encoded(items: Sequence[tuple[Any, int, int]]) -> tuple[EncodedBatch, Any, Any]:
    """``(EncodedBatch, targets, skipped)``: the DataLoader's collate for :class:`EncodedTwoCrops`
    items in a :class:`TolerantImageFolder`."""
    images, targets, skipped = zip(*items)
    encoded = [i for i, x in enumerate(images) if isinstance(x, EncodedViews)]
    cropped = [i for i, x in enumerate(images) if not isinstance(x, EncodedViews)]
    batch = EncodedBatch(
        size=len(images),
        data=[images[i].data for i in encoded],
        boxes=[images[i].boxes for i in encoded],
        paths=[images[i].path for i in encoded],
        encoded_index=encoded,
        crops=torch.stack([images[i] for i in cropped]) if cropped else None,
        crops_index=cropped,
    )
    return batch, default_collate(targets), default_collate(skipped)


class DeviceDecoder:
    """Device side: an :class:`EncodedBatch` → uint8 views ``(N, 2, 3, crop, crop)`` on
    ``device`` in the batch's order, and the number of unreadable images replaced."""

    def __init__(self, crop_size: int) -> None:
        self.crop_size = crop_size

    def __call__(self, batch: EncodedBatch, device: torch.device) -> tuple[torch.Tensor, int]:
        c = self.crop_size
        views = torch.empty((batch.size, 2, 3, c, c), dtype=torch.uint8, device=device)
        if batch.crops is not None:
            views[batch.crops_index] = batch.crops.to(device, non_blocking=True)
        unreadable = []
        for i, pixels, boxes in zip(batch.encoded_index, self._decode(batch, device), batch.boxes):
            if pixels is None:
                unreadable.append(i)
            else:
                views[i] = resized_crops(pixels, boxes.tolist(), c)
        if unreadable:
            _replace_by_next_readable(views, unreadable, batch)
        return views, len(unreadable)

    def _decode(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor | None]:
        if not batch.data:
            return []
        try:
            return decode_jpeg(batch.data, device=device, mode=ImageReadMode.RGB)
        except RuntimeError:  # one bad image fails the whole call: find it image by image
            return [_decode_one(data, path, device) for data, path in zip(batch.data, batch.paths)]


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor | None:
    """One image on the device, else with PIL on the host (as the CPU path), else None."""
    try:
        return decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        rejected = e
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            pixels = pil_to_tensor(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        logger.warning("unreadable image skipped: %s (%s)", path, e)
        return None
    logger.warning("decoded on the host, the device decoder rejected %s (%s)", path, rejected)
    return pixels.to(device)


def _replace_by_next_readable(views: torch.Tensor, unreadable: list[int], batch: EncodedBatch):
    bad = set(unreadable)
    readable = [i for i in range(batch.size) if i not in bad]
    if not readable:
        raise RuntimeError(
            f"no readable image in a batch of {batch.size} (e.g. {batch.paths[0]}): "
            "is the data folder damaged?"
        )
    for i in unreadable:
        views[i] = views[next((j for j in readable if j > i), readable[0])]


class DecodeSetup(NamedTuple):
    """What ``--decode-on`` changes in a pretraining run with ``--augment-on device``."""

    load: Callable[[str], Any]  # the TolerantImageFolder's loader (runs in the workers)
    collate_fn: Callable | None  # the DataLoader's (None: its default)
    decode: DeviceDecoder | None  # batch → views on the device, for train_one_epoch


def decode_setup(decode_on: str, crop_size: int) -> DecodeSetup:
    if decode_on == "device":
        return DecodeSetup(EncodedTwoCrops(crop_size), collate_encoded, DeviceDecoder(crop_size))
    return DecodeSetup(TwoCropsLoader(crop_size), None, None)
