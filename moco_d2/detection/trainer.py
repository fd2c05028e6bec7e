"""Detectron2's DefaultTrainer adapted to the VOC and COCO transfer protocols on GPUs and CPUs."""

import logging
import os
import sys
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from moco_d2.detection import compat
from moco_d2.detection.checkpoint import BackboneCheckingCheckpointer, input_record
from moco_d2.detection.evaluation import (
    COCODetectionEvaluator,
    VOCDetectionEvaluator,
    write_metrics,
)
from moco_d2.detection.images import CheckedDatasetMapper
from moco_d2.errors import TrainingDiverged, UserError
from moco_d2.health import HealthMonitor

logger = logging.getLogger(__name__)

# TrainerBase.train logs every exception that ends the loop with its traceback, on this logger.
TRAIN_LOOP_LOGGER = "detectron2.engine.train_loop"


class UserErrorTracebackFilter(logging.Filter):
    """Drops the train loop's "Exception during training:" record when the exception is a
    UserError: the tool reports that as one line, and the traceback before it is noise. Any
    other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(error, UserError) and record.getMessage() == "Exception during training:"
        )


_USER_ERROR_TRACEBACK_FILTER = UserErrorTracebackFilter()


class Trainer(compat.InnerTrainerState, DefaultTrainer):
    """DefaultTrainer that picks evaluators from dataset metadata, refuses weights that leave
    the backbone random, writes :data:`METRICS_FILES`, and also runs data-parallel on CPUs.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with two changes: DDP gets no device_ids for a CPU model
        # (DistributedDataParallel rejects them, and d2 passes [local_rank]), and the
        # checkpointer checks that MODEL.WEIGHTS covers the whole backbone.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        logging.getLogger(TRAIN_LOOP_LOGGER).addFilter(_USER_ERROR_TRACEBACK_FILTER)
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
        self.checkpointer.input_record = input_record(cfg)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False)
        )

    def before_train(self) -> None:
        # Built here, not in __init__, so that the reference norms are those of the loaded
        # MODEL.WEIGHTS (or the resumed checkpoint): the start of this fine-tuning.
        self.health = HealthMonitor(self.model)
        super().before_train()

    def run_step(self) -> None:
        """One step; a non-finite loss, or weights or BN statistics that the step made
        non-finite or exploded, stop the run before any hook (PreciseBN, the checkpointer,
        evaluation) sees the broken model. One host sync, agreed by every process."""
        try:
            super().run_step()
        except FloatingPointError:  # detectron2's check of the loss, on the main process
            raise self._diverged("the loss or the model's outputs became NaN or infinite") from None
        self.check_health()

    def check_health(self) -> None:
        """TrainingDiverged past a bound of :mod:`moco_d2.health`; else the largest
        weight-norm ratio and BN running_var go to the event storage (metrics.json)."""
        reading = self.health.measure()
        problem = reading.problem()
        if problem:
            raise self._diverged(problem)
        self.storage.put_scalars(
            health_max_weight_ratio=reading.ratio,
            health_max_bn_running_var=reading.var,
            smoothing_hint=False,
        )

    def _diverged(self, what: str) -> TrainingDiverged:
        lr = self.optimizer.param_groups[0]["lr"]
        last = self.checkpointer.get_checkpoint_file()
        kept = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written"
        return TrainingDiverged(
            f"training diverged at iteration {self.iter + 1} of {self.max_iter} (learning rate "
            f"{lr:g}): {what}; {kept} and nothing of the diverged model was saved; lower "
            "SOLVER.BASE_LR, or check MODEL.WEIGHTS"
        )

    def after_train(self) -> None:
        # TrainerBase.train calls this in a `finally`: with an exception in flight the model
        # may be broken or the disk full, so no hook (evaluation, writers) runs on it.
        if sys.exc_info()[1] is None:
            super().after_train()

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        """Chosen by the dataset's ``evaluator_type`` metadata, not by its name."""
        metadata = MetadataCatalog.get(dataset_name)
        evaluator_type = metadata.get("evaluator_type")
        if evaluator_type == "pascal_voc":
            return VOCDetectionEvaluator(dataset_name)
        if evaluator_type == "coco" and metadata.get("json_file"):
            return COCODetectionEvaluator(
                dataset_name,
                tasks=("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
                output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"),
                # The fast COCOeval is detectron2 C++; pycocotools' is the official one.
                use_fast_impl=compat.has_compiled_ops(),
            )
        raise UserError(
            f"no evaluator for test dataset {dataset_name!r}: its metadata "
            f"evaluator_type is {evaluator_type!r}, this tool evaluates 'pascal_voc' and "
            "'coco' (with a json_file)"
        )

    @classmethod
    def test(
        cls,
        cfg: CfgNode,
        model: torch.nn.Module,
        evaluators: DatasetEvaluator | list[DatasetEvaluator] | None = None,
    ) -> dict:
        """DefaultTrainer.test, then the AP metrics per dataset printed and written to JSON;
        a metric an evaluator lists as undefined is written as null, with the reason."""
        if evaluators is None:
            evaluators = [cls.build_evaluator(cfg, name) for name in cfg.DATASETS.TEST]
        elif isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            # DefaultTrainer.test unwraps the results of a single dataset.
            single = len(cfg.DATASETS.TEST) == 1
            undefined = {
                name: getattr(evaluator, "undefined", [])
                for name, evaluator in zip(cfg.DATASETS.TEST, evaluators, strict=True)
            }
            per_dataset = {cfg.DATASETS.TEST[0]: results} if single else results
            write_metrics(per_dataset, cfg.OUTPUT_DIR, cfg.MODEL.MASK_ON, undefined)
        return results
