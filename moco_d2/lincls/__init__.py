"""Linear classification on frozen features: the MoCo papers' ImageNet evaluation (SPEC §2).

Like :mod:`moco_d2.training`, it needs only torch and torchvision.
"""
