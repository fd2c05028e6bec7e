"""Linear classification on frozen features: the MoCo papers' ImageNet evaluation
(arXiv 1911.05722, 2003.04297). Needs only torch and torchvision.
"""
