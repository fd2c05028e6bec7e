"""Atomic file writes: a crash or a bad input never leaves a half-written output behind.

A write goes to a hidden temporary ``.{name}.{8 hex}.tmp`` beside the target and is renamed
onto it only once complete. A process killed mid-write leaves that temporary behind;
:func:`remove_stale_temporaries` deletes such leftovers when the writer starts again. A full
disk is reported as such, naming the path, whatever layer (``torch.save``'s zip writer
included) noticed it.
"""

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from typing import Any

from moco_d2.errors import UserError

_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
# Below this many free bytes a failed write is taken to be the full disk: torch's zip writer
# reports ENOSPC as "unexpected pos" or "file write failed", without the errno.
_NEARLY_FULL = 16 * 2**20


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


def _disk_full(error: BaseException, directory: str) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(error, RuntimeError):
        return False
    try:
        stat = os.statvfs(directory)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _NEARLY_FULL


def _no_space(path: str) -> UserError:
    return UserError(
        f"no space left on the device to write {path}; nothing was written (an earlier "
        "file of that name is unchanged): free some space and rerun"
    )


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike[str]") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; give the name of a file to write")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = _create_temporary(directory, os.path.basename(path))
    except OSError as e:
        if _disk_full(e, directory):
            raise _no_space(path) from None
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if _disk_full(e, directory):
            raise _no_space(path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory: "str | os.PathLike[str]") -> list[str]:
    """Delete the temporaries that killed atomic writes left in ``directory``; return them.

    Call it when the only writer of ``directory`` starts, before it writes anything.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(directory, name)
        if _TEMPORARY.fullmatch(name) and os.path.isfile(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


def atomic_torch_save(obj: Any, path: "str | os.PathLike[str]") -> None:
    import torch

    with atomic_path(path) as tmp:
        # Our own handle, closed as the error leaves this block: a handle torch opened stays
        # open in the traceback's frames, so the full disk's space would not come back.
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def atomic_write_text(text: str, path: "str | os.PathLike[str]") -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def atomic_write_json(obj: Any, path: "str | os.PathLike[str]") -> None:
    """Strict JSON (RFC 8259): a NaN or infinite number is written as ``null``, never as the
    bare ``NaN`` that Python's json module emits and other readers reject."""
    text = json.dumps(_finite_or_null(obj), indent=2, allow_nan=False)
    atomic_write_text(text + "\n", path)


def sha256_of(path: "str | os.PathLike[str]") -> str:
    """Hex digest of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
