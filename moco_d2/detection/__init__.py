"""Detection transfer with Detectron2: everything in moco_d2 that needs detectron2.

Importing it, as one imports ``point_rend``, is all a Detectron2 script needs: it applies the
detectron2 0.6 shims (:mod:`.compat`), registers ``Res5ROIHeadsExtraNorm`` and the Pascal VOC
and COCO 2017 splits under ``$DETECTRON2_DATASETS``.
"""

import warnings

from moco_d2.detection import compat

# detectron2 0.6 decorates functions with torch.jit.script, deprecated in today's torch.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
    APPLIED_SHIMS = compat.apply()
    from moco_d2.detection import roi_heads  # noqa: E402  (registers Res5ROIHeadsExtraNorm)

    # VOC splits and COCO 2017 train/val under $DETECTRON2_DATASETS
    from moco_d2.detection.data import coco, voc  # noqa: E402

__all__ = ["APPLIED_SHIMS", "coco", "roi_heads", "voc"]
