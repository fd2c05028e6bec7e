"""The one place where detectron2 0.6 is made to work with today's numpy, Pillow and torch.

Each shim checks whether the library is already fine and then does nothing, so the same
code runs on an official compiled detectron2 and on the pure-Python 0.6 package that
:mod:`moco_d2.install_detectron2` installs. ``apply()`` runs on ``import moco_d2``.
"""

import contextlib
import functools
import importlib.resources
import importlib.util
import inspect
import re
import sys
import types

import numpy as np

from moco_d2.install_detectron2 import OFFICIAL_HINT

# numpy >= 1.24 removed these aliases; detectron2 0.6 still spells them.
_NUMPY_ALIASES = {"str": str, "int": int, "float": float, "bool": bool, "object": object}


class MissingCompiledOp(RuntimeError):
    pass


class _CompiledOpsStandIn(types.ModuleType):
    """Stands in for ``detectron2._C`` when detectron2 was installed without its C++ ops.

    detectron2.layers imports ``_C`` at import time for rotated boxes and deformable
    convolution; R50-C4 uses neither. Version queries answer, any op raises a clear error.
    """

    def __init__(self):
        super().__init__("detectron2._C", __doc__)
        self.__spec__ = importlib.util.spec_from_loader("detectron2._C", loader=None)

    @staticmethod
    def get_compiler_version():
        return "none (detectron2 installed without C++ ops)"

    @staticmethod
    def get_cuda_version():
        return "none (detectron2 installed without C++ ops)"

    @staticmethod
    def has_cuda():
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise MissingCompiledOp(
                f"detectron2 op '{name}' needs detectron2's compiled C++ extension, which this "
                f"install lacks; {OFFICIAL_HINT}"
            )

        return missing


def install_compiled_ops_stand_in():
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


def add_pillow_linear_alias():
    """Pillow 10 removed ``Image.LINEAR`` (an alias of BILINEAR), a default argument in d2 0.6."""
    from PIL import Image

    if hasattr(Image, "LINEAR"):
        return False
    Image.LINEAR = Image.BILINEAR
    return True


@contextlib.contextmanager
def numpy_aliases():
    """Temporarily restore ``np.str``/``np.int``/... for code written against numpy < 1.24."""
    added = [name for name in _NUMPY_ALIASES if name not in np.__dict__]
    for name in added:
        setattr(np, name, _NUMPY_ALIASES[name])
    try:
        yield
    finally:
        for name in added:
            delattr(np, name)


def _uses_removed_numpy_alias(fn):
    source = inspect.getsource(fn)
    names = re.findall(r"\bnp\.(\w+)\b", source)
    return any(name in _NUMPY_ALIASES and name not in np.__dict__ for name in names)


def wrap_with_numpy_aliases(module, name):
    """Run ``module.name`` inside :func:`numpy_aliases` if its source needs the old aliases."""
    fn = getattr(module, name)
    if getattr(fn, "_moco_d2_numpy_aliases", False) or not _uses_removed_numpy_alias(fn):
        return False

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with numpy_aliases():
            return fn(*args, **kwargs)

    wrapped._moco_d2_numpy_aliases = True
    setattr(module, name, wrapped)
    return True


def numpy_alias_users() -> tuple[tuple[object, str], ...]:
    """``(owner, name)`` of the detectron2 0.6 functions that spell removed numpy aliases.

    The Pascal VOC loader (``np.str``), the class histogram (``np.int``), and the polygon
    mask code of Mask R-CNN (``np.bool``): rasterizing polygons for the mask loss and
    dropping empty polygon masks in the data mapper; ``detection_utils`` holds its own
    reference to ``polygons_to_bitmask`` (used for ``INPUT.MASK_FORMAT bitmask``).
    """
    from detectron2.data import build, detection_utils
    from detectron2.data.datasets import pascal_voc
    from detectron2.structures import masks

    return (
        (pascal_voc, "load_voc_instances"),
        (build, "print_instances_class_histogram"),
        (masks, "polygons_to_bitmask"),
        (masks.PolygonMasks, "nonempty"),
        (detection_utils, "polygons_to_bitmask"),
    )


def _owner_name(owner):
    return f"{owner.__module__}.{owner.__name__}" if isinstance(owner, type) else owner.__name__


def patch_numpy_alias_users():
    """Wrap each of :func:`numpy_alias_users` that needs it; return their dotted names."""
    patched = []
    # Each is looked up as a module global or class attribute at call time, so replacing
    # the attribute suffices.
    for owner, name in numpy_alias_users():
        if wrap_with_numpy_aliases(owner, name):
            patched.append(f"{_owner_name(owner)}.{name}")
    return patched


def _resource_filename(package, resource):
    return str(importlib.resources.files(package).joinpath(resource))


def provide_pkg_resources_to_model_zoo():
    """setuptools >= 81 no longer ships ``pkg_resources``, which d2 0.6's model_zoo imports.

    The stand-in (only ``resource_filename``) is visible while model_zoo is imported and
    removed right after, so no other library mistakes it for the real module.
    """
    if (
        "detectron2.model_zoo.model_zoo" in sys.modules
        or importlib.util.find_spec("pkg_resources") is not None
    ):
        return False
    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_filename = _resource_filename
    sys.modules["pkg_resources"] = stand_in
    try:
        import detectron2.model_zoo.model_zoo  # noqa: F401
    finally:
        del sys.modules["pkg_resources"]
    return True


def apply():
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
