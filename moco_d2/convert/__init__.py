"""Self-supervised ResNet-50 checkpoints → Detectron2 weights, all 265 trunk tensors or nothing:
:mod:`.trunk` finds the trunk by the rules of :mod:`.layouts`, :mod:`.resnet` checks and renames
it, :mod:`.tool` is ``tools/convert-to-d2.py`` (and train_net's conversion in memory)."""
