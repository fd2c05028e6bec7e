"""Each detectron2 0.6 compatibility shim fixes its break, and is a no-op where not needed."""

import logging
import os
import re
import sys
import types

import numpy as np
import pytest
from PIL import Image

import moco_d2.detection
from moco_d2.detection import compat

STAND_IN = isinstance(sys.modules.get("detectron2._C"), compat._CompiledOpsStandIn)


def _original(fn):
    return getattr(fn, "__wrapped__", fn)


def _expected_shims():
    """Which shims this environment needs, judged from the libraries themselves."""
    import importlib.metadata
    import inspect

    from detectron2.data import build, detection_utils
    from detectron2.data.datasets import pascal_voc
    from detectron2.model_zoo import model_zoo
    from detectron2.structures import masks

    expected = set()
    if STAND_IN:
        expected.add("detectron2._C stand-in")
    if int(importlib.metadata.version("pillow").split(".")[0]) >= 10:
        expected.add("PIL.Image.LINEAR")
    for owner, label, name in (
        (pascal_voc, pascal_voc.__name__, "load_voc_instances"),
        (build, build.__name__, "print_instances_class_histogram"),
        (masks, masks.__name__, "polygons_to_bitmask"),
        (masks.PolygonMasks, f"{masks.__name__}.PolygonMasks", "nonempty"),
        (detection_utils, detection_utils.__name__, "polygons_to_bitmask"),
    ):
        source = inspect.getsource(_original(getattr(owner, name)))
        aliases = re.findall(r"\bnp\.(str|int|float|bool|object)\b", source)
        # numpy 2 brought back np.bool (as numpy's bool type), not the others.
        if any(alias not in np.__dict__ for alias in aliases):
            expected.add(f"{label}.{name}")
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        if "pkg_resources" in inspect.getsource(model_zoo):
            expected.add("pkg_resources for detectron2.model_zoo")
    return expected


def test_each_shim_is_applied_exactly_when_its_library_needs_it():
    # Pure-Python 0.6 with Pillow >= 10 and numpy >= 2 needs all five (numpy 1.24-1.26
    # also the three np.bool ones); a compiled build from
    # detectron2's current source needs only the Pillow and pkg_resources ones.
    assert set(moco_d2.detection.APPLIED_SHIMS) == _expected_shims()


def test_applying_again_changes_nothing():
    assert compat.apply() == []


@pytest.mark.skipif(not STAND_IN, reason="detectron2 has its compiled C++ ops here")
def test_compiled_ops_stand_in_answers_versions_and_names_missing_ops():
    import detectron2._C as _C
    from detectron2.layers import ROIAlignRotated
    from detectron2.utils.collect_env import collect_env_info

    assert "without C++ ops" in _C.get_compiler_version()
    assert "without C++ ops" in _C.get_cuda_version()
    assert "detectron2" in collect_env_info()
    op = ROIAlignRotated(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=0)
    import torch

    with pytest.raises(compat.MissingCompiledOp, match="roi_align_rotated_forward.*github"):
        op(torch.zeros(1, 1, 4, 4), torch.zeros(1, 6))


def test_compiled_ops_stand_in_is_a_no_op_when_a_compiled_module_exists(tmp_path, monkeypatch):
    import detectron2

    (tmp_path / "_C.py").write_text("COMPILED = True\n")
    monkeypatch.delitem(sys.modules, "detectron2._C")
    monkeypatch.setattr(detectron2, "__path__", [str(tmp_path)] + list(detectron2.__path__))
    assert compat.install_compiled_ops_stand_in() is False
    assert "detectron2._C" not in sys.modules


def test_pillow_linear_alias_added_only_when_missing(monkeypatch):
    assert Image.LINEAR == Image.BILINEAR
    assert compat.add_pillow_linear_alias() is False
    monkeypatch.delattr(Image, "LINEAR")
    assert compat.add_pillow_linear_alias() is True
    assert Image.LINEAR == Image.BILINEAR


def test_numpy_aliases_are_temporary():
    assert "str" not in np.__dict__
    with compat.numpy_aliases():
        assert np.str is str and np.int is int
    assert "str" not in np.__dict__ and "int" not in np.__dict__


def _uses_np_str(path):
    return np.loadtxt(path, dtype=np.str)


def _uses_builtin_str(path):
    return np.loadtxt(path, dtype=str)


