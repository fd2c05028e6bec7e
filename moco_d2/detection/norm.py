"""Pick a BatchNorm that can synchronize on the devices this run has."""

import logging

import torch
from detectron2.config import CfgNode
from detectron2.utils import comm

logger = logging.getLogger(__name__)


def resolve_sync_bn(cfg: CfgNode) -> CfgNode:
    """Use ``naiveSyncBN`` instead of ``SyncBN`` when several processes run on CPU.

    torch's SyncBatchNorm only synchronizes CUDA tensors ("SyncBatchNorm expected input
    tensor to be on GPU" under gloo); in a single process it is plain BN, and on GPUs it is
    the protocol's BN. Detectron2's NaiveSyncBatchNorm all-reduces the statistics through
    torch.distributed, which gloo supports. ``cfg`` must be mutable; returns it.
    """
    on_cpu = torch.device(cfg.MODEL.DEVICE).type == "cpu"
    if cfg.MODEL.RESNETS.NORM == "SyncBN" and on_cpu and comm.get_world_size() > 1:
        cfg.MODEL.RESNETS.NORM = "naiveSyncBN"
        logger.info(
            "MODEL.RESNETS.NORM: SyncBN -> naiveSyncBN (torch's SyncBatchNorm needs "
            "CUDA in multi-process runs; %d CPU processes)",
            comm.get_world_size(),
        )
    return cfg
