"""--decode-on device: header parsing, crop boxes and random numbers as the CPU path, decoded
crops against PIL's, the fallbacks, unreadable files and their replacement, the packed batch and
its order, and the flags."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from moco_d2.errors import UserError
from moco_d2.launch import one_process
from moco_d2.pretrain.config import PretrainConfig
from moco_d2.pretrain.data import TolerantImageFolder
from moco_d2.pretrain.device_augment import TwoCropsLoader
from moco_d2.pretrain.device_decode import (
    DeviceDecoder,
    EncodedImageFolder,
    EncodedTwoCrops,
    EncodedViews,
    _decode_one,
    collate_encoded,
    jpeg_size,
)
from moco_d2.pretrain.main import build_train_data, build_train_loader

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
            assert isinstance(item, EncodedViews) and item.boxes == boxes
            assert item.data == path.read_bytes() and item.path == str(path)


def _decoded_against_pil(files, device):
    """Device-decoded views and the CPU path's (no draft) with the same seeds, per JPEG."""
    pairs = []
    decoder = DeviceDecoder(CROP, EncodedImageFolder(str(files["jpeg"].parent), CROP))
    for seed, kind in enumerate(DEVICE_KINDS):
        torch.manual_seed(seed)
        item = EncodedTwoCrops(CROP)(str(files[kind]))
        torch.manual_seed(seed)
        expected = TwoCropsLoader(CROP, draft=False)(str(files[kind]))
        batch, _, _ = collate_encoded([(item, 0, 0)])
        views, unreadable = decoder(batch, torch.device(device))
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
        folder = EncodedImageFolder(str(files[kind].parent), CROP)
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
    return EncodedImageFolder(str(tmp_path), CROP)


def _expected_views(path):
    """The CPU path's views of ``path``: without draft for JPEGs that the device decodes."""
    draft = jpeg_size(path.read_bytes()) is None
    return TwoCropsLoader(CROP, draft=draft)(str(path))


def _items(folder, indices):
    """``folder[i]`` for each index, each made with torch's generator seeded with ``i``."""
    items = []
    for i in indices:
        torch.manual_seed(i)
        items.append(folder[i])
    return items


def test_a_mixed_batch_keeps_its_order(files, tmp_path):
    folder = _mixed_folder(files, tmp_path)
    batch, targets, skipped = collate_encoded(_items(folder, range(len(folder))))
    assert batch.positions.tolist() == [0, 1, 3, 7, 2, 4, 5, 6]
    assert targets.tolist() == [0] * 8 and skipped.tolist() == [0] * 8
    views, unreadable = DeviceDecoder(CROP, folder)(batch, torch.device("cpu"))
    assert views.shape == (8, 2, 3, CROP, CROP) and views.dtype == torch.uint8 and unreadable == 0
    for i, (path, _) in enumerate(folder.samples):
        torch.manual_seed(i)
        assert torch.equal(views[i], _expected_views(Path(path))), path


def test_a_batch_travels_as_one_byte_buffer_and_one_int_tensor(files, tmp_path):
    """Every file's bytes in one buffer, and every small array (positions, offsets, boxes, and
    the skipped counts returned with it) a view of one int64 tensor: what crosses from a worker
    is two shared-memory files (three with CPU-path crops), and the targets."""
    folder = _mixed_folder(files, tmp_path)
    items = _items(folder, range(len(folder)))
    batch, targets, skipped = collate_encoded(items)
    encoded = [item for item, _, _ in items if isinstance(item, EncodedViews)]
    offsets = batch.offsets.tolist()
    assert len(offsets) == len(encoded) + 1 and offsets[0] == 0
    assert bytes(batch.data.numpy()) == b"".join(x.data for x in encoded)
    for k, x in enumerate(encoded):
        assert bytes(batch.data[offsets[k] : offsets[k + 1]].numpy()) == x.data
        assert batch.boxes[k].tolist() == [list(box) for box in x.boxes]
    assert batch.paths == [x.path for x in encoded] and batch.files == [0, 1, 3, 7]
    storage = batch.layout.untyped_storage().data_ptr()
    for small in (batch.positions, batch.offsets, batch.boxes, skipped):
        assert small.untyped_storage().data_ptr() == storage
    assert batch.crops.shape == (4, 2, 3, CROP, CROP)
    assert sum(isinstance(v, torch.Tensor) for v in vars(batch).values()) == 3


