"""The one place where detectron2 0.6 is made to work with today's numpy, Pillow and torch,
and where its gaps against later detectron2 are filled. Each shim does nothing where the
library is already fine, so the same code runs on an official compiled detectron2 and on the
pure-Python 0.6 package of :mod:`moco_d2.install_detectron2`. Dropping detectron2 0.6 means
deleting this module and its uses."""

import contextlib
import functools
import importlib.resources
import importlib.util
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import numpy as np

from moco_d2.install_detectron2 import OFFICIAL_HINT

# numpy >= 1.24 removed these aliases; detectron2 0.6 still spells them.
_NUMPY_ALIASES = {"str": str, "int": int, "float": float, "bool": bool, "object": object}


class MissingCompiledOp(RuntimeError):
    pass


class _CompiledOpsStandIn(types.ModuleType):
    """``detectron2._C`` for an install without C++ ops: detectron2.layers imports it for rotated
    boxes and deformable convolution, which R50-C4 does not use. Any op raises a clear error."""

    def __init__(self) -> None:
        super().__init__("detectron2._C", __doc__)
        self.__spec__ = importlib.util.spec_from_loader("detectron2._C", loader=None)

    # What detectron2's collect_env_info asks of it.
    get_compiler_version = get_cuda_version = staticmethod(lambda: "none (built without C++ ops)")
    has_cuda = staticmethod(lambda: False)

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise MissingCompiledOp(
                f"detectron2 op '{name}' needs detectron2's compiled C++ extension, which this "
                f"install lacks; {OFFICIAL_HINT}"
            )

        return missing


def install_compiled_ops_stand_in() -> bool:
    """Register the stand-in for ``detectron2._C`` unless a compiled one is importable."""
    if "detectron2._C" in sys.modules or importlib.util.find_spec("detectron2._C") is not None:
        return False
    import detectron2

    stand_in = _CompiledOpsStandIn()
    sys.modules["detectron2._C"] = stand_in
    detectron2._C = stand_in
    return True


def has_compiled_ops() -> bool:
    """Whether ``detectron2._C`` is the real compiled extension, not the stand-in."""
    import detectron2.layers  # noqa: F401  (imports detectron2._C, or the stand-in)

    return not isinstance(sys.modules.get("detectron2._C"), _CompiledOpsStandIn)


def add_pillow_linear_alias() -> bool:
    """Pillow 10 removed ``Image.LINEAR`` (an alias of BILINEAR), a default argument in d2 0.6."""
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return False
    Image.LINEAR = Image.Resampling.BILINEAR  # type: ignore[attr-defined]
    return True


@contextlib.contextmanager
def numpy_aliases() -> Iterator[None]:
    """Temporarily restore ``np.str``/``np.int``/... for code written against numpy < 1.24."""
    added = [name for name in _NUMPY_ALIASES if name not in np.__dict__]
    for name in added:
        setattr(np, name, _NUMPY_ALIASES[name])
    try:
        yield
    finally:
        for name in added:
            delattr(np, name)


def _uses_removed_numpy_alias(fn: Callable) -> bool:
    source = inspect.getsource(fn)
    names = re.findall(r"\bnp\.(\w+)\b", source)
    return any(name in _NUMPY_ALIASES and name not in np.__dict__ for name in names)


def wrap_with_numpy_aliases(module: types.ModuleType, name: str) -> bool:
    """Run ``module.name`` inside :func:`numpy_aliases` if its source needs the old aliases."""
    fn = getattr(module, name)
    if getattr(fn, "_moco_d2_numpy_aliases", False) or not _uses_removed_numpy_alias(fn):
        return False

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with numpy_aliases():
            return fn(*args, **kwargs)

    wrapped._moco_d2_numpy_aliases = True  # type: ignore[attr-defined]
    setattr(module, name, wrapped)
    return True


def patch_numpy_alias_users() -> list[str]:
    """Wrap the detectron2 0.6 functions that spell removed numpy aliases, where needed: the
    VOC loader (``np.str``), the class histogram (``np.int``) and Mask R-CNN's polygon code
    (``np.bool``; ``detection_utils`` holds its own ``polygons_to_bitmask``). Each is looked up
    at call time, so replacing the attribute suffices. Returns their dotted names."""
    from detectron2.data import build, detection_utils
    from detectron2.data.datasets import pascal_voc
    from detectron2.structures import masks

    patched = []
    for owner, name in (
        (pascal_voc, "load_voc_instances"),
        (build, "print_instances_class_histogram"),
        (masks, "polygons_to_bitmask"),
        (masks.PolygonMasks, "nonempty"),
        (detection_utils, "polygons_to_bitmask"),
    ):
        if wrap_with_numpy_aliases(owner, name):
            label = f"{owner.__module__}.{owner.__name__}" if isinstance(owner, type) else None
            patched.append(f"{label or owner.__name__}.{name}")
    return patched


def _resource_filename(package: str, resource: str) -> str:
    return str(importlib.resources.files(package).joinpath(resource))


def provide_pkg_resources_to_model_zoo() -> bool:
    """setuptools >= 81 no longer ships ``pkg_resources``, which d2 0.6's model_zoo imports: a
    stand-in (``resource_filename`` only), removed right after, so no other library sees it."""
    if (
        "detectron2.model_zoo.model_zoo" in sys.modules
        or importlib.util.find_spec("pkg_resources") is not None
    ):
        return False
    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_filename = _resource_filename  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = stand_in
    try:
        import detectron2.model_zoo.model_zoo  # noqa: F401
    finally:
        del sys.modules["pkg_resources"]
    return True


class InnerTrainerState:
    """Mixin for a DefaultTrainer: checkpoints keep the inner trainer (SGD momentum, AMP
    scaler), which detectron2 0.6 drops, so a resumed run restarted momentum from zero."""

    _trainer: Any  # the mixin's methods reach DefaultTrainer's, which come after it

    def state_dict(self) -> dict:
        ret = super().state_dict()  # type: ignore[misc]
        if "_trainer" not in ret:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        from detectron2.engine import DefaultTrainer

        super().load_state_dict(state_dict)  # type: ignore[misc]
        if "load_state_dict" not in vars(DefaultTrainer):  # detectron2 0.6
            self._trainer.load_state_dict(state_dict["_trainer"])


def set_local_process_group(world_size: int, per_machine: int, machine_rank: int) -> None:
    """Make the group of this machine's ranks, which comm.get_local_rank/size need (as d2's own
    launch does). detectron2 0.6 has no helper for it; every rank must create every group."""
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):  # detectron2 after 0.6
        comm.create_local_process_group(per_machine)
        return
    for i in range(world_size // per_machine):
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def apply() -> list[str]:
    """Apply every shim that is needed; return the names of those that changed something."""
    applied = []
    if install_compiled_ops_stand_in():
        applied.append("detectron2._C stand-in")
    if add_pillow_linear_alias():
        applied.append("PIL.Image.LINEAR")
    applied += patch_numpy_alias_users()
    if provide_pkg_resources_to_model_zoo():
        applied.append("pkg_resources for detectron2.model_zoo")
    return applied
