"""The package's shape: the detectron2-free subpackages load no detectron2 and patch nothing."""

import subprocess
import sys

LIGHT = "moco_d2, moco_d2.pretrain, moco_d2.lincls, moco_d2.convert, moco_d2.convert.tool"


def _run(code):
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_light_subpackages_import_no_detectron2_and_patch_nothing():
    # Pillow >= 10 has no Image.LINEAR; only moco_d2.detection's compat shim adds it back.
    _run(
        f"import {LIGHT}, moco_d2.training.schedule, moco_d2.pretrain.main, "
        "moco_d2.lincls.main, sys, PIL.Image\n"
        "assert not any(m.startswith('detectron2') for m in sys.modules), sorted(sys.modules)\n"
        "assert not hasattr(PIL.Image, 'LINEAR')\n"
    )


def test_importing_detection_registers_the_head_and_the_voc_splits():
    out = _run(
        "import moco_d2.detection\n"
        "from detectron2.data import DatasetCatalog\n"
        "from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY\n"
        "ROI_HEADS_REGISTRY.get('Res5ROIHeadsExtraNorm')\n"
        "print(sorted(n for n in DatasetCatalog.list() if n.startswith('voc_20')))\n"
    )
    assert "voc_2007_test" in out and "voc_2012_trainval" in out
