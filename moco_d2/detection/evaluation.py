"""Detectron2's VOC and COCO evaluators, changed so that the evaluation cannot fail on data the
loader accepted, and so that a metric without ground truth is reported as undefined.

Each evaluator keeps ``undefined``: after ``evaluate()``, one entry per metric that has no
ground truth to be measured against, ``{"metric", "task", "reason"}`` (VOC adds ``"class"``),
its value NaN in the results. Any other non-finite value is a fault the trainer stops on.
With no detections at all, the defined metrics are 0: nothing that exists was found.

The AP computation stays detectron2's (``voc_eval``/``voc_ap``, COCOeval); only where the
ground truth comes from and how undefined values are told apart changes.
"""

import contextlib
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.evaluation import pascal_voc_evaluation as d2_voc
from detectron2.structures import BoxMode
from detectron2.utils import comm

VOC_METRICS = ("AP", "AP50", "AP75")
VOC_THRESHOLDS = range(50, 100, 5)  # IoU in %, as detectron2's evaluator
# COCO metric -> the COCOeval area range label it is computed over.
COCO_AREA_OF_METRIC = {
    "AP": "all",
    "AP50": "all",
    "AP75": "all",
    "APs": "small",
    "APm": "medium",
    "APl": "large",
}


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
    """While it is open, detectron2's ``voc_eval`` reads ``records[image_id]`` as ground truth.

    ``voc_eval`` reads annotations only through its module's ``parse_rec(path)``, a stricter
    XML parser of its own (integer coordinates, required ``<pose>``, ``<truncated>``,
    ``<difficult>``); given the annotation template ``"{}"`` that path is the image id. The
    swap is undone on exit and is the only one in the package; evaluation runs in one thread.
    """
    original = d2_voc.parse_rec
    d2_voc.parse_rec = records.__getitem__
    try:
        yield
    finally:
        d2_voc.parse_rec = original


class VOCDetectionEvaluator(PascalVOCDetectionEvaluator):
    """Detectron2's Pascal VOC evaluator scoring against the dataset's loaded dicts.

    Besides AP, AP50 and AP75 it returns them per class (``"AP50-cat"``). A class with no
    non-difficult ground truth has no AP (NaN, listed in ``undefined``); the means are over
    the classes that have it, as COCOeval averages over categories with ground truth.
    Detectron2's own evaluator counts such a class as 0 instead.
    """

    def reset(self) -> None:
        super().reset()
        self.undefined = []

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
        positives = defaultdict(int)
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
            if not aps:
                self.undefined += [
                    {
                        "metric": metric,
                        "class": name,
                        "task": "bbox",
                        "reason": "no ground-truth object of this class in the test set "
                        "(difficult ones are not scored)",
                    }
                    for metric in VOC_METRICS
                ]
        for metric in VOC_METRICS:
            values = [results[f"{metric}-{name}"] for name in per_class]
            results[metric] = float(np.mean(values)) if values else math.nan
            if not values:
                self.undefined.append(
                    {
                        "metric": metric,
                        "task": "bbox",
                        "reason": "no class has a ground-truth object in the test set",
                    }
                )
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


class COCODetectionEvaluator(COCOEvaluator):
    """Detectron2's COCO evaluator; a metric over an area range without ground truth is
    listed in ``undefined``, and a model with no detections scores 0 where there is ground
    truth (detectron2 gives NaN for every metric then)."""

    def reset(self) -> None:
        super().reset()
        self.undefined = []

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
