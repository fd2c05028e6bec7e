"""Detectron2's DefaultTrainer adapted to the VOC transfer protocol on GPUs and CPUs."""

import json
import logging
import os
import weakref

from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from moco_d2.detection import compat
from moco_d2.detection.checkpoint import BackboneCheckingCheckpointer
from moco_d2.errors import UserError
from moco_d2.utils.fileio import atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics_voc.json"
METRIC_NAMES = ("AP", "AP50", "AP75")


class Trainer(compat.InnerTrainerState, DefaultTrainer):
    """DefaultTrainer that picks evaluators from dataset metadata, refuses weights that leave
    the backbone random, writes :data:`METRICS_FILE`, and also runs data-parallel on CPUs.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with two changes: DDP gets no device_ids for a CPU model
        # (DistributedDataParallel rejects them, and d2 passes [local_rank]), and the
        # checkpointer checks that MODEL.WEIGHTS covers the whole backbone.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        ddp_kwargs = {"device_ids": None} if model.device.type == "cpu" else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = BackboneCheckingCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """Chosen by the dataset's ``evaluator_type`` metadata, not by its name."""
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise UserError(
            f"no evaluator for test dataset {dataset_name!r}: its metadata "
            f"evaluator_type is {evaluator_type!r}, this tool evaluates 'pascal_voc'"
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, then AP/AP50/AP75 per dataset printed and written to JSON."""
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            # DefaultTrainer.test unwraps the results of a single dataset.
            single = len(cfg.DATASETS.TEST) == 1
            write_metrics({cfg.DATASETS.TEST[0]: results} if single else results, cfg.OUTPUT_DIR)
        return results


def box_metrics(results):
    """``{dataset: {"AP", "AP50", "AP75"}}`` from the evaluators' ``{dataset: {"bbox": ...}}``."""
    return {
        name: {key: float(res["bbox"][key]) for key in METRIC_NAMES}
        for name, res in results.items()
    }


def write_metrics(results, output_dir):
    """Log AP, AP50, AP75 per test dataset and write them to ``output_dir/metrics_voc.json``."""
    metrics = box_metrics(results)
    for name, values in metrics.items():
        logger.info("%s: %s", name, "  ".join(f"{k} {v:.2f}" for k, v in values.items()))
    if output_dir:
        path = os.path.join(output_dir, METRICS_FILE)
        atomic_write_text(json.dumps(metrics, indent=2) + "\n", path)
        logger.info("AP, AP50, AP75 written to %s", path)
    return metrics
