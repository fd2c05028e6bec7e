"""Image folders: synthetic generator, corrupt images skipped and counted, bad folders refused."""

import logging

import pytest
from PIL import Image

from moco_d2.errors import UserError
from moco_d2.pretrain.data import TolerantImageFolder, resolve_train_dir
from moco_d2.synthetic import make_synthetic_image_folder


def test_synthetic_folder_writes_real_images(tmp_path):
    root = make_synthetic_image_folder(
        str(tmp_path / "train"), num_images=12, size=24, seed=3, num_classes=3
    )
    files = sorted((tmp_path / "train").rglob("*.jpg"))
    assert len(files) == 12 and len({f.parent.name for f in files}) == 3
    with Image.open(files[0]) as im:
        assert im.size == (24, 24) and im.mode == "RGB"
    again = tmp_path / "again"
    make_synthetic_image_folder(str(again), num_images=12, size=24, seed=3, num_classes=3)
    assert (again / files[5].relative_to(tmp_path / "train")).read_bytes() == files[5].read_bytes()
    ds = TolerantImageFolder(root)
    assert len(ds) == 12 and len(ds.classes) == 3 and sorted(set(ds.targets)) == [0, 1, 2]


def test_corrupt_images_are_replaced_logged_and_counted(tmp_path, caplog):
    root = tmp_path / "data"
    make_synthetic_image_folder(str(root), num_images=6, size=16, seed=0, num_classes=2)
    files = sorted(root.rglob("*.jpg"))
    truncated, garbage = files[1], files[2]
    truncated.write_bytes(truncated.read_bytes()[:60])
    garbage.write_bytes(b"this is not a jpeg")
    ds = TolerantImageFolder(str(root))
    assert len(ds) == 6  # the epoch keeps its length
    paths = [p for p, _ in ds.samples]
    i = paths.index(str(truncated))
    with caplog.at_level(logging.WARNING, logger="moco_d2.pretrain.data"):
        image, target, skipped = ds[i]
    assert skipped == 2 and image.size == (16, 16)
    assert target == ds.samples[i + 2][1]  # the next readable image, with its own label
    assert str(truncated) in caplog.text and str(garbage) in caplog.text
    assert ds[0][2] == 0


def test_all_unreadable_raises(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").write_bytes(b"nope")
    with pytest.raises(UserError, match=f"no readable image under {tmp_path}"):
        TolerantImageFolder(str(tmp_path))


def test_flat_folder_and_bad_folders(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    assert len(TolerantImageFolder(str(flat))) == 1
    with pytest.raises(UserError, match="not found"):
        resolve_train_dir(str(tmp_path / "missing"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        TolerantImageFolder(str(tmp_path / "empty"))
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    assert resolve_train_dir(str(tmp_path / "imagenet")) == str(tmp_path / "imagenet" / "train")
