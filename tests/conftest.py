"""Fixtures shared by the tests: a tiny synthetic VOC tree and converted ResNet-50 weights.

detectron2 is imported inside the fixtures, so tests of the detectron2-free subpackages
never load it.
"""

import pytest


@pytest.fixture(scope="session")
def synthetic_voc_root(tmp_path_factory):
    from moco_d2.detection.data.synthetic import make_synthetic_voc

    root = tmp_path_factory.mktemp("voc")
    make_synthetic_voc(root, num_train=8, num_test=4, image_size=64, seed=0)
    return root


@pytest.fixture
def registered_voc(synthetic_voc_root):
    """The protocol's VOC names pointed at the synthetic tree, then back at the default."""
    from moco_d2.detection.data.voc import register_all_voc

    register_all_voc(str(synthetic_voc_root))
    yield synthetic_voc_root
    register_all_voc()


@pytest.fixture(scope="session")
def converted_weights(tmp_path_factory):
    """A torchvision ResNet-50 state_dict (random init) through the project's converter."""
    import torch
    import torchvision

    from moco_d2.convert import tool

    d = tmp_path_factory.mktemp("weights")
    torch.save(torchvision.models.resnet50().state_dict(), d / "resnet50.pth")
    tool.main([str(d / "resnet50.pth"), str(d / "converted.pkl")])
    return d / "converted.pkl"
