"""Shared by the COCO tests: the synthetic COCO tree and the overrides that let Mask R-CNN
R50-C4 run on a CPU (TINY_OPTS plus an untrained model's scores kept for evaluation)."""

from transfer_tiny import TINY_OPTS

import moco_d2.detection  # noqa: F401  (compat shims and registrations before detectron2)
from moco_d2.detection.data.synthetic_coco import make_synthetic_coco

# A few iterations leave every class score near 1/81, under the default 0.05 threshold;
# keeping them gives COCOeval detections to score, so every AP is defined.
COCO_TINY_OPTS = [*TINY_OPTS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]

__all__ = ["COCO_TINY_OPTS", "make_synthetic_coco"]
