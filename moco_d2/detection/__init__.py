"""Detection transfer with Detectron2: everything in moco_d2 that needs detectron2.

``import moco_d2.detection`` is all a Detectron2 script needs, the way ``import point_rend``
is: it applies the detectron2 0.6 compatibility shims (:mod:`.compat`, each a no-op where the
library is already fine), registers ``Res5ROIHeadsExtraNorm`` in ``ROI_HEADS_REGISTRY`` and
registers the Pascal VOC and COCO 2017 splits under ``$DETECTRON2_DATASETS``.
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
