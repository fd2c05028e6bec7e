"""Published numbers the reports print next to ours (MoCo v2 paper, arXiv 2003.04297)."""

# Faster R-CNN R50-C4 on VOC07 test after VOC07+12 fine-tuning: mean of 5 trials.
VOC_DETECTION = {
    "ImageNet supervised": {"AP50": 81.3, "AP": 53.5, "AP75": 58.8},
    "MoCo v1 200ep": {"AP50": 81.5, "AP": 55.9, "AP75": 62.6},
    "MoCo v2 200ep": {"AP50": 82.4, "AP": 57.0, "AP75": 63.6},
    "MoCo v2 800ep": {"AP50": 82.5, "AP": 57.4, "AP75": 64.0},
}
# Standard deviations over those 5 trials.
VOC_DETECTION_STD = {"AP50": 0.2, "AP": 0.2, "AP75": 0.4}

# ResNet-50 linear classification top-1 on ImageNet.
LINEAR_TOP1 = {"MoCo v1 200ep": 60.6, "MoCo v2 200ep": 67.5, "MoCo v2 800ep": 71.1}
