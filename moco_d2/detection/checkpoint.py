"""Loading weights into a Detectron2 model without silently leaving the backbone random.

Detectron2 only logs a warning for model tensors a checkpoint does not provide, so a wrong
file trains a half-random backbone. Here any ResNet trunk tensor left unloaded is an error.
"""

import os
import re

from detectron2.checkpoint import DetectionCheckpointer

from moco_d2.errors import UserError

# ResNet trunk tensors wherever the model nests them: ``backbone.stem.*``,
# ``backbone.res2.0.*`` ... and, in R50-C4, ``roi_heads.res5.0.*`` (res5 is the box head).
# The extra ``roi_heads.res5.norm`` of Res5ROIHeadsExtraNorm is new, not pretrained.
_TRUNK = re.compile(r"(?:^|\.)(?:stem|res[2-5]\.\d+)\.")
_SHOWN = 5


def trunk_names(names):
    """Those of ``names`` (model state_dict keys) that belong to the pretrained ResNet trunk."""
    return [n for n in names if _TRUNK.search(n)]


class BackboneCheckingCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose ``load`` raises :class:`UserError` when a
    checkpoint leaves any backbone (trunk) tensor of the model unloaded or a file is missing.

    A drop-in replacement, e.g. for ``DefaultTrainer.checkpointer``: ``resume_or_load`` goes
    through ``load`` too.
    """

    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise UserError(
                f"weights file not found: {path} (convert a pretraining checkpoint "
                'with tools/convert-to-d2.py; MODEL.WEIGHTS "" means random init)'
            )
        self._path = path
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        missing = trunk_names(incompatible.missing_keys)
        if missing:
            shown = ", ".join(missing[:_SHOWN]) + (", …" if len(missing) > _SHOWN else "")
            raise UserError(
                f"{self._path} left {len(missing)} backbone tensors of the model unloaded "
                f"(missing, or of another shape, in the file): {shown}; convert pretraining "
                "checkpoints with tools/convert-to-d2.py and check MODEL.RESNETS (DEPTH 50, "
                "STRIDE_IN_1X1 False)"
            )
        self.not_loaded = list(incompatible.missing_keys)
        return incompatible


def load_detectron2_weights(model, path):
    """Load ``path`` (e.g. MODEL.WEIGHTS) into ``model``; return the names left at init.

    Every ResNet trunk tensor must come from the file (else :class:`UserError`); the
    detection heads and the extra res5 norm are expected to stay at init. An empty
    ``path`` loads nothing, on purpose: training from random initialization.
    """
    checkpointer = BackboneCheckingCheckpointer(model)
    if not path:
        return sorted(checkpointer.model.state_dict())  # the model without its DDP wrapper
    checkpointer.load(path)
    return checkpointer.not_loaded
