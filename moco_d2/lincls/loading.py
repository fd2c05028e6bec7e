"""Turn a pretrained file into backbone weights, and check they fit the model exactly.

Accepted: our pretraining checkpoints and the released MoCo ones (``module.encoder_q.*``),
the same without ``module.``, and plain torchvision state_dicts (optionally ``module.``).
The classifier head (``fc.*``: the MoCo projection head, or an ImageNet classifier) is
dropped, so that the loaded model misses exactly ``fc.weight`` and ``fc.bias``.
"""

import torch

from moco_d2.errors import UserError
from moco_d2.training.checkpoint import load_checkpoint

HEAD_KEYS = frozenset({"fc.weight", "fc.bias"})
_QUERY_PREFIXES = ("module.encoder_q.", "encoder_q.")


def _state_dict_of(checkpoint, path):
    state = checkpoint.get("state_dict", checkpoint)
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    ):
        raise UserError(
            f"{path} holds no state_dict of tensors (expected a MoCo or torchvision checkpoint)"
        )
    return state


def backbone_state(checkpoint, path="checkpoint"):
    """The backbone weights of ``checkpoint``: query encoder only, prefix stripped, head dropped."""
    state = _state_dict_of(checkpoint, path)
    prefix = next((p for p in _QUERY_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:  # a plain (possibly DDP-wrapped) torchvision state_dict
        prefix = "module." if all(k.startswith("module.") for k in state) else ""
    backbone = {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("fc.")
    }
    if not backbone:
        raise UserError(f"{path} has no backbone weights (only a head?)")
    return backbone


def checkpoint_arch(checkpoint):
    """The ``arch`` recorded in a MoCo checkpoint, or None for a bare state_dict."""
    arch = checkpoint.get("arch")
    return arch if isinstance(arch, str) else None


def _listed(keys, limit=4):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, … ({len(keys)} in all)" if len(keys) > limit else shown


def load_pretrained(model, path, arch):
    """Load the backbone of ``path`` into ``model``; only ``fc.*`` may stay missing.

    Raises a :class:`UserError` naming the offending keys (or the arch) otherwise, so a
    checkpoint that does not fit never trains a linear layer on random features.
    """
    checkpoint = load_checkpoint(path)
    saved_arch = checkpoint_arch(checkpoint)
    if saved_arch is not None and saved_arch != arch:
        raise UserError(f"{path} is a {saved_arch} checkpoint, but -a/--arch is {arch}")
    state = backbone_state(checkpoint, path)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(
                f"{path} does not fit {arch}: {key} has shape {tuple(value.shape)} in the "
                f"checkpoint, {tuple(own[key].shape)} in the model (a checkpoint of another arch?)"
            )
    missing = set(own) - set(state) - HEAD_KEYS  # the head is never in `state`
    unexpected = set(state) - set(own)
    if missing or unexpected:
        problems = [f"missing {_listed(missing)}"] if missing else []
        problems += [f"unexpected {_listed(unexpected)}"] if unexpected else []
        raise UserError(
            f"{path} does not fit {arch}: {'; '.join(problems)} "
            "(only fc.weight and fc.bias may be missing)"
        )
    model.load_state_dict(state, strict=False)
    return state


def check_backbone_unchanged(model, path):
    """Compare every backbone tensor (BN running stats too) with the file: the freeze worked."""
    pretrained = backbone_state(load_checkpoint(path), path)
    current = model.state_dict()
    changed = [k for k, v in pretrained.items() if not torch.equal(current[k].cpu(), v)]
    if changed:
        raise RuntimeError(
            f"backbone changed during linear classification: {_listed(changed)}; "
            "the freeze is broken"
        )
