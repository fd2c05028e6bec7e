"""Detectron2's DefaultTrainer adapted to the VOC and COCO transfer protocols on GPUs and CPUs."""

import json
import logging
import math
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
from moco_d2.detection.checkpoint import BackboneCheckingCheckpointer
from moco_d2.detection.evaluation import COCODetectionEvaluator, VOCDetectionEvaluator
from moco_d2.detection.images import CheckedDatasetMapper
from moco_d2.detection.launch import EveryRankError
from moco_d2.errors import UserError
from moco_d2.health import HealthMonitor
from moco_d2.io import atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics_voc.json"
METRIC_NAMES = ("AP", "AP50", "AP75")
COCO_METRICS_FILE = "metrics_coco.json"
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The metrics file each evaluator_type writes, in the run's OUTPUT_DIR.
METRICS_FILES = {"pascal_voc": METRICS_FILE, "coco": COCO_METRICS_FILE}
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
        """EveryRankError past a bound of :mod:`moco_d2.health`; else the largest
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

    def _diverged(self, what: str) -> EveryRankError:
        lr = self.optimizer.param_groups[0]["lr"]
        last = self.checkpointer.get_checkpoint_file()
        kept = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written"
        return EveryRankError(
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
            per_dataset = {cfg.DATASETS.TEST[0]: results} if single else results
            undefined = {
                name: getattr(evaluator, "undefined", [])
                for name, evaluator in zip(cfg.DATASETS.TEST, evaluators, strict=True)
            }
            by_type = {}
            for name, res in per_dataset.items():
                by_type.setdefault(MetadataCatalog.get(name).get("evaluator_type"), {})[name] = res
            if "pascal_voc" in by_type:
                write_metrics(by_type["pascal_voc"], cfg.OUTPUT_DIR, undefined)
            if "coco" in by_type:
                tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
                write_coco_metrics(by_type["coco"], cfg.OUTPUT_DIR, tasks, undefined)
        return results


def _metric_key(entry: dict) -> tuple[str, str]:
    """``(task, key in the evaluator's results)`` of an ``undefined`` entry."""
    cls = entry.get("class")
    return entry["task"], entry["metric"] + (f"-{cls}" if cls else "")


def checked_values(
    name: str, task: str, values: dict, keys: list[str], undefined: list[dict]
) -> dict[str, float | None]:
    """``{key: value}``, None for a metric listed as undefined; any other non-finite value
    stops with the dataset named ("finite is not healthy")."""
    missing = {_metric_key(entry) for entry in undefined}
    checked, bad = {}, []
    for key in keys:
        value = float(values[key])
        if (task, key) in missing:
            checked[key] = None
        elif math.isfinite(value):
            checked[key] = value
        else:
            bad.append(key)
    if bad:
        raise RuntimeError(
            f"{name}: {task} {', '.join(bad)} not finite although the test set has ground "
            "truth for it (NaN detections from a diverged model?)"
        )
    return checked


def _format(values: dict, keys: tuple[str, ...]) -> str:
    return "  ".join(f"{k} {'n/a' if values[k] is None else f'{values[k]:.2f}'}" for k in keys)


def log_undefined(name: str, undefined: list[dict], path: str) -> None:
    """One line per reason, in words: which metrics are undefined, written as null."""
    by_reason = {}
    for entry in undefined:
        group = by_reason.setdefault(entry["reason"], ({}, {}, {}))
        for names, key in zip(group, ("task", "metric", "class"), strict=True):
            if key in entry:
                names[entry[key]] = None  # an ordered set
    for reason, (tasks, metrics, classes) in by_reason.items():
        of = f" of {len(classes)} classes ({', '.join(classes)})" if classes else ""
        logger.warning(
            "%s: %s %s%s undefined, null in %s: %s",
            name,
            ", ".join(tasks),
            ", ".join(metrics),
            of,
            path or "the results",
            reason,
        )


def box_metrics(results: dict, undefined: dict[str, list[dict]] | None = None) -> dict:
    """``{dataset: {"AP", "AP50", "AP75", "per_class": {class: {...}}, "undefined": [...]}}``
    from the evaluators' ``{dataset: {"bbox": ...}}``; undefined values are None."""
    metrics = {}
    for name, res in results.items():
        missing = (undefined or {}).get(name, [])
        box = res["bbox"]
        classes = [key[len("AP50-") :] for key in box if key.startswith("AP50-")]
        keys = list(METRIC_NAMES) + [f"{m}-{c}" for c in classes for m in METRIC_NAMES]
        values = checked_values(name, "bbox", box, keys, missing)
        metrics[name] = {key: values[key] for key in METRIC_NAMES}
        if classes:
            metrics[name]["per_class"] = {
                c: {m: values[f"{m}-{c}"] for m in METRIC_NAMES} for c in classes
            }
        metrics[name]["undefined"] = missing
    return metrics


def write_metrics(
    results: dict, output_dir: str, undefined: dict[str, list[dict]] | None = None
) -> dict:
    """Log AP, AP50, AP75 per test dataset and write them to ``output_dir/metrics_voc.json``."""
    metrics = box_metrics(results, undefined)
    path = os.path.join(output_dir, METRICS_FILE) if output_dir else ""
    for name, values in metrics.items():
        logger.info("%s: %s", name, _format(values, METRIC_NAMES))
        log_undefined(name, values["undefined"], path)
    if output_dir:
        atomic_write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", path)
        logger.info("AP, AP50, AP75 written to %s", path)
    return metrics


def coco_metrics(
    results: dict,
    tasks: tuple[str, ...] = ("bbox", "segm"),
    undefined: dict[str, list[dict]] | None = None,
) -> dict:
    """``{dataset: {"AP", ..., "APl", "segm": {"AP", ..., "APl"}, "undefined": [...]}}``: box
    AP at the top, as in the VOC file, and one block per further task; undefined values are
    None, a missing task or any other non-finite value stops with the dataset named.
    """
    metrics = {}
    for name, res in results.items():
        missing = (undefined or {}).get(name, [])
        blocks = {}
        for task in tasks:
            if not res.get(task):
                raise RuntimeError(
                    f"{name}: the COCO evaluator returned no {task} AP (no test images?)"
                )
            blocks[task] = checked_values(name, task, res[task], COCO_METRIC_NAMES, missing)
        metrics[name] = {**blocks.pop("bbox"), **blocks, "undefined": missing}
    return metrics


def write_coco_metrics(
    results: dict,
    output_dir: str,
    tasks: tuple[str, ...] = ("bbox", "segm"),
    undefined: dict[str, list[dict]] | None = None,
) -> dict:
    """Log box and mask AP per COCO test dataset; write them to ``output_dir/metrics_coco.json``."""
    metrics = coco_metrics(results, tasks, undefined)
    path = os.path.join(output_dir, COCO_METRICS_FILE) if output_dir else ""
    for name, values in metrics.items():
        for task in tasks:
            block = values if task == "bbox" else values[task]
            logger.info("%s %s: %s", name, task, _format(block, COCO_METRIC_NAMES))
        log_undefined(name, values["undefined"], path)
    if output_dir:
        atomic_write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", path)
        logger.info("COCO %s AP written to %s", " and ".join(tasks), path)
    return metrics
