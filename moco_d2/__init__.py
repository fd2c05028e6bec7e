"""MoCo v2 pretraining, conversion and Detectron2 transfer evaluation.

Importing ``moco_d2`` (or :mod:`moco_d2.pretrain`, :mod:`moco_d2.lincls`, :mod:`moco_d2.convert`)
needs only torch and torchvision and patches nothing. Everything that needs detectron2 lives in
:mod:`moco_d2.detection`; importing it makes detectron2 0.6 work with today's libraries and
registers this project's components.
"""

__version__ = "0.1.0"

# The input normalisation of every torchvision-style ResNet here (MoCo, lincls, kNN monitor).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
