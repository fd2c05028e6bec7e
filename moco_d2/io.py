"""Reading and writing files safely, beneath every other module of the package.

Writes are atomic: a write goes to a hidden temporary ``.{name}.{8 hex}.tmp`` beside the
target and is renamed onto it only once complete, so a crash or a bad input never leaves a
half-written output; :func:`remove_stale_temporaries` deletes what a killed writer left. A
full disk is reported as such, naming the path, whatever layer noticed it.

Loading never runs code from the file. PyTorch files load with ``torch.load(weights_only=True)``,
which admits ``argparse.Namespace`` too (DINO, PixPro and timm store their arguments so);
``.safetensors`` files hold tensors only; Detectron2 ``.pkl`` files load with an unpickler that
admits plain containers, numpy arrays and dtypes only. Any other object is refused with one
line naming the file, worded the same for every tool.
"""

import argparse
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import secrets
import warnings
from collections.abc import Iterator
from typing import Any

import torch

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


# The only globals a Detectron2 .pkl may name: numpy array and scalar reconstruction, dtypes,
# OrderedDict, sets, and _codecs.encode (how protocol 2 pickles bytes). None of them runs code
# chosen by the file.
_PKL_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),  # protocol 2 spells builtins the Python 2 way
        ("__builtin__", "frozenset"),
        ("_codecs", "encode"),
    }
)
# The only object a PyTorch checkpoint may hold besides tensors and plain containers: the
# arguments DINO, PixPro and timm save beside the weights. Its attributes are unpickled
# under the same rules.
_TORCH_OBJECTS: list[Any] = [argparse.Namespace]
_NOT_ALLOWED = (
    "refused to load {path}: it holds a Python object ({name}), and unpickling arbitrary "
    "objects can run arbitrary code; weights files may hold only tensors, arrays and plain "
    "containers. Re-save just the weights (e.g. the state_dict) from a trusted copy"
)
# Top-level modules of a JAX/Haiku checkpoint pickled with dill (DeepMind's BYOL release).
_JAX_MODULES = frozenset({"dill", "haiku", "jax", "jaxlib", "optax", "byol"})
_JAX_PICKLE = (
    "refused to load {path}: it is a JAX/Haiku checkpoint pickled with dill ({name}), as "
    "DeepMind's BYOL release is, and unpickling it can run arbitrary code; convert it to a "
    "PyTorch state_dict with the published conversion (github.com/ajtejankar/byol-convert) "
    "and pass that file"
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file, encoding="latin1")  # Detectron2/Caffe2 pickles from Python 2
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PKL_GLOBALS:
            return super().find_class(module, name)
        if module.split(".", 1)[0] in _JAX_MODULES:
            raise UserError(_JAX_PICKLE.format(path=self._path, name=f"{module}.{name}"))
        raise UserError(_NOT_ALLOWED.format(path=self._path, name=f"{module}.{name}"))


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a weights file")
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")


def _reason(error: BaseException) -> str:
    """The useful line of a loader's error, without torch's advice to load unsafely."""
    text = str(error).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = (found.group(1) if found else text.splitlines()[0] if text else "").strip()
    line = re.split(r"(?<=\.)\s", line)[0]
    if "weights_only" in line or not line:
        return type(error).__name__
    return f"{type(error).__name__}: {line}"


def load_pickle(path: str) -> Any:
    """A Detectron2 ``.pkl`` read with the restricted unpickler."""
    _check_file(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # pickle raises many types for random or truncated bytes
        raise UserError(
            f"{path} is not a readable Detectron2 .pkl weights file, or is truncated or "
            f"corrupt ({_reason(e)})"
        ) from None


def load_torch(path: str) -> Any:
    """A PyTorch file read with ``torch.load(weights_only=True)`` on the CPU."""
    _check_file(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_TORCH_OBJECTS):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        unsafe = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) (\S+)", str(e))
        if unsafe:
            raise UserError(_NOT_ALLOWED.format(path=path, name=unsafe.group(1))) from None
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint, or is truncated or corrupt "
            f"({_reason(e)})"
        ) from None


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (tensors only, by the format) on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_tensors

    _check_file(path)
    try:
        return load_tensors(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path} is not a readable safetensors file, or is truncated or corrupt ({_reason(e)})"
        ) from None


def load_file(path: str) -> Any:
    """Whatever ``path`` holds, loaded safely: ``.pkl`` as Detectron2 weights, ``.safetensors``
    as such, anything else as a PyTorch file."""
    if path.endswith(".pkl"):
        return load_pickle(path)
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return load_torch(path)


def load_checkpoint(path: str) -> dict[str, Any]:
    """A PyTorch checkpoint that must be a dict (a training run's state)."""
    checkpoint = load_torch(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


# Training checkpoints in the released MoCo layout: ``{'epoch', 'arch', 'state_dict',
# 'optimizer', ...}`` where ``epoch`` is the next epoch to run and ``state_dict`` keys carry the
# ``module.`` prefix of the released DistributedDataParallel code, so the released converter and
# loaders accept them. Extras (config, RNG state) hold only tensors and Python primitives.

_CHECKPOINT = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")


def save_checkpoint(state: dict[str, Any], output_dir: str, epoch: int) -> str:
    """Write ``state`` atomically as ``checkpoint_%04d.pth.tar`` (0-based ``epoch``)."""
    path = os.path.join(output_dir, f"checkpoint_{epoch:04d}.pth.tar")
    atomic_torch_save(state, path)
    return path


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the highest-numbered checkpoint in ``output_dir``, or None."""
    found = [
        (int(m.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT.fullmatch(name))
    ]
    return max(found)[1] if found else None


def add_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys as DistributedDataParallel names them: ``module.<name>``."""
    return {k if k.startswith("module.") else "module." + k: v for k, v in state_dict.items()}


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and primitives."""
    import random

    import numpy as np

    state: tuple[str, np.ndarray, int, int, float] = np.random.get_state()  # type: ignore[assignment]
    kind, keys, pos, has_gauss, cached = state
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only where devices match)."""
    import random

    import numpy as np

    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples; a checkpoint round trip may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
