"""Training utilities shared by MoCo pretraining and linear classification.

Kept free of detectron2 so that both tools run where only torch/torchvision are installed.
"""