def test_only_functions_spelling_removed_aliases_get_wrapped(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("000001\n000002\n")
    module = types.ModuleType("fake")
    module.uses_np_str = _uses_np_str
    module.uses_builtin_str = _uses_builtin_str
    assert compat.wrap_with_numpy_aliases(module, "uses_builtin_str") is False
    assert module.uses_builtin_str is _uses_builtin_str
    assert compat.wrap_with_numpy_aliases(module, "uses_np_str") is True
    assert list(module.uses_np_str(str(ids))) == ["000001", "000002"]
    # Wrapping twice must not nest.
    assert compat.wrap_with_numpy_aliases(module, "uses_np_str") is False


def _write_voc(root, names=("000001", "000002")):
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        os.makedirs(root / sub, exist_ok=True)
    (root / "ImageSets/Main/test.txt").write_text("".join(f"{name}\n" for name in names))
    for name in names:
        Image.new("RGB", (64, 48)).save(root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(
            "<annotation><size><width>64</width><height>48</height></size>"
            "<object><name>dog</name><difficult>1</difficult>"
            "<bndbox><xmin>11</xmin><ymin>6</ymin><xmax>40</xmax><ymax>30</ymax></bndbox>"
            "</object></annotation>"
        )


def test_detectron2_pascal_voc_loader_works_on_todays_numpy(tmp_path):
    from detectron2.data.datasets import pascal_voc

    _write_voc(tmp_path)
    record, _ = pascal_voc.load_voc_instances(str(tmp_path), "test", pascal_voc.CLASS_NAMES)
    assert (record["height"], record["width"]) == (48, 64)
    (obj,) = record["annotations"]
    # VOC is 1-based; detectron2 subtracts 1 from xmin/ymin only.
    assert obj["bbox"] == [10.0, 5.0, 40.0, 30.0]
    assert obj["category_id"] == pascal_voc.CLASS_NAMES.index("dog")
    assert "str" not in np.__dict__


def test_class_histogram_is_printed_instead_of_failing(caplog):
    from detectron2.data import build

    dataset = [{"annotations": [{"category_id": 0}, {"category_id": 1}, {"category_id": 1}]}]
    with caplog.at_level(logging.INFO):
        logger = logging.getLogger("detectron2")
        logger.addHandler(caplog.handler)
        try:
            build.print_instances_class_histogram(dataset, ["cat", "dog"])
        finally:
            logger.removeHandler(caplog.handler)
    text = caplog.text
    assert "cat" in text and "dog" in text and "total" in text


def test_model_zoo_finds_its_configs_without_leaking_a_fake_pkg_resources():
    import importlib.util

    from detectron2 import model_zoo

    path = model_zoo.get_config_file("Base-RCNN-C4.yaml")
    assert os.path.isfile(path) and path.endswith("Base-RCNN-C4.yaml")
    # Either the real pkg_resources is importable, or nothing claims to be it.
    assert "pkg_resources" not in sys.modules or importlib.util.find_spec("pkg_resources")


def test_trainer_checkpoint_keeps_and_restores_sgd_momentum():
    """A resumed run continues with the saved momentum on every detectron2 (0.6 drops it)."""
    import torch
    from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase

    class Trainer(compat.InnerTrainerState, DefaultTrainer):
        def __init__(self, model):  # only what state_dict/load_state_dict use
            TrainerBase.__init__(self)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            self._trainer = SimpleTrainer(model, [], optimizer)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    trained = Trainer(model)
    model(torch.randn(4, 3)).square().sum().backward()
    trained._trainer.optimizer.step()
    saved = trained.state_dict()
    momentum = trained._trainer.optimizer.state[model.weight]["momentum_buffer"]
    assert torch.equal(saved["_trainer"]["optimizer"]["state"][0]["momentum_buffer"], momentum)

    resumed = Trainer(torch.nn.Linear(3, 2))
    resumed.load_state_dict(saved)
    restored = resumed._trainer.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert momentum.abs().sum() > 0 and torch.equal(restored, momentum)


def test_polygon_masks_rasterize_and_filter_on_todays_numpy():
    from detectron2.structures import PolygonMasks, polygons_to_bitmask
    from detectron2.structures.masks import rasterize_polygons_within_box

    square = [np.array([2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0])]
    bitmask = polygons_to_bitmask(square, 8, 8)
    # pycocotools rasterizes the 4x4 square [2, 6) x [2, 6).
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:6, 2:6] = True
    assert bitmask.dtype == bool and (bitmask == expected).all()
    # The mask-loss target: the square's box resampled to 4x4 is all foreground.
    assert rasterize_polygons_within_box(square, np.array([2.0, 2.0, 6.0, 6.0]), 4).all()
    masks = PolygonMasks([square, [np.array([1.0, 1.0, 3.0, 1.0, 3.0, 3.0])]])
    assert masks.nonempty().tolist() == [True, True]


def test_detection_utils_bitmask_annotations_on_todays_numpy():
    from detectron2.data import detection_utils

    ann = {
        "bbox": [2.0, 2.0, 6.0, 6.0],
        "bbox_mode": 0,
        "category_id": 0,
        "segmentation": [[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]],
    }
    instances = detection_utils.annotations_to_instances([ann], (8, 8), mask_format="bitmask")
    assert instances.gt_masks.tensor.shape == (1, 8, 8)
    assert int(instances.gt_masks.tensor.sum()) == 16


def test_has_compiled_ops_is_false_exactly_for_the_stand_in():
    # COCOEvaluator's fast path calls detectron2._C; with the stand-in it must not be chosen.
    assert compat.has_compiled_ops() is (not STAND_IN)
