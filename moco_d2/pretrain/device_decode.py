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
  as on the CPU path. An unreadable one is logged with its path and replaced from the folder as
  the loader path replaces it: by the next file that the CPU path reads, made on the host with
  the item's own seed (so the run stays exactly resumable, whatever ``-j``); it counts, with the
  files skipped to find its replacement, in the epoch's unreadable images, and the batch keeps
  its size and order.

The training process does little: a batch crosses from the workers as a few tensors (one byte
buffer of all the files, one int64 tensor of positions, offsets and boxes, the CPU-path crops;
:class:`EncodedBatch`), pinned by the DataLoader on CUDA, and nothing in the decoding waits for
the device but ``decode_jpeg`` itself (the rare replacement of an unreadable file aside: it is
decoded on the host and copied).

Numerically, with the same boxes, the crops equal the CPU path without PIL ``draft`` (the
device path always decodes at full size) within what the two JPEG decoders differ by.
"""

import dataclasses
import io
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from moco_d2.pretrain.data import TolerantImageFolder
from moco_d2.pretrain.device_augment import TwoCropsLoader, resized_views, resized_views_unrounded

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
    """A worker's item for the device: the file's bytes, the two crop boxes, where it came from.

    ``file`` (the file's index in the folder) and ``seed`` (the item's) are set by
    :class:`EncodedImageFolder`; they say how to replace the file if the decoder finds it
    unreadable.
    """

    data: bytes  # the whole file
    boxes: list[tuple[int, int, int, int]]  # (top, left, h, w) of the query's and the key's crop
    path: str
    file: int = -1
    seed: int = 0


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
        return EncodedViews(data, self.cpu_path.draw_boxes(*size), path)


class EncodedImageFolder(TolerantImageFolder):
    """The dataset of ``--decode-on device``: a :class:`TolerantImageFolder` of
    :class:`EncodedTwoCrops` items that know their file and their seed."""

    def __init__(self, root: str, crop_size: int) -> None:
        super().__init__(root, load=EncodedTwoCrops(crop_size))

    def __getitem__(self, index):
        image, target, skipped = super().__getitem__(index)
        if isinstance(image, EncodedViews):
            image.file = (index + skipped) % len(self.samples)
            # SeededItems seeds torch's generator with the item's seed before making the item
            image.seed = torch.initial_seed()
        return image, target, skipped


@dataclass
class EncodedBatch:
    """A collated batch of ``N`` images: ``E`` encoded files and ``F`` CPU-path crops.

    It crosses from the workers as two tensors in shared memory (three with CPU-path crops) and
    three short lists: what a tensor costs the receiving process is mostly the transfer of its
    file descriptor, and views of one tensor share it. So the positions, offsets and boxes are
    views of one int64 ``layout`` tensor, and so are the skipped counts that
    :func:`collate_encoded` returns with the batch.
    """

    size: int  # N
    data: torch.Tensor  # uint8: the E files one after the other
    layout: torch.Tensor  # int64: positions (N), offsets (E + 1), boxes (8 E), skipped (N)
    crops: torch.Tensor | None  # uint8 (F, 2, 3, crop, crop) from the CPU path, None if F = 0
    paths: list[str]  # of the E files, for the logs
    files: list[int]  # their indices in the folder, and their items' seeds: for replacements
    seeds: list[int]

    @property
    def positions(self) -> torch.Tensor:
        """``(N,)``: the batch positions of the E files, then those of the F crops."""
        return self.layout[: self.size]

    @property
    def offsets(self) -> torch.Tensor:
        """``(E + 1,)``: file k is ``data[offsets[k] : offsets[k + 1]]``."""
        return self.layout[self.size : self.size + len(self.paths) + 1]

    @property
    def boxes(self) -> torch.Tensor:
        """``(E, 2, 4)``: ``(top, left, h, w)`` of each file's query and key crops."""
        start = self.size + len(self.paths) + 1
        return self.layout[start : start + 8 * len(self.paths)].view(-1, 2, 4)

    def pin_memory(self) -> "EncodedBatch":
        """The DataLoader's ``pin_memory`` calls this on CUDA: what goes to the device in
        page-locked memory, so that the copies do not block the host. The bytes stay where they
        are: the decoder reads them on the host."""
        crops = None if self.crops is None else self.crops.pin_memory()
        return dataclasses.replace(self, layout=self.layout.pin_memory(), crops=crops)


def collate_encoded(items: Sequence[tuple[Any, int, int]]) -> tuple[EncodedBatch, Any, Any]:
    """``(EncodedBatch, targets, skipped)``: the DataLoader's collate (it runs in the workers)
    for :class:`EncodedImageFolder` items."""
    images, targets, skipped = zip(*items)
    encoded = [i for i, x in enumerate(images) if isinstance(x, EncodedViews)]
    cropped = [i for i, x in enumerate(images) if not isinstance(x, EncodedViews)]
    files = [images[i] for i in encoded]
    packed = bytearray().join(x.data for x in files)  # one copy; frombuffer does not copy
    data = (
        torch.frombuffer(packed, dtype=torch.uint8) if packed else torch.empty(0, dtype=torch.uint8)
    )
    offsets = [0, *itertools.accumulate(len(x.data) for x in files)]
    boxes = [v for x in files for box in x.boxes for v in box]
    layout = torch.tensor(encoded + cropped + offsets + boxes + list(skipped), dtype=torch.int64)
    batch = EncodedBatch(
        size=len(images),
        data=data,
        layout=layout,
        crops=default_collate([images[i] for i in cropped]) if cropped else None,
        paths=[x.path for x in files],
        files=[x.file for x in files],
        seeds=[x.seed for x in files],
    )
    return batch, default_collate(list(targets)), layout[-len(images) :]


