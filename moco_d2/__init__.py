"""MoCo v2 pretraining, conversion and Detectron2 transfer evaluation.

Importing the package makes detectron2 0.6 work with today's libraries (:mod:`moco_d2.compat`)
and registers this project's Detectron2 components. The pretraining subpackage does not need
detectron2, so it stays importable where detectron2 is not installed.
"""

__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ModuleNotFoundError:
    HAS_DETECTRON2 = False
    APPLIED_SHIMS = []
else:
    import warnings

    HAS_DETECTRON2 = True
    from moco_d2 import compat

    # detectron2 0.6 decorates functions with torch.jit.script, deprecated in today's torch.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
        APPLIED_SHIMS = compat.apply()
        from moco_d2 import modeling  # noqa: F401,E402  (registers Res5ROIHeadsExtraNorm)
        from moco_d2.data import voc  # noqa: F401,E402  (VOC splits under $DETECTRON2_DATASETS)
