"""--decode-on device: header parsing, crop boxes and random numbers as the CPU path, decoded
crops against PIL's, the fallbacks, unreadable files, batch order, and the flags."""

import argparse
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from moco_d2.errors import UserError
from moco_d2.pretrain.data import TolerantImageFolder
from moco_d2.pretrain.device_augment import TwoCropsLoader
from moco_d2.pretrain.device_decode import (
    DeviceDecoder,
    EncodedTwoCrops,
    EncodedViews,
    _decode_one,
    collate_encoded,
    jpeg_size,
)
from moco_d2.pretrain.speed_flags import add_speed_arguments, resolve_speed_arguments

CROP = 48
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _photo(seed, size=(200, 150)):
    """Smooth colour noise: JPEG-like content with real chroma."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 10, size[0] // 10, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.BICUBIC)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One folder of each kind of file the device path meets, named in scan order."""
    root = tmp_path_factory.mktemp("decode")
    paths = {
        "jpeg": root / "a_baseline.jpg",
        "progressive": root / "b_progressive.jpg",
        "png": root / "c_image.png",
        "jpeg444": root / "d_444.jpg",
        "gray": root / "e_gray.jpg",
        "cmyk": root / "f_cmyk.jpg",
        "rgb_coded": root / "g_adobe_rgb.jpg",
        "jpeg2": root / "h_second.jpg",
    }
    _photo(0).save(paths["jpeg"], quality=90)
    _photo(1, (160, 220)).save(paths["progressive"], quality=85, progressive=True)
    _photo(2).save(paths["png"])
    _photo(3).save(paths["jpeg444"], quality=95, subsampling=0)
    _photo(4).convert("L").save(paths["gray"], quality=90)
    _photo(5).convert("CMYK").save(paths["cmyk"], quality=90)
    _photo(6).save(paths["rgb_coded"], quality=90, keep_rgb=True)
    _photo(7, (90, 300)).save(paths["jpeg2"], quality=90)
    return paths


DEVICE_KINDS = ("jpeg", "progressive", "jpeg444", "jpeg2")
CPU_KINDS = ("png", "gray", "cmyk", "rgb_coded")


def test_header_gives_the_size_of_device_jpegs_only(files):
    for kind, path in files.items():
        size = jpeg_size(path.read_bytes())
        expected = Image.open(path).size if kind in DEVICE_KINDS else None
        assert size == expected, kind
    data = files["jpeg"].read_bytes()
    assert jpeg_size(b"") is None and jpeg_size(data[:20]) is None
    assert jpeg_size(data[:600]) == (200, 150)  # cut in the scan: the header still reads


def test_boxes_and_random_numbers_are_the_cpu_paths(files):
    """Same seed → the same two boxes as torchvision's RandomResizedCrop on the decoded image,
    and the generator left in the same state as TwoCropsLoader leaves it, for every file."""
    for kind, path in files.items():
        torch.manual_seed(7)
        item = EncodedTwoCrops(CROP)(str(path))
        after = torch.get_rng_state()
        torch.manual_seed(7)
        TwoCropsLoader(CROP)(str(path))
        assert torch.equal(after, torch.get_rng_state()), kind
        if kind in DEVICE_KINDS:
            torch.manual_seed(7)
            image = Image.open(path)
            rrc = T.RandomResizedCrop(CROP, scale=(0.2, 1.0))
            boxes = [rrc.get_params(image, rrc.scale, rrc.ratio) for _ in range(2)]
            assert isinstance(item, EncodedViews) and item.boxes.tolist() == [
                list(b) for b in boxes
            ]
            assert bytes(item.data.numpy()) == path.read_bytes() and item.path == str(path)


def _decoded_against_pil(files, device):
    """Device-decoded views and the CPU path's (no draft) with the same seeds, per JPEG."""
    pairs = []
    for seed, kind in enumerate(DEVICE_KINDS):
        torch.manual_seed(seed)
        item = EncodedTwoCrops(CROP)(str(files[kind]))
        torch.manual_seed(seed)
        expected = TwoCropsLoader(CROP, draft=False)(str(files[kind]))
        batch, _, _ = collate_encoded([(item, 0, 0)])
        views, unreadable = DeviceDecoder(CROP)(batch, torch.device(device))
        assert unreadable == 0 and views.device.type == device
        pairs.append((views[0].cpu().int(), expected.int()))
    return pairs


def test_device_decoded_crops_equal_pil_decoded_crops_on_cpu(files):
    # torchvision and Pillow both decode with libjpeg-turbo's default (islow) IDCT and fancy
    # upsampling, and crop with the same kernel: measured equal, bit for bit
    for got, expected in _decoded_against_pil(files, "cpu"):
        assert torch.equal(got, expected)


@pytest.mark.gpu
@CUDA
def test_device_decoded_crops_stay_close_to_pil_decoded_crops_on_cuda(files):
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's; bound not measured yet
    for got, expected in _decoded_against_pil(files, "cuda"):
        diff = (got - expected).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 12


def test_other_files_take_the_cpu_path_and_count_nothing(files):
    for kind in CPU_KINDS:
        folder = TolerantImageFolder(str(files[kind].parent), load=EncodedTwoCrops(CROP))
        index = [p for p, _ in folder.samples].index(str(files[kind]))
        torch.manual_seed(3)
        views, _, skipped = folder[index]
        torch.manual_seed(3)
        assert skipped == 0 and torch.equal(views, TwoCropsLoader(CROP)(str(files[kind]))), kind


