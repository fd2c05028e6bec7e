"""Image folders for pretraining: a tolerant ImageFolder and the run's loader.

A corrupt or unreadable image never stops a multi-day run: it is replaced by the next readable
image of the folder (so the epoch keeps its length and the order stays deterministic), logged
with its path, and counted in the sample so the training loop reports the total per epoch.

Seeding rule: item ``index`` of epoch ``epoch`` is loaded and augmented with Python's, NumPy's
and torch's CPU generators seeded from ``SeedSequence([seed, epoch, index])``
(:class:`SeededItems`). An item is then the same whichever worker loads it, whatever ``-j``, and
whether or not the workers were restarted, which is what lets :class:`EpochLoader` keep one set
of workers for the whole run and still resume bit-identically.
"""

import contextlib
import itertools
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS

from moco_d2.errors import UserError

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_UNREADABLE = 100


def resolve_train_dir(data: str) -> str:
    """The released tool reads ``DATA/train``; a folder without ``train/`` is used as it is."""
    if not os.path.isdir(data):
        raise UserError(f"data folder not found: {data}")
    train = os.path.join(data, "train")
    return train if os.path.isdir(train) else data


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)``: ``[(path, class_index)]`` from class subfolders, or from the
    images directly in ``root`` (one class) when it has no class subfolders."""
    if not os.path.isdir(root):
        raise UserError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    folders = [(os.path.join(root, c), i) for i, c in enumerate(classes)] or [(root, 0)]
    samples: list[tuple[str, int]] = []
    for folder, index in folders:
        for dirpath, dirnames, filenames in sorted(os.walk(folder, followlinks=True)):
            dirnames.sort()
            samples.extend(
                (os.path.join(dirpath, f), index)
                for f in sorted(filenames)
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
            )
    if not samples:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) found under {root}")
    return samples, classes or [os.path.basename(os.path.normpath(root))]


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def check_some_readable(
    samples: Sequence[tuple[str, int]], root: str, tries: int = MAX_CONSECUTIVE_UNREADABLE
) -> None:
    """Refuse a folder whose images cannot be decoded, before any process or worker starts.

    Opens files spread over the folder until one decodes (the first, for a healthy folder);
    reading stops the run only when none of ``tries`` files does.
    """
    step = max(len(samples) // tries, 1)
    for path, _ in samples[::step][:tries]:
        try:
            load_rgb(path)
            return
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    raise UserError(
        f"no readable image under {root}: none of the {min(len(samples), tries)} files "
        f"tried decodes (e.g. {samples[0][0]})"
    )


class TolerantImageFolder(Dataset):
    """ImageFolder whose items are ``(transform(load(path)), target, unreadable)``.

    ``unreadable`` counts the files skipped to produce this item (0 almost always). ``load``
    reads one file (default: decode to RGB); ``--augment-on device`` passes one that decodes
    and crops in one go.
    """

    def __init__(
        self, root: str, transform: Callable | None = None, load: Callable[[str], Any] = load_rgb
    ) -> None:
        self.root = root
        self.samples, self.classes = scan_image_folder(root)
        check_some_readable(self.samples, root)
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.load = load

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.first_readable(index, self.load)

    def first_readable(self, start: int, load: Callable[[str], Any]) -> tuple[Any, int, int]:
        """``(transform(load(path)), target, skipped)`` of the first file from ``start`` on
        (wrapping around) that ``load`` reads."""
        for skipped in range(min(MAX_CONSECUTIVE_UNREADABLE, len(self.samples))):
            path, target = self.samples[(start + skipped) % len(self.samples)]
            try:
                image = load(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                logger.warning("unreadable image skipped: %s (%s)", path, e)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target, skipped
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_UNREADABLE} consecutive unreadable images from "
            f"{self.samples[start % len(self.samples)][0]}: is {self.root} an image folder?"
        )

    def replacement(self, file: int, seed: int, load: Callable[[str], Any]) -> tuple[Any, int]:
        """What replaces file ``file`` when it proves unreadable only after its item was made
        (``--decode-on device``): the first file after it that ``load`` reads, made with the host
        generators seeded from the item's ``seed`` (restored afterwards, so the caller's own
        random stream is unchanged), and how many files were skipped on the way."""
        with _host_rng_kept():
            seed_host_generators(seed)
            image, _, skipped = self.first_readable(file + 1, load)
        return image, skipped


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit seed of one item of one epoch (see the module's seeding rule)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


def seed_host_generators(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generators (not the accelerator's) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def _host_rng_kept():
    """Restore Python's, NumPy's and torch's CPU generators afterwards: with ``-j 0`` items load
    in the training process, whose own random stream (key shuffle, device augmentation on CPU)
    must not depend on them."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededItems(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: each item is made with the host generators
    seeded from :func:`item_seed` (torchvision transforms and the crop draw from them)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        in_workers = get_worker_info() is not None
        with contextlib.nullcontext() if in_workers else _host_rng_kept():
            seed_host_generators(item_seed(self.seed, epoch, index))
            return self.dataset[index]


class EpochBatchSampler(Sampler[list]):
    """Batches of ``(epoch, index)`` for each epoch of ``epochs`` in turn: ``sampler`` (a
    DistributedSampler) gives each epoch's order, an epoch's last partial batch is dropped, and
    no batch spans two epochs."""

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.epochs = range(0)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def __len__(self):
        return len(self.epochs) * self.steps_per_epoch

    def __iter__(self):
        for epoch in self.epochs:
            self.sampler.set_epoch(epoch)
            indices = iter(self.sampler)
            for _ in range(self.steps_per_epoch):
                yield [(epoch, next(indices)) for _ in range(self.batch_size)]


class _EpochBatches:
    """One epoch's batches taken from a longer iterator (sized, for progress and logs)."""

    def __init__(self, batches: Iterator, steps: int) -> None:
        self.batches = batches
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return itertools.islice(self.batches, self.steps)


class EpochLoader:
    """The training batches, epoch by epoch, from one DataLoader.

    ``across_epochs`` (the default): one DataLoader iterator serves every epoch from the first
    one asked for up to ``epochs``, so the workers start once and keep prefetching across epoch
    boundaries. Off: a new iterator, and new workers, every epoch, as the released code does.
    Either way items follow the seeding rule of :class:`SeededItems`, so both give the same
    batches.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: DistributedSampler,
        batch_size: int,
        seed: int,
        epochs: int,
        workers: int,
        pin_memory: bool = False,
        collate_fn: Callable | None = None,
        across_epochs: bool = True,
    ) -> None:
        self.batches = EpochBatchSampler(sampler, batch_size)
        self.epochs = epochs
        self.across_epochs = across_epochs
        self.loader = DataLoader(
            SeededItems(dataset, seed),
            batch_sampler=self.batches,
            num_workers=workers,
            pin_memory=pin_memory,
            collate_fn=collate_fn,
            # the workers' base seeds come from here, not from the training process's generator
            generator=torch.Generator().manual_seed(seed),
        )
        self._iterator: Iterator[Any] | None = None
        self._next_epoch: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def epoch(self, epoch: int) -> _EpochBatches:
        """The batches of ``epoch``; with ``across_epochs``, call it for consecutive epochs."""
        if not self.across_epochs or self._iterator is None or epoch != self._next_epoch:
            last = self.epochs if self.across_epochs else epoch + 1
            self.batches.epochs = range(epoch, max(last, epoch + 1))
            self._iterator = iter(self.loader)
        self._next_epoch = epoch + 1
        return _EpochBatches(self._iterator, self.steps_per_epoch)