class DeviceDecoder:
    """Device side: an :class:`EncodedBatch` → uint8 views ``(N, 2, 3, crop, crop)`` on
    ``device`` in the batch's order, and the number of unreadable files met.

    The crops are resized as :class:`TwoCropsLoader` resizes them. Torch's uint8 antialiased
    kernel is CPU-only, so elsewhere torchvision casts each view to float, resizes it, rounds it
    and casts it back: here the rounding and the cast back run once for the whole batch (the
    same values in half the kernels).

    Nothing here waits for the device but ``decode_jpeg`` itself: offsets and boxes are read on
    the host (they are host data), the CPU-path crops and the positions go to the device by
    non-blocking copies from the pinned batch, and ``index_copy_`` puts the parts in order.
    A file unreadable for the decoder and for PIL is replaced from ``folder``
    (:meth:`TolerantImageFolder.replacement`, with the CPU path), as the loader path replaces it;
    without a folder (None) every image must be readable.
    """

    def __init__(self, crop_size: int, folder: TolerantImageFolder | None) -> None:
        self.crop_size = crop_size
        self.folder = folder
        self.cpu_path = TwoCropsLoader(crop_size)

    def __call__(self, batch: EncodedBatch, device: torch.device) -> tuple[torch.Tensor, int]:
        c = self.crop_size
        offsets = batch.offsets.tolist()
        data = [batch.data[start:end] for start, end in zip(offsets, offsets[1:])]
        decoded = self._decode(data, batch.paths, device)
        encoded, unreadable = self.views(decoded, batch.boxes.tolist(), batch, device)
        if batch.crops is None:  # every image was encoded: already in the batch's order
            assert encoded is not None  # a batch has at least one image
            return encoded, unreadable
        crops = batch.crops.to(device, non_blocking=True)
        if encoded is None:
            return crops, unreadable
        positions = batch.positions.to(device, non_blocking=True)
        out = torch.empty((batch.size, 2, 3, c, c), dtype=torch.uint8, device=device)
        out.index_copy_(0, positions[: encoded.shape[0]], encoded)
        out.index_copy_(0, positions[encoded.shape[0] :], crops)
        return out, unreadable

    def views(
        self,
        decoded: list[torch.Tensor | None],
        boxes: list,
        batch: EncodedBatch | None,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, int]:
        """uint8 ``(E, 2, 3, crop, crop)`` views of the ``decoded`` images (None: unreadable,
        replaced from the folder, ``batch`` saying which file and seed) and the unreadable
        files met."""
        c = self.crop_size
        views, unreadable = [], 0
        native = device.type == "cpu"
        for k, (pixels, image_boxes) in enumerate(zip(decoded, boxes)):
            if pixels is None:
                # only a decoder with a folder is given unreadable images, with their batch
                assert self.folder is not None and batch is not None
                crops, skipped = self.folder.replacement(
                    batch.files[k], batch.seeds[k], self.cpu_path
                )
                crops = crops.to(device)
                views.extend((crops if native else crops.float()).unbind())
                unreadable += 1 + skipped
            elif native:
                views.extend(resized_views(pixels, image_boxes, c))
            else:
                views.extend(resized_views_unrounded(pixels, image_boxes, c))
        if not views:
            return None, unreadable
        encoded = torch.stack(views) if native else torch.stack(views).round_().to(torch.uint8)
        return encoded.view(-1, 2, 3, c, c), unreadable

    def _decode(
        self, data: list[torch.Tensor], paths: list[str], device: torch.device
    ) -> list[torch.Tensor | None]:
        if not data:
            return []
        try:
            return decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
        except RuntimeError:  # one bad image fails the whole call: find it image by image
            return [_decode_one(d, path, device) for d, path in zip(data, paths)]


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


class DecodeSetup(NamedTuple):
    """What ``--decode-on`` changes in a pretraining run with ``--augment-on device``."""

    dataset: TolerantImageFolder  # its loader runs in the workers
    collate_fn: Callable | None  # the DataLoader's (None: its default)
    decode: DeviceDecoder | None  # batch → views on the device, for train_one_epoch


def decode_setup(decode_on: str, crop_size: int, root: str) -> DecodeSetup:
    """The image folder ``root`` as ``--decode-on`` reads it with ``--augment-on device``."""
    if decode_on == "device":
        folder = EncodedImageFolder(root, crop_size)
        return DecodeSetup(folder, collate_encoded, DeviceDecoder(crop_size, folder))
    return DecodeSetup(TolerantImageFolder(root, load=TwoCropsLoader(crop_size)), None, None)
