"""MoCo v1/v2 pretraining with shuffling BatchNorm (no detectron2 needed)."""

from moco_d2.pretrain.moco import MoCo

__all__ = ["MoCo"]
