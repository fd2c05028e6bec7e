"""Detectron2's VOC and COCO evaluators, changed so that the evaluation cannot fail on data the
loader accepted and a metric without ground truth is reported as undefined; and the metrics
files they lead to.

Each evaluator keeps ``undefined``: after ``evaluate()``, one entry per metric that has no
ground truth to be measured against, ``{"metric", "task", "reason"}`` (VOC adds ``"class"``),
its value NaN in the results and null in the metrics file. Any other non-finite value stops
the run. With no detections at all, the defined metrics are 0. The AP computation stays
detectron2's (``voc_eval``/``voc_ap``, COCOeval).
"""

import contextlib
import logging
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.evaluation import pascal_voc_evaluation as d2_voc
from detectron2.structures import BoxMode
from detectron2.utils import comm

from moco_d2.detection.data.coco import has_segmentation
from moco_d2.io import atomic_write_json

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75")
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
METRICS_FILE = "metrics_voc.json"
COCO_METRICS_FILE = "metrics_coco.json"
# The metrics file of each evaluator_type, in the run's OUTPUT_DIR.
METRICS_FILES = {"pascal_voc": METRICS_FILE, "coco": COCO_METRICS_FILE}
VOC_THRESHOLDS = range(50, 100, 5)  # IoU in %, as detectron2's evaluator
_NO_CLASS_TRUTH = (
    "no ground-truth object of this class in the test set (difficult ones are not scored)"
)
# COCO metric -> the COCOeval area range it is computed over.
COCO_AREA_OF_METRIC = dict(
    zip(COCO_METRIC_NAMES, ("all", "all", "all", "small", "medium", "large"))
)


def voc_records(dataset_dicts: list[dict], class_names: list[str]) -> dict[str, list[dict]]:
    """``{image_id: objects}`` in ``voc_eval``'s form (class name, 1-based box, difficult),
    from the dataset's own dicts: the inverse of the loader's 0-based shift, as detectron2's
    evaluator applies to the detections."""
    records = {}
    for d in dataset_dicts:
        objects = []
        for ann in d.get("annotations", []):
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            objects.append(
                {
                    "name": class_names[ann["category_id"]],
                    "bbox": [x0 + 1.0, y0 + 1.0, x1, y1],
                    "difficult": int(ann.get("difficult", 0)),
                }
            )
        records[str(d["image_id"])] = objects
    return records


@contextlib.contextmanager
def voc_eval_ground_truth(records: dict[str, list[dict]]) -> Iterator[None]:
    """While open, ``voc_eval`` reads ``records[image_id]`` as ground truth instead of calling
    ``parse_rec``, a stricter XML parser than the loader's (integer coordinates, required
    ``<pose>``...): with the annotation template ``"{}"`` its path is the image id."""
    original = d2_voc.parse_rec
    d2_voc.parse_rec = records.__getitem__
    try:
        yield
    finally:
        d2_voc.parse_rec = original