@pytest.mark.gpu
@CUDA
def test_pinning_a_batch_pins_what_goes_to_the_device(files, tmp_path):
    folder = _mixed_folder(files, tmp_path)
    batch, _, _ = collate_encoded(_items(folder, range(len(folder))))
    pinned = batch.pin_memory()
    assert pinned.layout.is_pinned() and pinned.crops.is_pinned()
    assert torch.equal(pinned.layout, batch.layout) and pinned.paths == batch.paths


def _loader_path_skips(root, indices):
    """What ``--decode-on loader`` counts for these items: the files it skips."""
    folder = TolerantImageFolder(str(root), load=TwoCropsLoader(CROP))
    return sum(skipped for _, _, skipped in _items(folder, indices))


def test_unreadable_files_are_replaced_from_the_folder_and_counted(files, tmp_path, caplog):
    folder = _mixed_folder(files, tmp_path, broken=("progressive", "png", "jpeg2"))
    with caplog.at_level(logging.WARNING):
        items = _items(folder, range(len(folder)))
        # the empty file is skipped in the worker, as before: its item is the next file's
        assert [s for _, _, s in items] == [0, 0, 1, 0, 0, 0, 0, 0]
        assert str(tmp_path / files["png"].name) in caplog.text
        # the truncated JPEGs have valid headers: only the decoder finds them
        truncated = [str(tmp_path / files[k].name) for k in ("progressive", "jpeg2")]
        assert not any(p in caplog.text for p in truncated)
        assert isinstance(items[1][0], EncodedViews) and isinstance(items[7][0], EncodedViews)
        batch, _, skipped = collate_encoded(items)
        rng = torch.get_rng_state()
        views, unreadable = DeviceDecoder(CROP, folder)(batch, torch.device("cpu"))
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random stream is untouched
    for path in truncated:
        assert f"unreadable image skipped: {path}" in caplog.text
    # item 1 skips the empty PNG and item 7 wraps around: the loader path's count
    assert unreadable == 3 and int(skipped.sum()) + unreadable == 4
    assert _loader_path_skips(tmp_path, range(len(folder))) == 4
    # each replacement is the CPU path's views of the next readable file, with the item's seed
    torch.manual_seed(1)
    assert torch.equal(views[1], TwoCropsLoader(CROP)(str(files["jpeg444"])))
    torch.manual_seed(7)
    assert torch.equal(views[7], TwoCropsLoader(CROP)(str(files["jpeg"])))
    torch.manual_seed(2)  # item 2 is the next file itself, decoded on the device
    assert torch.equal(views[2], _expected_views(files["jpeg444"]))


