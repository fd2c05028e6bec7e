"""Numerical health of a pretraining run: refuse degenerate BatchNorm groups at start, stop when
weights or BN statistics explode.

The InfoNCE loss stays finite even when the encoder blows up, because the features are
L2-normalised; a finite loss therefore says little. With 2 images per BN group and a 1×1 last
stage, a ResNet-50 was seen to end one epoch with a stem conv std of 1.6e7 (0.025 at init) and
BN running_var up to 3.7e27 while its loss looked normal.
"""

from collections.abc import Callable

import torch
from torch import nn

from moco_d2.errors import UserError
from moco_d2.training import health
from moco_d2.training.health import MAX_NORM_RATIO, MAX_RUNNING_VAR

# A BN channel normalised over m values keeps only m-1 degrees of freedom (m=2: just a sign).
MIN_BN_VALUES = 16


class TrainingDiverged(UserError):
    """The loss, weights or BN statistics blew up: stopping beats writing garbage for days."""


def last_stage_positions(base_encoder: Callable[..., nn.Module], crop_size: int) -> int:
    """Fewest spatial positions any BatchNorm of ``base_encoder`` sees at ``crop_size`` (the
    last stage, res5 in a ResNet), from shapes only: the model is built on the meta device."""
    sizes = []
    with torch.device("meta"):
        encoder = base_encoder(num_classes=1).eval()
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-2] * out.shape[-1]))
            for m in encoder.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        encoder(torch.empty(1, 3, crop_size, crop_size))
    for hook in hooks:
        hook.remove()
    return min(sizes) if sizes else MIN_BN_VALUES


def check_bn_groups(images_per_group: int, positions: int, bn_splits: int, crop_size: int) -> None:
    """UserError when a BN group would normalise fewer than MIN_BN_VALUES values per channel."""
    values = images_per_group * positions
    if values < MIN_BN_VALUES:
        fewer = f", or fewer --bn-splits (now {bn_splits})" if bn_splits > 1 else ""
        raise UserError(
            f"BatchNorm groups too small: {images_per_group} images per group x {positions} "
            f"last-stage positions at --crop-size {crop_size} = {values} values per channel "
            f"(need >= {MIN_BN_VALUES}); use a larger --crop-size or a larger -b{fewer}"
        )


class HealthMonitor(health.HealthMonitor):
    """Bounds on the query encoder's weights and every BN running_var of ``model``.

    Built on the freshly initialised model, so the reference norms are those of a new run
    even after a resume.
    """

    def __init__(self, model: nn.Module, encoder: nn.Module) -> None:
        super().__init__(model, encoder.parameters())

    def check(self, where: str) -> dict:
        """Raise TrainingDiverged past a bound (on any rank); else return the norms to log."""
        reading = self.measure()
        if reading.problem():
            raise TrainingDiverged(
                f"weights exploded {where}: a layer's norm reached {reading.ratio:.3g}x its "
                f"initial value (bound {MAX_NORM_RATIO:g}), BN running_var {reading.var:.3g} "
                f"(bound {MAX_RUNNING_VAR:g}); lower --lr or use larger BatchNorm groups "
                "(--crop-size, -b, --bn-splits); the last checkpoint is intact"
            )
        return {"param_norm": reading.param_norm, "grad_norm": reading.grad_norm}
