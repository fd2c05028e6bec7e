"""MoCo v2 pretraining, conversion and Detectron2 transfer evaluation.

Importing ``moco_d2`` (or :mod:`moco_d2.pretrain`, :mod:`moco_d2.lincls`,
:mod:`moco_d2.convert`, :mod:`moco_d2.training`) needs only torch and torchvision and patches
nothing. Everything that needs detectron2 lives in :mod:`moco_d2.detection`; importing it makes
detectron2 0.6 work with today's libraries and registers this project's components.
"""

__version__ = "0.1.0"
