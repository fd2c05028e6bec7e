"""Overrides that make R50-C4 cheap enough for a CPU in the transfer tests (small images, few
ROIs and proposals, 2 precise-BN iterations); the fixtures are in conftest.py."""

import moco_d2.detection  # noqa: F401  (compat shims and registrations before detectron2)

TINY_OPTS = [
    "MODEL.DEVICE",
    "cpu",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "16",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "16",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "16",
    "TEST.PRECISE_BN.NUM_ITER",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.STEPS",
    "()",
]
