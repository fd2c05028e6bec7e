"""The one reader of weights files: safe loading, and finding the query-encoder trunk.

Loading never runs code from the file. PyTorch files (``.pth``, ``.pth.tar``) load with
``torch.load(weights_only=True)``; Detectron2 ``.pkl`` files load with an unpickler that
admits plain containers, numpy arrays and dtypes only. Any other object in a file is refused
with one line naming the file. The converter, lincls (``--pretrained``, ``--resume``),
pretraining ``--resume`` and the Detectron2 weight loader all read through here, so their
errors are worded the same.

Trunk layouts found (:func:`find_trunk`): a MoCo checkpoint (``state_dict`` with
``module.encoder_q.*``, released or ours), the same without ``module.``, a torchvision ResNet
state_dict (bare or ``module.``), and a lincls output (a trained linear classifier on a
frozen trunk). Only the trunk is kept; the head (``fc.*``), the key encoder, the queue and BN
batch counters are dropped on purpose.
"""

import dataclasses
import io
import os
import pickle
import re
import warnings
from typing import Any

import torch

from moco_d2.errors import UserError

MOCO = "moco"
TORCHVISION = "torchvision"
LINCLS = "lincls"

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
_NOT_ALLOWED = (
    "refused to load {path}: it holds a Python object ({name}), and unpickling arbitrary "
    "objects can run arbitrary code; weights files may hold only tensors, arrays and plain "
    "containers. Re-save just the weights (e.g. the state_dict) from a trusted copy"
)
# Parts of a MoCo model that are not the query encoder, dropped on purpose.
_MOCO_OTHERS = re.compile(r"encoder_k\..*|queue|queue_ptr")
# Parts of an encoder that are not the trunk: the head (MoCo projection, ImageNet or lincls
# classifier) and BN's batch counter, which no consumer of the trunk needs.
_NOT_TRUNK = re.compile(r"fc\..*|.*\.num_batches_tracked")
_IMAGENET_CLASSES = 1000


@dataclasses.dataclass
class Trunk:
    """The query-encoder trunk of a weights file and what the file was."""

    kind: str  # MOCO, TORCHVISION or LINCLS
    format: str  # human-readable layout, printed by the tools
    tensors: dict[str, torch.Tensor]  # torchvision name → tensor; may be incomplete
    dropped: list[str]  # names (as in the file) left out on purpose
    arch: str | None = None  # the ``arch`` the file records, if any
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # torchvision → file name


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file, encoding="latin1")  # Detectron2/Caffe2 pickles from Python 2
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PKL_GLOBALS:
            return super().find_class(module, name)
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
        with warnings.catch_warnings():
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


def load_file(path: str) -> Any:
    """Whatever ``path`` holds, loaded safely: ``.pkl`` as Detectron2 weights, else PyTorch."""
    return load_pickle(path) if path.endswith(".pkl") else load_torch(path)


def load_checkpoint(path: str) -> dict[str, Any]:
    """A PyTorch checkpoint that must be a dict (a training run's state)."""
    checkpoint = load_torch(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def is_moco_checkpoint(obj: Any) -> bool:
    """A pretraining checkpoint: its state_dict holds a MoCo query encoder."""
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(state, dict) and any(
        isinstance(k, str) and re.match(r"(module\.)?encoder_q\.", k) for k in state
    )


def _state_dict(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The ``state_dict`` entry of a checkpoint, or ``obj`` itself if it is a state_dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        raise UserError(
            f"{path} holds Detectron2 weights (a converted .pkl or a train_net checkpoint), "
            "not a pretraining checkpoint or a torchvision state_dict"
        )
    wrapped = isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
    state = obj["state_dict"] if wrapped else obj
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds a {type(obj).__name__} with no state_dict, not a checkpoint")
    for name, value in state.items():
        if not (isinstance(name, str) and isinstance(value, torch.Tensor)):
            where = "its state_dict" if wrapped else "it has no 'state_dict', and its entry"
            raise UserError(
                f"{path} is not a checkpoint of tensors: {where} {name!r} is of "
                f"type {type(value).__name__}"
            )
    return state, wrapped


def find_trunk(obj: Any, path: str) -> Trunk:
    """The query-encoder trunk in a loaded file ``obj`` and a description of what it was."""
    state, wrapped = _state_dict(obj, path)
    prefix = "module." if all(k.startswith("module.") for k in state) else ""
    names = {k[len(prefix) :]: k for k in state}
    arch = obj.get("arch") if wrapped and isinstance(obj.get("arch"), str) else None
    dropped = []
    if any(n.startswith("encoder_q.") for n in names):
        kind = MOCO
        dropped = [k for n, k in names.items() if _MOCO_OTHERS.fullmatch(n)]
        names = {
            (n[len("encoder_q.") :] if n.startswith("encoder_q.") else n): k
            for n, k in names.items()
            if not _MOCO_OTHERS.fullmatch(n)
        }
        where = "checkpoint, state_dict" if wrapped else "model state_dict"
        layout = f"MoCo {where} with {prefix}encoder_q.*"
    elif wrapped and "best_acc1" in obj:
        kind = LINCLS
        layout = "lincls checkpoint (linear classifier on a frozen trunk)"
    else:
        kind = TORCHVISION
        fc = state.get(prefix + "fc.weight")
        if fc is not None and fc.ndim == 2 and fc.shape[0] == _IMAGENET_CLASSES:
            layout = "torchvision ResNet state_dict with an ImageNet classifier"
        else:
            layout = "bare query-encoder state_dict"
        if wrapped:
            layout += " in a checkpoint's state_dict"
        if prefix:
            layout += f" with {prefix}* names"
    dropped += [k for n, k in names.items() if _NOT_TRUNK.fullmatch(n)]
    sources = {n: k for n, k in names.items() if not _NOT_TRUNK.fullmatch(n)}
    if not sources:
        raise UserError(f"{path} ({layout}) has no trunk weights, only a head")
    return Trunk(
        kind=kind,
        format=layout,
        tensors={n: state[k] for n, k in sources.items()},
        dropped=sorted(dropped),
        arch=arch,
        sources=sources,
    )


def read_trunk(path: str) -> Trunk:
    """Load ``path`` safely and find its query-encoder trunk."""
    return find_trunk(load_file(path), path)


def state_dict_error(error: Exception) -> str:
    """``load_state_dict``'s multi-line error in one line: its first line and the details
    (missing, unexpected, size mismatches) that follow it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    head, details = lines[0].rstrip(":. "), " ".join(lines[1:])
    return f"{head}: {details}" if details else head
