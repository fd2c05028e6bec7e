"""Turn a pretrained file into backbone weights, and check they fit the model exactly.

Any file :func:`moco_d2.convert.trunk.read_trunk` accepts: our pretraining checkpoints, those of
the self-supervised releases the converter reads (the same trunk, by the same rules),
torchvision state_dicts, and lincls outputs. Only the trunk is kept, so the loaded model
misses exactly its head (``fc.*``) and BN's batch counters.
"""

import re

import torch

from moco_d2.convert.trunk import Trunk, read_trunk
from moco_d2.errors import UserError

# Left at the model's init on purpose: the classifier head, and BN's batch counter.
_NOT_LOADED = re.compile(r"fc\.(weight|bias)|.*\.num_batches_tracked")


def _listed(keys: set[str], limit: int = 4) -> str:
    ordered = sorted(keys)
    shown = ", ".join(ordered[:limit])
    return f"{shown}, … ({len(ordered)} in all)" if len(ordered) > limit else shown


def load_pretrained(
    model: torch.nn.Module, path: str, arch: str, trunk: Trunk | None = None
) -> dict[str, torch.Tensor]:
    """Load the trunk of ``path`` (``trunk``, when already read) into ``model``; only
    ``fc.*`` may stay missing.

    Raises a :class:`UserError` naming the offending keys (or the arch) otherwise, so a
    checkpoint that does not fit never trains a linear layer on random features.
    """
    trunk = trunk or read_trunk(path)
    if trunk.arch is not None and trunk.arch != arch:
        raise UserError(f"{path} is a {trunk.arch} checkpoint, but -a/--arch is {arch}")
    state = trunk.tensors
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(
                f"{path} does not fit {arch}: {key} has shape {tuple(value.shape)} in the "
                f"checkpoint, {tuple(own[key].shape)} in the model (a checkpoint of another arch?)"
            )
    missing = {k for k in own if k not in state and not _NOT_LOADED.fullmatch(k)}
    unexpected = set(state) - set(own)
    if missing or unexpected:
        problems = [f"missing {_listed(missing)}"] if missing else []
        problems += [f"unexpected {_listed(unexpected)}"] if unexpected else []
        raise UserError(
            f"{path} ({trunk.format}) does not fit {arch}: {'; '.join(problems)} "
            "(only fc.weight and fc.bias may be missing)"
        )
    model.load_state_dict(state, strict=False)
    return state


def _differing(model: torch.nn.Module, pretrained: dict[str, torch.Tensor]) -> set[str]:
    current = model.state_dict()
    return {k for k, v in pretrained.items() if not torch.equal(current[k].cpu(), v)}


def check_backbone_unchanged(model: torch.nn.Module, path: str, choice: str | None = None) -> None:
    """Compare every trunk tensor (BN running stats too) with the file's (its ``--trunk``
    ``choice``): the freeze worked."""
    changed = _differing(model, read_trunk(path, choice).tensors)
    if changed:
        raise RuntimeError(
            f"backbone changed during linear classification: {_listed(changed)}; "
            "the freeze is broken"
        )


def check_resumed_backbone(
    model: torch.nn.Module, pretrained: dict[str, torch.Tensor], resume: str, path: str
) -> None:
    """A resumed classifier must sit on the ``--pretrained`` trunk it was trained on: checked
    when it loads, not by the sanity check after training."""
    differ = _differing(model, pretrained)
    if differ:
        raise UserError(
            f"--resume {resume} was trained on other pretrained weights than --pretrained "
            f"{path}: trunk tensors differ ({_listed(differ)}); "
            "resume with the --pretrained of that run, or start a new --output-dir"
        )
