"""Detectron2's checkpointer made safe: it unpickles ``.pkl`` files with plain ``pickle.load``
(here :mod:`moco_d2.io` reads every file without running code), only warns when a file leaves
model tensors at init (here a backbone tensor left unloaded is an error), and writes in place
(here atomically, so a full disk or a kill never leaves a truncated checkpoint that
``last_checkpoint`` names). A pretraining checkpoint is converted in memory, as the converter
would."""

import logging
import os
import re
from typing import Any

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
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
    """A train_net checkpoint (a ``model`` with the ``iteration``) or a Detectron2 state_dict."""
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
    """The content of a weights file as ``DetectionCheckpointer`` expects it; a file without
    Detectron2 names is a pretraining checkpoint or state_dict, converted in memory."""
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


def input_record(cfg: CfgNode) -> dict[str, Any]:
    """The input normalisation ``cfg`` gives, as the converter records it: every checkpoint
    of a run carries its own, so that resuming or evaluating it is checked like its start."""
    return {
        "about": "its training run's",
        "MODEL.PIXEL_MEAN": list(cfg.MODEL.PIXEL_MEAN),
        "MODEL.PIXEL_STD": list(cfg.MODEL.PIXEL_STD),
        "INPUT.FORMAT": cfg.INPUT.FORMAT,
    }


class BackboneCheckingCheckpointer(DetectionCheckpointer):
    """A drop-in :class:`DetectionCheckpointer` (``resume_or_load`` included) that reads files
    safely, writes them atomically and refuses a file that leaves a backbone tensor unloaded."""

    input_record: dict[str, Any] | None = None  # saved into every checkpoint when set

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path):
            raise UserError(
                f"weights file not found: {path} (convert a pretraining checkpoint "
                'with tools/convert-to-d2.py; MODEL.WEIGHTS "" means random init)'
            )
        self._path = path
        return super().load(path, *args, **kwargs)

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save``, atomically: on a full disk the earlier files stay as they were."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        if self.input_record is not None:
            data[tool.NORMALISATION] = self.input_record
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
        missing = [name for name in incompatible.missing_keys if _TRUNK.search(name)]
        if missing:
            shown = ", ".join(missing[:_SHOWN]) + (", …" if len(missing) > _SHOWN else "")
            raise UserError(
                f"{self._path} left {len(missing)} backbone tensors of the model unloaded "
                f"(missing, or of another shape, in the file): {shown}; convert pretraining "
                "checkpoints with tools/convert-to-d2.py and check MODEL.RESNETS (DEPTH 50, "
                "STRIDE_IN_1X1 False)"
            )
        self.not_loaded = list(incompatible.missing_keys)  # the heads, left at init
        return incompatible
