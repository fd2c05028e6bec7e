"""The pretraining loader: every item is made from its own seed (run seed, epoch, index), so the
workers that load it, their number, keeping them across epochs and resuming change nothing."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from moco_d2.pretrain.augment import TwoCropsTransform, moco_augmentation
from moco_d2.pretrain.data import EpochLoader, TolerantImageFolder, item_seed
from moco_d2.synthetic import make_synthetic_image_folder

SEED, BATCH, EPOCHS = 5, 4, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_synthetic_image_folder(
        str(tmp_path_factory.mktemp("loader")), num_images=10, size=32, seed=0, num_classes=2
    )
    return TolerantImageFolder(root, TwoCropsTransform(moco_augmentation(True, 16)))


def _sampler(dataset):
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=SEED)


def _run(dataset, workers, across_epochs, start=0):
    loader = EpochLoader(
        dataset, _sampler(dataset), BATCH, SEED, EPOCHS, workers, across_epochs=across_epochs
    )
    return {
        epoch: [torch.cat(views) for views, _, _ in loader.epoch(epoch)]
        for epoch in range(start, EPOCHS)
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for epoch in a:
        assert len(a[epoch]) == len(b[epoch]) == 10 // BATCH  # the partial batch is dropped
        for x, y in zip(a[epoch], b[epoch]):
            assert torch.equal(x, y), epoch


def test_kept_workers_give_the_batches_of_restarted_ones_and_of_no_workers(dataset):
    kept = _run(dataset, workers=2, across_epochs=True)
    _assert_same(kept, _run(dataset, workers=0, across_epochs=False))
    _assert_same(kept, _run(dataset, workers=3, across_epochs=False))
    assert not torch.equal(kept[0][0], kept[1][0])  # a new order and new views every epoch


def test_resuming_at_an_epoch_gives_that_epochs_batches(dataset):
    full = _run(dataset, workers=2, across_epochs=True)
    resumed = _run(dataset, workers=2, across_epochs=True, start=2)
    _assert_same({2: full[2]}, resumed)


def test_an_item_is_the_dataset_item_under_its_own_seed(dataset):
    """Independent check of the seeding rule: seed the three host generators by hand."""
    epoch = 1
    sampler = _sampler(dataset)
    sampler.set_epoch(epoch)
    first = list(sampler)[:BATCH]
    views = []
    for index in first:
        seed = int(np.random.SeedSequence([SEED, epoch, index]).generate_state(1, np.uint64)[0])
        assert seed == item_seed(SEED, epoch, index)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        views.append(dataset[index][0])
    expected = torch.cat([torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])])
    assert torch.equal(_run(dataset, workers=0, across_epochs=False)[epoch][0], expected)


def test_loading_in_the_training_process_leaves_its_generators_alone(dataset):
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    _run(dataset, workers=0, across_epochs=True)
    after = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    assert after == (torch.rand(1), random.random(), np.random.rand())
