"""Atomic file writes: a crash or a bad input never leaves a half-written output behind."""

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import Any


def _create_temporary(directory: str, name: str) -> str:
    """A new empty file beside the target, created with mode 0o666 so the kernel applies the
    umask exactly as ``open()`` would (``mkstemp`` would make it 0600)."""
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike[str]") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _create_temporary(directory, os.path.basename(path))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj: Any, path: "str | os.PathLike[str]") -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: "str | os.PathLike[str]") -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