def _mixed_folder(files, tmp_path, broken=()):
    """A folder with one file per kind in ``files``' order; ``broken`` kinds damaged."""
    for kind, path in files.items():
        data = path.read_bytes()
        if kind in broken:
            data = b"" if kind == "png" else data[: len(data) // 2]  # empty / truncated
        (tmp_path / path.name).write_bytes(data)
    return TolerantImageFolder(str(tmp_path), load=EncodedTwoCrops(CROP))


def _expected_views(path):
    """The CPU path's views of ``path``: without draft for JPEGs that the device decodes."""
    draft = jpeg_size(path.read_bytes()) is None
    return TwoCropsLoader(CROP, draft=draft)(str(path))


def test_a_mixed_batch_keeps_its_order(files, tmp_path):
    folder = _mixed_folder(files, tmp_path)
    items = []
    for i in range(len(folder)):
        torch.manual_seed(i)
        items.append(folder[i])
    batch, targets, skipped = collate_encoded(items)
    assert batch.encoded_index == [0, 1, 3, 7] and batch.crops_index == [2, 4, 5, 6]
    assert targets.tolist() == [0] * 8 and skipped.tolist() == [0] * 8
    views, unreadable = DeviceDecoder(CROP)(batch, torch.device("cpu"))
    assert views.shape == (8, 2, 3, CROP, CROP) and views.dtype == torch.uint8 and unreadable == 0
    for i, (path, _) in enumerate(folder.samples):
        torch.manual_seed(i)
        assert torch.equal(views[i], _expected_views(Path(path))), path


def test_empty_and_truncated_files_are_replaced_and_counted(files, tmp_path, caplog):
    folder = _mixed_folder(files, tmp_path, broken=("progressive", "png", "jpeg2"))
    items = []
    with caplog.at_level(logging.WARNING):
        for i in range(len(folder)):
            torch.manual_seed(i)
            items.append(folder[i])
        # the empty file is skipped in the worker, as before: its item is the next file's
        assert [s for _, _, s in items] == [0, 0, 1, 0, 0, 0, 0, 0]
        assert str(tmp_path / files["png"].name) in caplog.text
        # the truncated JPEGs have valid headers: only the decoder finds them
        truncated = [str(tmp_path / files[k].name) for k in ("progressive", "jpeg2")]
        assert not any(p in caplog.text for p in truncated)
        assert isinstance(items[1][0], EncodedViews) and isinstance(items[7][0], EncodedViews)
        batch, _, skipped = collate_encoded(items)
        views, unreadable = DeviceDecoder(CROP)(batch, torch.device("cpu"))
    assert unreadable == 2 and int(skipped.sum()) + unreadable == 3
    for path in truncated:
        assert f"unreadable image skipped: {path}" in caplog.text
    # replaced by the next readable image of the batch, wrapping around at its end
    assert torch.equal(views[1], views[2]) and torch.equal(views[7], views[0])
    torch.manual_seed(0)
    assert torch.equal(views[0], _expected_views(files["jpeg"]))
    torch.manual_seed(2)
    assert torch.equal(views[2], _expected_views(files["jpeg444"]))


def test_a_batch_of_only_unreadable_images_stops_with_a_message(files):
    data = files["jpeg"].read_bytes()[:700]
    item = EncodedViews(torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.ones(2, 4), "x")
    batch, _, _ = collate_encoded([(item, 0, 0)] * 2)
    with pytest.raises(RuntimeError, match="no readable image in a batch of 2"):
        DeviceDecoder(CROP)(batch, torch.device("cpu"))


def test_the_host_retry_decodes_with_pil(files):
    """What a JPEG that the device decoder rejects gets: PIL's pixels, as the CPU path."""
    path = files["progressive"]
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    pixels = _decode_one(data, str(path), torch.device("cpu"))
    assert torch.equal(pixels, T.functional.pil_to_tensor(Image.open(path).convert("RGB")))
    assert _decode_one(data[: len(data) // 2], str(path), torch.device("cpu")) is None
    with pytest.raises(OSError):  # and PIL refuses what the decoder refused
        Image.open(io.BytesIO(bytes(data[: len(data) // 2].numpy()))).load()


def _flags(*argv):
    parser = argparse.ArgumentParser()
    add_speed_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, device, augment_on, decode_on",
    [
        ((), "cpu", "loader", "loader"),
        ((), "cuda", "device", "device"),
        (("--augment-on", "loader"), "cuda", "loader", "loader"),
        (("--augment-on", "device"), "cpu", "device", "loader"),
        (("--decode-on", "device"), "cpu", "device", "device"),
        (("--decode-on", "loader"), "cuda", "device", "loader"),
    ],
)
def test_decode_on_defaults_follow_the_device_and_the_augmentation(
    argv, device, augment_on, decode_on
):
    args = _flags(*argv)
    resolve_speed_arguments(args, torch.device(device))
    assert (args.augment_on, args.decode_on) == (augment_on, decode_on)


def test_decode_on_device_with_augment_on_loader_is_a_user_error():
    with pytest.raises(UserError, match="^--decode-on device needs --augment-on device"):
        resolve_speed_arguments(
            _flags("--decode-on", "device", "--augment-on", "loader"), torch.device("cuda")
        )
