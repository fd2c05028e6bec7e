"""MoCo/torchvision ResNet-50 checkpoints → Detectron2 weights, all 265 trunk tensors or nothing.

:mod:`moco_d2.weights` reads a checkpoint and finds the query-encoder trunk, :mod:`.resnet`
checks and renames it, :mod:`.tool` is ``tools/convert-to-d2.py``.
"""
