"""With moco_d2 imported, the pure-Python detectron2 0.6 trains and runs an R50-C4 Faster R-CNN."""

import importlib

import pytest
import torch

import moco_d2.detection  # noqa: F401  (compat shims and registrations before detectron2)

MODULES_THE_MISSION_NEEDS = [
    "detectron2.layers",
    "detectron2.config",
    "detectron2.checkpoint",
    "detectron2.data",
    "detectron2.data.transforms",
    "detectron2.data.datasets.pascal_voc",
    "detectron2.engine",
    "detectron2.evaluation",
    "detectron2.evaluation.pascal_voc_evaluation",
    "detectron2.modeling",
    "detectron2.modeling.roi_heads",
    "detectron2.solver",
    "detectron2.utils.comm",
    "detectron2.utils.events",
    "detectron2.utils.collect_env",
]


@pytest.mark.parametrize("name", MODULES_THE_MISSION_NEEDS)
def test_module_imports(name):
    importlib.import_module(name)


def _tiny_r50_c4():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-C4.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 8
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 16
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 8
    cfg.INPUT.MIN_SIZE_TEST = 64
    torch.manual_seed(0)
    return build_model(cfg)


def _sample():
    from detectron2.structures import Boxes, Instances

    instances = Instances((64, 64))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    instances.gt_classes = torch.tensor([1])
    return {"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64, "instances": instances}


def test_r50_c4_trains_one_step_and_runs_inference_on_cpu():
    model = _tiny_r50_c4()
    from detectron2.utils.events import EventStorage

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with EventStorage(0):
        losses = model([_sample()])
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert not torch.equal(before, model.roi_heads.box_predictor.cls_score.weight)

    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": _sample()["image"], "height": 128, "width": 128}])
    instances = output["instances"]
    # Boxes are rescaled to the requested output size and lie inside it.
    assert instances.image_size == (128, 128)
    boxes = instances.pred_boxes.tensor
    assert boxes.numel() == 0 or (boxes.min() >= 0 and boxes.max() <= 128)
