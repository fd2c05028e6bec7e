"""kNN monitor: the weighted vote against a hand computation, and a run on a labelled folder."""

import math

import pytest
import torch
import torchvision

from moco_d2.errors import UserError
from moco_d2.pretrain.knn import KNNMonitor, knn_predict
from moco_d2.synthetic import make_synthetic_image_folder


def test_weighted_vote_matches_hand_computation():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[0.6, 0.8]])
    # k=3 nearest: bank 1 (0.96, class 1), bank 2 (0.8, class 1), bank 0 (0.6, class 0)
    t = 0.1
    votes = {0: math.exp(0.6 / t), 1: math.exp(0.96 / t) + math.exp(0.8 / t)}
    assert knn_predict(query, bank, labels, 2, k=3, t=t).item() == max(votes, key=votes.get)
    # one neighbour of class 0 that is very close beats two far ones of class 1 only when k is small
    bank2 = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    assert knn_predict(query, bank2, torch.tensor([0, 1, 1]), 2, k=1, t=t).item() == 0
    assert knn_predict(query, bank2, torch.tensor([0, 1, 1]), 2, k=3, t=10.0).item() == 1


def test_monitor_runs_on_a_labelled_folder(tmp_path):
    make_synthetic_image_folder(
        str(tmp_path / "train"), num_images=8, size=24, seed=0, num_classes=2
    )
    make_synthetic_image_folder(str(tmp_path / "val"), num_images=4, size=24, seed=1, num_classes=2)
    monitor = KNNMonitor(str(tmp_path), crop_size=16, batch_size=4, k=3)
    encoder = torchvision.models.resnet18(num_classes=8)
    encoder.train()
    top1 = monitor.evaluate(encoder, torch.device("cpu"))
    assert top1 in (0.0, 25.0, 50.0, 75.0, 100.0) and encoder.training
    with pytest.raises(UserError, match="expected labelled folders"):
        KNNMonitor(str(tmp_path / "train"))
