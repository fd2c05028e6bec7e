"""Datasets for the detection transfer: validating loaders, tree checks, synthetic trees.

Pascal VOC (:mod:`.voc`, :mod:`.check`, :mod:`.synthetic`) and COCO 2017 instances
(:mod:`.coco`, :mod:`.synthetic_coco`).
"""
