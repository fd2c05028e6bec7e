"""What a pretraining checkpoint records about its run, and the rules for ``--resume``.

A resumed run must be the run that was started: the flags that define what is trained (the
``moco`` block, arch, crop, optimizer and schedule, the global batch and BatchNorm group size)
must equal the recorded ones, or the resume is refused with every difference on one line.
Flags that keep the same training distribution may change: ``--epochs`` (to extend a run; with
``--cos`` the remaining epochs follow the new cosine), ``--seed``, ``--amp`` and the speed
flags. They break bit-exactness, so they are logged and recorded in ``resume_changes``.
Flags with no effect on the weights (``-j``, ``-p``, ``--output-dir``, ``--knn-*``,
``--device``) change freely. Older checkpoints record less: what they lack is not compared.
"""

import argparse
import logging
from typing import Any

from moco_d2.errors import UserError

logger = logging.getLogger(__name__)


class NothingToDo(Exception):
    """The resumed run already trained every epoch: said in one line, exit 0, nothing written
    (as train_net and lincls do for a finished run)."""


# (block, key) → how the flag is spelled in the message; None for top-level keys.
_FIXED = {
    (None, "arch"): "-a",
    ("moco", "dim"): "--moco-dim",
    ("moco", "K"): "--moco-k",
    ("moco", "m"): "--moco-m",
    ("moco", "T"): "--moco-t",
    ("moco", "mlp"): "--mlp",
    ("moco", "aug_plus"): "--aug-plus",
    ("moco", "cos"): "--cos",
    ("moco", "global_batch"): "global batch (-b x nodes)",
    ("moco", "bn_group"): "images per BatchNorm group (-b, --bn-splits, processes)",
    ("train", "crop_size"): "--crop-size",
    ("train", "lr"): "--lr",
    ("train", "schedule"): "--schedule",
    ("train", "momentum"): "--momentum",
    ("train", "weight_decay"): "--wd",
}
_FREE = {
    ("train", "epochs"): "--epochs",
    (None, "seed"): "--seed",
    ("speed", "amp"): "--amp",
    ("speed", "augment_on"): "--augment-on",
    ("speed", "decode_on"): "--decode-on",
    ("speed", "channels_last"): "--channels-last",
    ("speed", "compile"): "--compile",
}


def recorded_settings(
    args: argparse.Namespace, bn_splits: int, batch: int, global_batch: int
) -> dict[str, Any]:
    """The checkpoint's record of the run (besides ``epoch``/``arch``/``state_dict``/...)."""
    return {
        "moco": {
            "dim": args.moco_dim,
            "K": args.moco_k,
            "m": args.moco_m,
            "T": args.moco_t,
            "mlp": args.mlp,
            "aug_plus": args.aug_plus,
            "cos": args.cos,
            "bn_splits": bn_splits,
            "bn_group": batch // bn_splits,
            "global_batch": global_batch,
        },
        "train": {
            "crop_size": args.crop_size,
            "lr": args.lr,
            "schedule": list(args.schedule),
            "momentum": args.momentum,
            "weight_decay": args.weight_decay,
            "epochs": args.epochs,
        },
        "speed": {
            "amp": args.amp,
            "augment_on": args.augment_on,
            "decode_on": args.decode_on,
            "channels_last": args.channels_last,
            "compile": args.compile,
        },
    }


def _value(record: dict[str, Any], block: str | None, key: str) -> Any:
    where = record if block is None else record.get(block)
    return where.get(key) if isinstance(where, dict) else None


def _shown(flag: str, value: Any) -> str:
    if isinstance(value, bool) and flag.startswith("--"):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, list):
        return f"{flag} {' '.join(map(str, value)) or '(none)'}"
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def _differences(
    flags: dict, checkpoint: dict[str, Any], now: dict[str, Any], skip: set
) -> list[str]:
    found = []
    for (block, key), flag in flags.items():
        old, new = _value(checkpoint, block, key), _value(now, block, key)
        if old is None or (block, key) in skip or old == new:
            continue
        theirs = _shown(flag, old)
        if isinstance(old, bool) and flag.startswith("--"):
            found.append(f"{_shown(flag, new)} (checkpoint: {theirs})")
        else:
            found.append(f"{_shown(flag, new)} (checkpoint: {theirs.removeprefix(flag).strip()})")
    return found


def check_resume(state: dict[str, Any], path: str, now: dict[str, Any]) -> list[dict[str, Any]]:
    """Refuse (UserError) a resume whose run-defining flags differ from ``state``'s record.

    Returns the run's ``resume_changes``: the checkpoint's list, plus this resume's allowed
    changes (logged as a warning) at the epoch it resumes from.

    ``now`` is this run's :func:`recorded_settings` plus ``arch`` and ``seed``."""
    fixed = dict(_FIXED)
    if _value(state, "moco", "bn_group") is None:  # an older record: compare its split count
        fixed[("moco", "bn_splits")] = "--bn-splits"
    skip = {("train", "schedule")} if _value(now, "moco", "cos") else set()  # unused by cosine
    refused = _differences(fixed, state, now, skip)
    if refused:
        raise UserError(
            f"--resume {path}: the run was started with other settings: {', '.join(refused)}; "
            "resume with the checkpoint's flags (its run's args.json), or start a new "
            "--output-dir"
        )
    history = list(state.get("resume_changes", []))
    changed = _differences(_FREE, state, now, set())
    if changed:
        logger.warning(
            "resumed with changed settings that keep what is trained but not bit-exactness: %s",
            ", ".join(changed),
        )
        history.append({"epoch": int(state["epoch"]), "changes": changed})
    return history


def check_unfinished(state: dict[str, Any], path: str, epochs: int) -> None:
    """:class:`NothingToDo` when the checkpoint, already loaded into the model (so that one
    of another model is still refused), is at or past ``--epochs``."""
    if int(state["epoch"]) >= epochs:
        raise NothingToDo(
            f"nothing to do: --resume {path} already finished epoch {int(state['epoch'])} of "
            f"--epochs {epochs} (raise --epochs to train longer)"
        )


def check_epochs(args: argparse.Namespace) -> None:
    """``--start-epoch`` past ``--epochs`` would train nothing and save nothing: refused."""
    if args.start_epoch >= args.epochs:
        raise UserError(
            f"--start-epoch {args.start_epoch} is not below --epochs {args.epochs}: "
            "nothing would be trained"
        )