class VOCDetectionEvaluator(PascalVOCDetectionEvaluator):
    """Detectron2's Pascal VOC evaluator scoring against the dataset's loaded dicts, also per
    class (``"AP50-cat"``). A class without non-difficult ground truth has no AP (undefined, not
    detectron2's 0), and the means are over the others, as COCOeval's are."""

    def reset(self) -> None:
        super().reset()
        self.undefined: list[dict] = []

    def _gathered_predictions(self) -> dict[int, list[str]] | None:
        per_rank = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        predictions = defaultdict(list)
        for rank_predictions in per_rank:
            for cls_id, lines in rank_predictions.items():
                predictions[cls_id].extend(lines)
        return predictions

    def evaluate(self) -> dict | None:
        predictions = self._gathered_predictions()
        if predictions is None:
            return None
        records = voc_records(DatasetCatalog.get(self._dataset_name), self._class_names)
        positives: defaultdict[str, int] = defaultdict(int)
        for objects in records.values():
            for obj in objects:
                positives[obj["name"]] += not obj["difficult"]
        self._logger.info(
            "Evaluating %s with the VOC%d metric, ground truth as loaded by the dataset",
            self._dataset_name,
            2007 if self._is_2007 else 2012,
        )
        per_class = {}
        with tempfile.TemporaryDirectory(prefix="pascal_voc_eval_") as tmp:
            image_set = os.path.join(tmp, "image_set.txt")
            with open(image_set, "w") as f:
                f.writelines(image_id + "\n" for image_id in records)
            detections = os.path.join(tmp, "{}.txt")
            with voc_eval_ground_truth(records):
                for cls_id, name in enumerate(self._class_names):
                    if positives[name]:
                        with open(detections.format(name), "w") as f:
                            f.write("\n".join(predictions.get(cls_id, [])))
                        per_class[name] = {
                            t: 100
                            * d2_voc.voc_eval(
                                detections, "{}", image_set, name, t / 100, self._is_2007
                            )[2]
                            for t in VOC_THRESHOLDS
                        }
        return {"bbox": self._summarize(per_class)}

    def _summarize(self, per_class: dict[str, dict[int, float]]) -> dict[str, float]:
        """Means over the classes with ground truth; per-class values; ``undefined`` filled."""
        results = {}
        for name in self._class_names:
            aps = per_class.get(name)
            results[f"AP-{name}"] = float(np.mean(list(aps.values()))) if aps else math.nan
            results[f"AP50-{name}"] = aps[50] if aps else math.nan
            results[f"AP75-{name}"] = aps[75] if aps else math.nan
            self.undefined += [
                {"metric": metric, "class": name, "task": "bbox", "reason": _NO_CLASS_TRUTH}
                for metric in METRIC_NAMES
                if not aps
            ]
        for metric in METRIC_NAMES:
            values = [results[f"{metric}-{name}"] for name in per_class]
            results[metric] = float(np.mean(values)) if values else math.nan
            if not values:
                reason = "no class has a ground-truth object in the test set"
                self.undefined.append({"metric": metric, "task": "bbox", "reason": reason})
        return results


def coco_ground_truth_areas(coco_api, iou_type: str) -> dict[str, bool]:
    """``{area range label: has ground truth}`` under COCOeval's rules: crowd regions are
    ignored and an object counts in a range when its ``area`` lies within it (bounds
    included). The ranges are pycocotools' own."""
    from pycocotools.cocoeval import Params

    params = Params(iouType=iou_type)
    areas = [a["area"] for a in coco_api.dataset.get("annotations", []) if not a.get("iscrowd")]
    return {
        label: any(lo <= area <= hi for area in areas)
        for label, (lo, hi) in zip(params.areaRngLbl, params.areaRng, strict=True)
    }


def settle_annotations(coco_api: Any) -> None:
    """Give each ground-truth annotation the ``iscrowd`` and ``area`` COCOeval reads, where the
    file (a labelme or hand-written one) leaves them out: iscrowd 0, and the area of the
    segmentation (the polygons the loader keeps), else of the box, as pycocotools' ``loadRes``
    computes a detection's."""
    from pycocotools import mask

    for ann in coco_api.dataset.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        if "area" in ann:
            continue
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            segmentation = [p for p in segmentation if has_segmentation([p])]
        if has_segmentation(segmentation):
            rle = coco_api.annToRLE({**ann, "segmentation": segmentation})
            ann["area"] = float(mask.area(rle))
        else:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])


class COCODetectionEvaluator(COCOEvaluator):
    """Detectron2's COCO evaluator, with the missing ``iscrowd`` and ``area`` of the ground truth
    filled; a metric over an area range without ground truth is listed in ``undefined``, and a
    model with no detections scores 0 where there is ground truth (detectron2 gives NaN for
    every metric then)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settle_annotations(self._coco_api)

    def reset(self) -> None:
        super().reset()
        self.undefined: list[dict] = []

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        has_ground_truth = coco_ground_truth_areas(self._coco_api, iou_type)
        for metric, area in COCO_AREA_OF_METRIC.items():
            if metric not in results or math.isfinite(results[metric]):
                continue
            if not has_ground_truth[area]:
                reason = (
                    "no ground-truth objects (crowd regions are not scored)"
                    if area == "all"
                    else f"no ground-truth objects in this area range ({area})"
                )
                self.undefined.append({"metric": metric, "task": iou_type, "reason": reason})
            elif coco_eval is None:
                results[metric] = 0.0
        return results


def checked_values(
    name: str, task: str, values: dict, keys: list[str], undefined: list[dict]
) -> dict[str, float | None]:
    """``{key: value}``, None for a metric listed as undefined; any other non-finite value
    stops with the dataset named ("finite is not healthy")."""
    # (task, key in the evaluator's results) of each undefined metric
    missing = {
        (u["task"], u["metric"] + (f"-{u['class']}" if "class" in u else "")) for u in undefined
    }
    checked: dict[str, float | None] = {}
    bad = []
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


def metrics(
    results: dict,
    evaluator_type: str,
    tasks: tuple[str, ...] = ("bbox",),
    undefined: dict[str, list[dict]] | None = None,
) -> dict:
    """``{dataset: {"AP", ..., "segm": {...}, "per_class": {...}, "undefined": [...]}}`` from the
    evaluators' ``{dataset: {task: ...}}``: box AP at the top, a block per further task, VOC's
    values per class; undefined values are None."""
    names = METRIC_NAMES if evaluator_type == "pascal_voc" else COCO_METRIC_NAMES
    found = {}
    for name, res in results.items():
        missing = (undefined or {}).get(name, [])
        blocks: dict[str, dict[str, Any]] = {}
        for task in tasks:
            if not res.get(task):
                raise RuntimeError(f"{name}: the evaluator returned no {task} AP (no test images?)")
            classes = [key[len("AP50-") :] for key in res[task] if key.startswith("AP50-")]
            keys = list(names) + [f"{m}-{c}" for c in classes for m in names]
            values = checked_values(name, task, res[task], keys, missing)
            blocks[task] = {key: values[key] for key in names}
            if classes:
                blocks[task]["per_class"] = {
                    c: {m: values[f"{m}-{c}"] for m in names} for c in classes
                }
        found[name] = {**blocks.pop("bbox"), **blocks, "undefined": missing}
    return found


def _format(values: dict, keys: tuple[str, ...]) -> str:
    return "  ".join(f"{k} {'n/a' if values[k] is None else f'{values[k]:.2f}'}" for k in keys)


def log_undefined(name: str, undefined: list[dict], path: str) -> None:
    """One line per reason, in words: which metrics are undefined, written as null."""
    by_reason: dict[str, tuple[dict, dict, dict]] = {}
    for entry in undefined:
        group = by_reason.setdefault(entry["reason"], ({}, {}, {}))
        for names, key in zip(group, ("task", "metric", "class"), strict=True):
            if key in entry:
                names[entry[key]] = None  # an ordered set
    where = path or "the results"
    for reason, (tasks, names, classes) in by_reason.items():
        of = f" of {len(classes)} classes ({', '.join(classes)})" if classes else ""
        what = f"{', '.join(tasks)} {', '.join(names)}{of}"
        logger.warning("%s: %s undefined, null in %s: %s", name, what, where, reason)


def write_metrics(
    results: dict,
    output_dir: str,
    masks: bool = False,
    undefined: dict[str, list[dict]] | None = None,
) -> None:
    """Log the AP metrics of each test dataset and write them to ``output_dir``'s
    :data:`METRICS_FILES`, one file per evaluator_type; ``masks``: COCO's mask AP too."""
    for evaluator_type, file_name in METRICS_FILES.items():
        chosen = {
            name: res
            for name, res in results.items()
            if MetadataCatalog.get(name).get("evaluator_type") == evaluator_type
        }
        if not chosen:
            continue
        voc = evaluator_type == "pascal_voc"
        tasks = ("bbox", "segm") if masks and not voc else ("bbox",)
        found = metrics(chosen, evaluator_type, tasks, undefined)
        names = METRIC_NAMES if voc else COCO_METRIC_NAMES
        path = os.path.join(output_dir, file_name) if output_dir else ""
        for name, values in found.items():
            for task in tasks:
                label = name if voc else f"{name} {task}"
                logger.info("%s: %s", label, _format(values.get(task, values), names))
            log_undefined(name, values["undefined"], path)
        if output_dir:
            atomic_write_json(found, path)
            what = ", ".join(names) if voc else f"COCO {' and '.join(tasks)} AP"
            logger.info("%s written to %s", what, path)
