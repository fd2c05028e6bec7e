"""Published numbers the reports print next to ours, each with its source."""

MOCO_V2 = "MoCo v2 paper (arXiv 2003.04297), mean of 5 trials"
PIXPRO = "PixPro README (github.com/zdaxie/PixPro), VOC07+12 R50-C4"
DENSECL = "DenseCL README (github.com/WXinlong/DenseCL), VOC07+12 R50-C4"

# Faster R-CNN R50-C4 on VOC07 test after VOC07+12 fine-tuning. A metric a source does not
# give is None (shown as not published).
VOC_DETECTION: dict[str, dict[str, float | None]] = {
    "ImageNet supervised": {"AP50": 81.3, "AP": 53.5, "AP75": 58.8},
    "MoCo v1 200ep": {"AP50": 81.5, "AP": 55.9, "AP75": 62.6},
    "MoCo v2 200ep": {"AP50": 82.4, "AP": 57.0, "AP75": 63.6},
    "MoCo v2 800ep": {"AP50": 82.5, "AP": 57.4, "AP75": 64.0},
    "PixPro 400ep": {"AP50": 83.8, "AP": 60.2, "AP75": 67.7},
    "PixPro 100ep": {"AP50": 83.0, "AP": 58.8, "AP75": 66.5},
    "SimCLR 1000ep": {"AP50": 81.9, "AP": 56.3, "AP75": 62.5},
    "InfoMin 200ep": {"AP50": 82.7, "AP": 57.6, "AP75": 64.6},
    "DenseCL 200ep": {"AP50": None, "AP": 58.7, "AP75": None},
}
VOC_DETECTION_SOURCE = {
    **{name: MOCO_V2 for name in list(VOC_DETECTION)[:4]},
    **{name: PIXPRO for name in ("PixPro 400ep", "PixPro 100ep", "SimCLR 1000ep", "InfoMin 200ep")},
    "DenseCL 200ep": DENSECL,
}
# Standard deviations over the MoCo paper's 5 trials.
VOC_DETECTION_STD = {"AP50": 0.2, "AP": 0.2, "AP75": 0.4}

# ResNet-50 linear classification top-1 on ImageNet.
LINEAR_TOP1 = {"MoCo v1 200ep": 60.6, "MoCo v2 200ep": 67.5, "MoCo v2 800ep": 71.1}
