"""Registering a dataset so that registering it again replaces it, on any detectron2 version."""

from collections.abc import Callable
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog


def register_replacing(name: str, load: Callable[[], list[dict]], **metadata: Any) -> None:
    """Register ``load`` and ``metadata`` as ``name``, replacing an earlier registration:
    tests and ``$DETECTRON2_DATASETS`` changes re-point the protocol's names at other trees,
    and Detectron2's catalogs refuse to overwrite an entry or change a metadata value."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(**metadata)
