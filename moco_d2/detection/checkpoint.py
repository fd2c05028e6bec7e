"""Loading weights into a Detectron2 model safely, and without silently leaving the backbone
random.

Detectron2 reads ``.pkl`` weights with plain ``pickle.load``, which runs whatever code the
file names; here every file goes through :mod:`moco_d2.io` (a restricted unpickler for
``.pkl``, ``torch.load(weights_only=True)`` otherwise). A pretraining checkpoint that the
converter accepts is converted in memory, by the converter's own functions, and logged as
the converter reports it. Detectron2 also only logs a warning for model tensors a checkpoint
does not provide, so a wrong file trains a half-random backbone; here any ResNet trunk
tensor left unloaded is an error. And Detectron2 writes checkpoints in place, so a full disk
or a kill left a truncated file that ``last_checkpoint`` might name; here they are written
atomically (:mod:`moco_d2.io`).
"""

import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from moco_d2 import io
from moco_d2.convert import tool
from moco_d2.convert.trunk import find_trunk
from moco_d2.errors import UserError
from moco_d2.io import atomic_torch_save, atomic_write_text

LAST_CHECKPOINT = "last_checkpoint"  # the file Detectron2's checkpointer keeps in OUTPUT_DIR
logger = logging.getLogger(__name__)

# ResNet trunk tensors wherever the model nests them: ``backbone.stem.*``,
# ``backbone.res2.0.*`` ... and, in R50-C4, ``roi_heads.res5.0.*`` (res5 is the box head).
# The extra ``roi_heads.res5.norm`` of Res5ROIHeadsExtraNorm is new, not pretrained.
_TRUNK = re.compile(r"(?:^|\.)(?:stem|res[2-5]\.\d+)\.")
_SHOWN = 5


def _is_detectron2(loaded: dict[str, Any]) -> bool:
    """A train_net checkpoint (Detectron2's checkpointer saves the ``model`` with the
    ``iteration``) or a Detectron2 state_dict: names of a Detectron2 ResNet."""
    model = loaded.get("model")
    if isinstance(model, dict) and "iteration" in loaded:
        return True
    state = model if isinstance(model, dict) else loaded
    return any(_TRUNK.search(str(name)) for name in state)


def converted_in_memory(loaded: Any, path: str) -> dict[str, Any]:
    """A pretraining checkpoint (any layout the converter accepts) as the converter would
    write it, logged as the converter reports it; its own errors if it does not convert."""
    trunk = find_trunk(loaded, path)
    try:
        mapping = tool.checked_mapping(trunk)
    except UserError as e:
        raise UserError(
            f"{path} ({trunk.format}): {e}; not loaded (train_net converts a pretraining "
            "checkpoint in memory as tools/convert-to-d2.py does)"
        ) from None
    for line in tool.summary(trunk, trunk.input_norm):
        logger.info("MODEL.WEIGHTS %s: %s", path, line)
    logger.info("MODEL.WEIGHTS %s: converted %d tensors in memory", path, len(mapping))
    logger.debug("MODEL.WEIGHTS %s, as converted:\n%s", path, tool.report(trunk, mapping))
    return tool.detectron2_weights(trunk, mapping, trunk.input_norm)


def read_detectron2_file(path: str) -> dict[str, Any]:
    """The content of a weights file as ``DetectionCheckpointer`` expects it.

    ``.pkl`` (converted or model-zoo weights) goes through the restricted unpickler, anything
    else through ``torch.load(weights_only=True)`` (or safetensors). A file that holds no
    Detectron2 names is a pretraining checkpoint or state_dict, converted in memory.
    """
    if path.endswith(".pkl"):
        data = io.load_pickle(path)
        if not isinstance(data, dict):
            raise UserError(f"{path} holds a {type(data).__name__}, not Detectron2 weights")
        if "model" in data and "__author__" in data:
            return data
        data = data.get("blobs", data)  # Caffe2 / Detectron1 model zoo layout
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
    loaded = io.load_file(path)
    if not isinstance(loaded, dict):
        raise UserError(f"{path} holds a {type(loaded).__name__}, not Detectron2 weights")
    if path.endswith(".pyth") and isinstance(loaded.get("model_state"), dict):  # pycls
        state = {k: v for k, v in loaded["model_state"].items() if "num_batches_tracked" not in k}
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    if _is_detectron2(loaded):
        return loaded if "model" in loaded else {"model": loaded}
    return converted_in_memory(loaded, path)


def local_weights(url: str, key: str = "MODEL.WEIGHTS") -> str:
    """The local copy of a weights URL as Detectron2 resolves it (``http(s)://``,
    ``detectron2://``, ``catalog://``): iopath's download cache (``$FVCORE_CACHE``, default
    ``~/.torch/iopath_cache``) if it holds the file, else downloaded there now."""
    import detectron2.checkpoint.catalog  # noqa: F401  (registers catalog://)

    try:
        return PathManager.get_local_path(url)
    except Exception as e:  # URLError, HTTPError, OSError, KeyError (unknown catalog name)
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"{key} {url} cannot be downloaded here ({type(e).__name__}: {reason}): download "
            f"it on a machine with network access and set {key} to the local file"
        ) from None


def non_finite_tensor(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor or array in ``state`` holding a NaN or inf."""
    for name, value in state.items():
        if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            if not np.isfinite(value).all():
                return name
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            if not torch.isfinite(value).all():
                return name
    return None


def trunk_names(names: Iterable[str]) -> list[str]:
    """Those of ``names`` (model state_dict keys) that belong to the pretrained ResNet trunk."""
    return [n for n in names if _TRUNK.search(n)]


class BackboneCheckingCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose ``load`` raises :class:`UserError` when a
    checkpoint leaves any backbone (trunk) tensor of the model unloaded or a file is missing.

    A drop-in replacement, e.g. for ``DefaultTrainer.checkpointer``: ``resume_or_load`` goes
    through ``load`` too.
    """

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path):
            raise UserError(
                f"weights file not found: {path} (convert a pretraining checkpoint "
                'with tools/convert-to-d2.py; MODEL.WEIGHTS "" means random init)'
            )
        self._path = path
        return super().load(path, *args, **kwargs)

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save``, written atomically: on a full disk the error names the file,
        and the earlier checkpoints and ``last_checkpoint`` stay as they were."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, LAST_CHECKPOINT))

    def _load_file(self, filename: str) -> dict[str, Any]:
        return read_detectron2_file(filename)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        missing = trunk_names(incompatible.missing_keys)
        if missing:
            shown = ", ".join(missing[:_SHOWN]) + (", …" if len(missing) > _SHOWN else "")
            raise UserError(
                f"{self._path} left {len(missing)} backbone tensors of the model unloaded "
                f"(missing, or of another shape, in the file): {shown}; convert pretraining "
                "checkpoints with tools/convert-to-d2.py and check MODEL.RESNETS (DEPTH 50, "
                "STRIDE_IN_1X1 False)"
            )
        self.not_loaded = list(incompatible.missing_keys)
        return incompatible


def load_detectron2_weights(model: torch.nn.Module, path: str) -> list[str]:
    """Load ``path`` (e.g. MODEL.WEIGHTS) into ``model``; return the names left at init.

    Every ResNet trunk tensor must come from the file (else :class:`UserError`); the
    detection heads and the extra res5 norm are expected to stay at init. An empty
    ``path`` loads nothing, on purpose: training from random initialization.
    """
    checkpointer = BackboneCheckingCheckpointer(model)
    if not path:
        return sorted(checkpointer.model.state_dict())  # the model without its DDP wrapper
    checkpointer.load(path)
    return checkpointer.not_loaded
