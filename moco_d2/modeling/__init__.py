"""Detectron2 model components of the MoCo detection transfer, registered on import."""

from moco_d2.modeling.roi_heads import Res5ROIHeadsExtraNorm

__all__ = ["Res5ROIHeadsExtraNorm"]
