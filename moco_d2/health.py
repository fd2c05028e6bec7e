"""Bounds on a training model's weights and BatchNorm statistics: finite is not healthy.

A loss can stay finite while the model blows up (MoCo's features are L2-normalised; a detector
at a huge learning rate reports a loss of 1e5 and writes weights of 1e7), so the weights and
the BN running variances are bounded, against the run's start and in absolute terms. The whole
check is one device tensor, read with one host sync (and one all-reduce when distributed).

The weight bound is per layer: the norm of one module's parameters together (a conv's weight;
a BN's or a head's weight and bias) against that norm at the start, or against
``LAYER_RMS_FLOOR`` per element where that is larger. Per tensor, a bias that starts at zero
has no scale: a detector resumed after one step holds biases of norm near 1e-7, which its next
ordinary step multiplied by some 2e3, past the bound, where a fresh run skipped the same biases
at exactly zero. In its layer the weight sets the scale (kaiming; std 0.01 or 0.001 in the
detector's heads; 1 in a BN), so the ratio grows only when the layer does, fresh or resumed
(1.3 after that step). The floor gives a layer that starts all zero a reference.
"""

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from moco_d2.errors import TrainingDiverged

# Bounds for a run that went wrong: far beyond what weight decay and BN let a sane run reach.
MAX_NORM_RATIO = 1e3
MAX_RUNNING_VAR = 1e8
# The reference per element of a layer whose parameters start (nearly) all zero: the smallest
# init std of a layer in the project's models (the detector's bbox_pred, 0.001).
LAYER_RMS_FLOOR = 1e-3


def norms(tensors: list) -> torch.Tensor:
    """Per-tensor L2 norms as one device tensor (no host sync)."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(tensors))


@dataclasses.dataclass(frozen=True)
class Health:
    """One reading of :class:`HealthMonitor`, the maximum over every process."""

    ratio: float  # largest norm / reference norm of a layer's parameters
    var: float  # largest BN running_var
    non_finite: bool  # a weight or a BN running_var is NaN or infinite
    param_norm: float
    grad_norm: float

    def problem(self) -> str | None:
        """Which bound was crossed, in words; None for a healthy model."""
        if self.non_finite:
            return "a weight or a BN running_var became NaN or infinite"
        if self.ratio > MAX_NORM_RATIO:
            return (
                f"a layer's norm reached {self.ratio:.3g}x its value at the start (bound "
                f"{MAX_NORM_RATIO:.3g})"
            )
        if self.var > MAX_RUNNING_VAR:
            return f"BN running_var reached {self.var:.3g} (bound {MAX_RUNNING_VAR:.3g})"
        return None


class HealthMonitor:
    """Norm ratios of the layers of ``params`` (default: the trainable parameters of ``model``)
    against their norms when the monitor is built, and every BN running_var of ``model``."""

    def __init__(self, model: nn.Module, params=None) -> None:
        params = model.parameters() if params is None else params
        self.params = [p for p in params if p.requires_grad]
        owner = {
            id(p): i for i, m in enumerate(model.modules()) for p in m.parameters(recurse=False)
        }
        index: dict[int, int] = {}  # owning module (or the tensor alone, if none) -> layer number
        layer = [
            index.setdefault(owner.get(id(p), -1 - k), len(index))
            for k, p in enumerate(self.params)
        ]
        start = norms([p.detach() for p in self.params])
        self.layer = torch.tensor(layer, dtype=torch.long, device=start.device)
        self.num_layers = len(index)
        numel = torch.tensor([float(p.numel()) for p in self.params], device=start.device)
        floor = LAYER_RMS_FLOOR * self._by_layer(numel.sqrt())
        self.reference = torch.maximum(self._by_layer(start), floor)
        self.running_vars = [
            m.running_var
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None
        ]

    def _by_layer(self, tensor_norms: torch.Tensor) -> torch.Tensor:
        """The norm of each layer's parameters together, from the norm of each tensor."""
        squares = torch.zeros(self.num_layers, dtype=tensor_norms.dtype, device=tensor_norms.device)
        return squares.index_add_(0, self.layer, tensor_norms.square()).sqrt()

    def summary(self) -> torch.Tensor:
        """Device tensor ``[max layer norm ratio, max running_var, non-finite flag, param norm,
        grad norm]``."""
        current = norms([p.detach() for p in self.params])
        zero = torch.zeros((), device=current.device)
        ratio = self._by_layer(current) / self.reference
        max_ratio = ratio.max() if ratio.numel() else zero
        vars_ = [v.detach().flatten() for v in self.running_vars]
        var = torch.cat(vars_).max().to(zero.device) if vars_ else zero
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        grad_norm = norms(grads).norm().to(zero.device) if grads else zero
        param_norm = current.norm()
        bad = (~torch.isfinite(param_norm) | ~torch.isfinite(var)).float()
        return torch.stack([max_ratio, var, bad, param_norm, grad_norm])

    def measure(self) -> Health:
        """The summary, agreed by every process (all-reduce MAX), read with one host sync."""
        values = self.summary().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        ratio, var, bad, param_norm, grad_norm = values.tolist()
        return Health(ratio, var, bool(bad), param_norm, grad_norm)

    def check(self, where: str, advice: str) -> dict[str, float]:
        """Raise :class:`TrainingDiverged` (on every rank alike) past a bound; else return the
        norms to log. ``advice`` says what to change, in the tool's own flags."""
        reading = self.measure()
        problem = reading.problem()
        if problem:
            raise TrainingDiverged(
                f"weights exploded {where}: {problem}; {advice}; the last checkpoint is intact"
            )
        return {"param_norm": reading.param_norm, "grad_norm": reading.grad_norm}