def _one_good_among_truncated(root, good=11, n=16):
    """``n`` JPEGs of which only file ``good`` decodes; the others keep a valid header."""
    root.mkdir()
    for i in range(n):
        data = io.BytesIO()
        _photo(i, (64, 48)).save(data, format="JPEG", quality=90)
        data = data.getvalue()
        (root / f"{i:02d}.jpg").write_bytes(data if i == good else data[: len(data) // 2])
    return root


def test_a_batch_with_no_readable_image_is_replaced_from_the_folder(tmp_path):
    root = _one_good_among_truncated(tmp_path / "data")
    folder = EncodedImageFolder(str(root), CROP)
    indices = [3, 0, 15, 7, 12, 5, 9, 14]  # the good file, 11, is none of them
    batch, _, skipped = collate_encoded(_items(folder, indices))
    views, unreadable = DeviceDecoder(CROP, folder)(batch, torch.device("cpu"))
    assert int(skipped.sum()) == 0
    assert unreadable == sum((11 - i) % 16 for i in indices) == _loader_path_skips(root, indices)
    for k, i in enumerate(indices):
        # the item's seed, then the CPU path tried on each file from the next one on, as the
        # loader path tries them (a truncated file draws its boxes before it fails to decode)
        torch.manual_seed(i)
        for j in range(i + 1, i + 17):
            try:
                expected = TwoCropsLoader(CROP)(str(root / f"{j % 16:02d}.jpg"))
                break
            except OSError:
                continue
        assert j % 16 == 11 and torch.equal(views[k], expected), i


def test_the_host_retry_decodes_with_pil(files):
    """What a JPEG that the device decoder rejects gets: PIL's pixels, as the CPU path."""
    path = files["progressive"]
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    pixels = _decode_one(data, str(path), torch.device("cpu"))
    assert torch.equal(pixels, T.functional.pil_to_tensor(Image.open(path).convert("RGB")))
    assert _decode_one(data[: len(data) // 2], str(path), torch.device("cpu")) is None
    with pytest.raises(OSError):  # and PIL refuses what the decoder refused
        Image.open(io.BytesIO(bytes(data[: len(data) // 2].numpy()))).load()


@pytest.mark.parametrize(
    "flags, device, augment_on, decode_on",
    [
        ({}, "cpu", "loader", "loader"),
        ({}, "cuda", "device", "device"),
        ({"augment_on": "loader"}, "cuda", "loader", "loader"),
        ({"augment_on": "device"}, "cpu", "device", "loader"),
        ({"decode_on": "device"}, "cpu", "device", "device"),
        ({"decode_on": "loader"}, "cuda", "device", "loader"),
    ],
)
def test_decode_on_defaults_follow_the_device_and_the_augmentation(
    flags, device, augment_on, decode_on
):
    config = PretrainConfig(arch="resnet18", batch_size=8, crop_size=64, **flags)
    resolved = config.resolved(one_process(device), seed=0)
    assert (resolved.augment_on, resolved.decode_on) == (augment_on, decode_on)
    assert resolved.channels_last == (device == "cuda")


def test_decode_on_device_with_augment_on_loader_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="^--decode-on device needs --augment-on device"):
        PretrainConfig.parse([str(tmp_path), "--decode-on", "device", "--augment-on", "loader"])


def _decoded_epochs(root, workers, epochs=2):
    """Every batch of ``epochs`` epochs as the tool loads and decodes it with ``-j workers``."""
    argv = [str(root), "-b", "4", "-j", str(workers), "--crop-size", str(CROP), "--seed", "5"]
    argv += ["--decode-on", "device", "--device", "cpu", "--epochs", str(epochs)]
    config = PretrainConfig.parse(argv).resolved(one_process(), seed=5)
    data = build_train_data(config, str(root))
    loader = build_train_loader(data, config, one_process())
    out = []
    for epoch in range(epochs):
        for images, _, skipped in loader.epoch(epoch):
            views, unreadable = data.decode(images, torch.device("cpu"))
            out.append((views, int(skipped.sum()) + unreadable))
    return out


def test_replacements_do_not_depend_on_the_workers(tmp_path):
    """Each replacement depends on its item only (its seed, its file): the same with -j 0 and
    -j 2, which is what keeps SIGKILL + --resume exact."""
    root = tmp_path / "data"
    root.mkdir()
    for i in range(12):
        data = io.BytesIO()
        _photo(i, (64, 48)).save(data, format="JPEG", quality=90)
        data = data.getvalue()
        (root / f"{i:02d}.jpg").write_bytes(data[: len(data) // 2] if i % 3 == 1 else data)
    inline, workers = _decoded_epochs(root, 0), _decoded_epochs(root, 2)
    assert len(inline) == len(workers) == 6
    assert sum(count for _, count in inline) == 2 * 4  # 4 truncated files, each met once an epoch
    for (a, count_a), (b, count_b) in zip(inline, workers):
        assert count_a == count_b and torch.equal(a, b)


def test_views_off_the_cpu_are_torchvisions_resize_of_a_gpu_tensor():
    """Off the CPU torch has no uint8 antialiased kernel: torchvision casts each view to float,
    resizes, rounds and casts back. The decoder rounds the whole batch at once: the same values
    (torchvision's float path, run here on CPU tensors)."""
    from torchvision.transforms.v2 import functional as TF

    from moco_d2.pretrain.device_augment import resized_views_unrounded

    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (3, 75, 100), dtype=torch.uint8)
    boxes = [(5, 7, 40, 61), (3, 30, 64, 64), (0, 0, 75, 100)]  # one already at the crop size
    ours = torch.stack(resized_views_unrounded(pixels, boxes, 64)).round_().to(torch.uint8)
    reference = torch.stack(
        [
            TF.resized_crop(pixels.float(), t, left, h, w, [64, 64], antialias=True)
            .round_()
            .to(torch.uint8)
            for t, left, h, w in boxes
        ]
    )
    assert torch.equal(ours, reference)
