"""Reading a pretraining checkpoint safely and finding the query-encoder trunk in it.

Four layouts are accepted: the released MoCo checkpoint (``state_dict`` with
``module.encoder_q.*``), the same without ``module.``, a bare query-encoder state_dict, and
a plain torchvision ResNet state_dict. Only the query encoder is kept; the projection head,
the key encoder, the queue and BN batch counters are dropped on purpose.
"""

import dataclasses
import pickle
import re
import warnings

import torch

from moco_d2.errors import UserError

# Parts of a MoCo model that are not the query encoder, dropped on purpose.
_MOCO_OTHERS = re.compile(r"encoder_k\..*|queue|queue_ptr")
# Parts of an encoder that are not the trunk: the head (MoCo projection or ImageNet classifier)
# and BN's batch counter, which the Detectron2 model neither needs nor gets.
_NOT_TRUNK = re.compile(r"fc\..*|.*\.num_batches_tracked")
_IMAGENET_CLASSES = 1000


@dataclasses.dataclass
class Trunk:
    """What was found in a checkpoint file."""

    format: str  # human-readable layout, printed by the tool
    tensors: dict  # torchvision name → tensor; may still be incomplete or hold extras
    dropped: list  # names (as in the file's state_dict) left out on purpose


def load(path):
    """``torch.load(weights_only=True)``, every failure a one-line :class:`UserError`."""
    try:
        with warnings.catch_warnings():
            # Noise on a file that loads fine (or that is refused below with a clear reason).
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a checkpoint file") from None
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise UserError(
                f"refused to load {path}: it needs Python object {unsafe.group(1)} to unpickle, "
                "and unpickling arbitrary objects can run arbitrary code (weights_only=True). "
                "If you trust the file, re-save just its tensors, e.g. "
                "torch.save({'state_dict': ckpt['state_dict']}, 'clean.pth')"
            ) from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for broken files
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint, or is truncated or corrupt "
            f"({': '.join(filter(None, (type(e).__name__, _first_line(e))))})"
        ) from None


def _first_line(error):
    text = str(error).strip()
    tail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = (tail.group(1) if tail else text.splitlines()[0] if text else "").strip()
    return re.split(r"(?<=\.)\s", line)[0]  # torch appends paragraphs of advice


def _state_dict(obj, path):
    """The ``state_dict`` entry of a checkpoint, or ``obj`` itself if it is a state_dict."""
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


def find_trunk(obj, path):
    """The query-encoder trunk in a loaded checkpoint ``obj`` and a description of its layout."""
    state, wrapped = _state_dict(obj, path)
    prefix = "module." if all(k.startswith("module.") for k in state) else ""
    names = {k[len(prefix) :]: k for k in state}
    dropped = []
    if any(n.startswith("encoder_q.") for n in names):
        dropped = [k for n, k in names.items() if _MOCO_OTHERS.fullmatch(n)]
        names = {
            (n[len("encoder_q.") :] if n.startswith("encoder_q.") else n): k
            for n, k in names.items()
            if not _MOCO_OTHERS.fullmatch(n)
        }
        where = "checkpoint, state_dict" if wrapped else "model state_dict"
        layout = f"MoCo {where} with {prefix}encoder_q.*"
    else:
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
    tensors = {n: state[k] for n, k in names.items() if not _NOT_TRUNK.fullmatch(n)}
    return Trunk(format=layout, tensors=tensors, dropped=sorted(dropped))
