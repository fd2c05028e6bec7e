"""Checkpoints in the released MoCo layout, written atomically, loadable with weights_only=True.

A checkpoint is ``{'epoch', 'arch', 'state_dict', 'optimizer', ...extras}`` where ``epoch`` is
the next epoch to run and ``state_dict`` keys carry the ``module.`` prefix that the released
DistributedDataParallel code produced, so the released converter and loaders accept it.
Extras (RNG state, seed) hold only tensors and Python primitives.
"""

import glob
import os
import random
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from moco_d2 import io
from moco_d2.io import atomic_torch_save

CHECKPOINT_PATTERN = "checkpoint_{:04d}.pth.tar"
_CHECKPOINT_RE = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")


def checkpoint_path(output_dir: str, epoch: int) -> str:
    """Path of the checkpoint written at the end of 0-based ``epoch``."""
    return os.path.join(output_dir, CHECKPOINT_PATTERN.format(epoch))


def save_checkpoint(state: dict[str, Any], output_dir: str, epoch: int) -> str:
    """Write ``state`` atomically as ``checkpoint_%04d.pth.tar``; return its path."""
    path = checkpoint_path(output_dir, epoch)
    atomic_torch_save(state, path)
    return path


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the highest-numbered checkpoint in ``output_dir``, or None."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint_*.pth.tar")):
        match = _CHECKPOINT_RE.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def load_checkpoint(path: str) -> dict[str, Any]:
    """A training checkpoint read by :func:`moco_d2.io.load_checkpoint` (weights_only)."""
    return io.load_checkpoint(path)


def add_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys as DistributedDataParallel names them: ``module.<name>``."""
    return {k if k.startswith("module.") else "module." + k: v for k, v in state_dict.items()}


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and primitives."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only where devices match)."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_tuples(value):
    """random.setstate needs tuples; a checkpoint round trip may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
