"""The ROI head of the MoCo detection transfer: Detectron2's Res5ROIHeads plus one BN."""

from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with a normalization layer (``MODEL.RESNETS.NORM``) after res5.

    Detectron2's R50-C4 box head ends with the last res5 block, whose output is not
    normalized; the MoCo protocol adds one BN there so that the fine-tuned features are
    normalized like every other stage. The BN is part of ``self.res5``, which
    ``Res5ROIHeads._shared_roi_transform`` applies for the box predictor and, with
    ``MODEL.MASK_ON``, for the mask head too (training and inference).
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels
