"""The linear-classification model: a frozen torchvision ResNet with a fresh, trainable fc."""

from typing import cast

import torch
import torchvision.models as models

from moco_d2.errors import UserError

ARCHS = sorted(
    name
    for name in models.__dict__
    if name.startswith(("resnet", "resnext", "wide_resnet")) and callable(models.__dict__[name])
)


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """torchvision ``arch``, every parameter frozen but a new fc (N(0, 0.01) weight, 0 bias)."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model = models.__dict__[arch](num_classes=num_classes)
    for name, param in model.named_parameters():
        param.requires_grad = name in ("fc.weight", "fc.bias")
    torch.nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(model.fc.bias)
    return model


def build_optimizer(
    model: torch.nn.Module, lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD over the trainable parameters, which must be exactly the fc weight and bias."""
    params = [p for p in model.parameters() if p.requires_grad]
    fc = cast(torch.nn.Linear, unwrap(model).fc)  # build_model's head
    if {id(p) for p in params} != {id(fc.weight), id(fc.bias)}:
        raise RuntimeError("linear classification must train only fc.weight and fc.bias")
    return torch.optim.SGD(params, lr, momentum=momentum, weight_decay=weight_decay)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
