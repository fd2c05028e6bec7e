"""ImageFolder train/ and val/ splits with the linear-classification transforms of the
released main_lincls.py."""

import os

import torchvision.datasets as datasets
import torchvision.transforms as T

from moco_d2.errors import UserError
from moco_d2.training.constants import IMAGENET_MEAN, IMAGENET_STD

NORMALIZE = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def train_transform(crop_size: int = 224) -> T.Compose:
    return T.Compose(
        [T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(), T.ToTensor(), NORMALIZE]
    )


def val_transform(crop_size: int = 224, resize: int = 256) -> T.Compose:
    return T.Compose([T.Resize(resize), T.CenterCrop(crop_size), T.ToTensor(), NORMALIZE])


def _image_folder(root: str, split: str, transform: T.Compose) -> datasets.ImageFolder:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(
            f"{path} is not a folder: the data dir must hold train/ and val/, "
            "one sub-folder per class"
        )
    try:
        return datasets.ImageFolder(path, transform)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        reason = str(e).strip().splitlines()[0]
        raise UserError(
            f"{path} is not an ImageFolder (one sub-folder of images per class): {reason}"
        ) from None


def build_datasets(
    root: str, crop_size: int = 224, resize: int = 256
) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """(train, val) ImageFolders; both must have the same classes, so label i means one thing."""
    if not os.path.isdir(root):
        raise UserError(f"data dir not found: {root}")
    train = _image_folder(root, "train", train_transform(crop_size))
    val = _image_folder(root, "val", val_transform(crop_size, resize))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise UserError(
            f"train/ and val/ of {root} have different classes (e.g. {', '.join(only[:3])})"
        )
    return train, val
