"""ImageFolder train/ and val/ splits with the linear-classification transforms of the
released main_lincls.py.

Both splits are :class:`~moco_d2.pretrain.data.TolerantImageFolder`: items are
``(image, target, skipped)``, and a folder with no readable image is refused before launch.
Train uses the replacement as pretraining does (an unreadable image becomes the next readable
one, logged and counted). Val must not: a replacement would count another image twice, so an
item with ``skipped > 0`` stands for an unreadable image and is left out of top-1/top-5.
"""

import os

import torchvision.transforms as T

from moco_d2.convert.layouts import IMAGENET, INPUT_NORMS
from moco_d2.errors import UserError
from moco_d2.pretrain.data import TolerantImageFolder

NOT_AN_IMAGE_FOLDER = "is not an ImageFolder (one sub-folder of images per class)"


def normalize(input_norm: str = IMAGENET) -> T.Normalize:
    """The input the pretrained weights expect (ImageNet mean/std unless they say otherwise)."""
    return T.Normalize(mean=INPUT_NORMS[input_norm]["mean"], std=INPUT_NORMS[input_norm]["std"])


def train_transform(crop_size: int = 224, input_norm: str = IMAGENET) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(crop_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize(input_norm),
        ]
    )


def val_transform(crop_size: int = 224, resize: int = 256, input_norm: str = IMAGENET) -> T.Compose:
    return T.Compose(
        [T.Resize(resize), T.CenterCrop(crop_size), T.ToTensor(), normalize(input_norm)]
    )


def _image_folder(root: str, split: str, transform: T.Compose) -> TolerantImageFolder:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(
            f"{path} is not a folder: the data dir must hold train/ and val/, "
            "one sub-folder per class"
        )
    # A classifier needs labels: unlike pretraining, loose images without class folders are
    # not one class.
    if not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(path)):
        raise UserError(f"{path} {NOT_AN_IMAGE_FOLDER}: no class folders in it")
    folder = TolerantImageFolder(path, transform)
    present = set(folder.targets)
    empty = [c for i, c in enumerate(folder.classes) if i not in present]
    if empty:
        raise UserError(f"{path} {NOT_AN_IMAGE_FOLDER}: no images in {', '.join(empty[:3])}")
    return folder


def build_datasets(
    root: str, crop_size: int = 224, resize: int = 256, input_norm: str = IMAGENET
) -> tuple[TolerantImageFolder, TolerantImageFolder]:
    """(train, val) folders; both must have the same classes, so label i means one thing."""
    if not os.path.isdir(root):
        raise UserError(f"data dir not found: {root}")
    train = _image_folder(root, "train", train_transform(crop_size, input_norm))
    val = _image_folder(root, "val", val_transform(crop_size, resize, input_norm))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise UserError(
            f"train/ and val/ of {root} have different classes (e.g. {', '.join(only[:3])})"
        )
    return train, val
