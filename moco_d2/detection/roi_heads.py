"""The ROI head of the MoCo detection transfer: Detectron2's Res5ROIHeads plus one BN."""

from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with a ``MODEL.RESNETS.NORM`` layer after res5, whose output Detectron2 leaves
    unnormalized, so that the fine-tuned features are normalized like every other stage; being
    part of ``self.res5``, it serves the box predictor and (``MODEL.MASK_ON``) the mask head."""

    @classmethod
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels
