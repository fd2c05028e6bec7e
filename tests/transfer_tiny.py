"""Shared by the transfer tests: a tiny synthetic VOC tree and overrides that make R50-C4
cheap enough for a CPU (small images, few ROIs and proposals, 2 precise-BN iterations)."""

import pytest

import moco_d2  # noqa: F401  (compat shims before any detectron2 import)
from moco_d2.data.synthetic import make_synthetic_voc
from moco_d2.data.voc import register_all_voc

TINY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "16",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "16",
    "TEST.PRECISE_BN.NUM_ITER", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(1000,)",
]


@pytest.fixture(scope="session")
def synthetic_voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_synthetic_voc(root, num_train=8, num_test=4, image_size=64, seed=0)
    return root


@pytest.fixture
def registered_voc(synthetic_voc_root):
    """The protocol's VOC names pointed at the synthetic tree, then back at the default."""
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
