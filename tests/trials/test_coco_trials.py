"""tools/run_trials.py over COCO trials: box and mask metrics aggregated from metrics_coco.json."""

import json

import coco_tiny
import numpy as np
import pytest

from moco_d2.detection import trials
from moco_d2.detection.data.coco import register_all_coco
from moco_d2.detection.evaluation import COCO_METRIC_NAMES, COCO_METRICS_FILE
from moco_d2.errors import UserError


def _write_trial(directory, box, segm):
    directory.mkdir(parents=True)
    metrics = {
        "coco_2017_val": {
            **dict(zip(COCO_METRIC_NAMES, box)),
            "segm": dict(zip(COCO_METRIC_NAMES, segm)),
        }
    }
    (directory / COCO_METRICS_FILE).write_text(json.dumps(metrics))


def test_finished_coco_trials_aggregate_box_and_mask(tmp_path):
    box = [[40.0, 60.0, 43.0, 22.0, 44.0, 55.0], [41.0, 61.0, 44.5, 23.0, 45.0, 57.0]]
    segm = [[35.0, 57.0, 37.0, 16.0, 37.0, 52.0], [35.5, 58.0, 38.0, 17.0, 38.0, 51.0]]
    opts = ("MODEL.WEIGHTS", "")
    out = tmp_path / "trials"
    # The fingerprint hashes the annotation files of the registered COCO names.
    coco_tiny.make_synthetic_coco(tmp_path / "data", num_train=1, num_val=1)
    register_all_coco(str(tmp_path / "data"))
    try:
        # As a first run would: the set's fingerprint, then two finished trials.
        trials.claim_output_dir(
            str(out), trials.fingerprint("configs/coco_R50_C4_2x.yaml", opts), restart=False
        )
        for index in range(2):
            _write_trial(out / f"trial_{index}", box[index], segm[index])
        # Both trials are done, so nothing is trained: the summary comes from their files.
        result, markdown = trials.run_trials("configs/coco_R50_C4_2x.yaml", str(out), 2, opts=opts)
    finally:
        register_all_coco()
    val_json = tmp_path / "data" / "coco" / "annotations" / "instances_val2017.json"
    assert result["fingerprint"]["datasets"]["test"] == {
        "coco_2017_val": trials.sha256_of(str(val_json))
    }
    summary = result["summary"]
    for block, values in ((summary, np.array(box)), (summary["segm"], np.array(segm))):
        assert [name for name in block if name != "segm"] == list(COCO_METRIC_NAMES)
        for column, name in enumerate(COCO_METRIC_NAMES):
            assert block[name]["mean"] == pytest.approx(values[:, column].mean())
            assert block[name]["std"] == pytest.approx(values[:, column].std(ddof=1))
    lines = markdown.splitlines()
    assert lines[0] == (
        "| run | box AP | box AP50 | box AP75 | box APs | box APm | box APl | mask AP | mask AP50 "
        "| mask AP75 | mask APs | mask APm | mask APl |"
    )
    assert lines[1] == "|---|" + "---|" * 12
    assert lines[2] == "| trial 0 | " + " | ".join(f"{v:.2f}" for v in box[0] + segm[0]) + " |"
    assert lines[4].startswith("| **mean ± std (2 trials)** | **40.50 ± 0.71** |")
    # The published row is VOC's; it is not printed under COCO numbers.
    assert len(lines) == 5 and "published" not in markdown
    saved = json.loads((out / trials.SUMMARY_JSON).read_text())
    assert saved["trials"][1]["segm"]["APl"] == 51.0


def test_coco_trial_without_a_mask_metric_is_a_user_error(tmp_path):
    _write_trial(tmp_path / "trial_0", [1.0] * 6, [1.0] * 5)
    path = tmp_path / "trial_0" / COCO_METRICS_FILE
    assert trials.trial_metrics_path(str(tmp_path / "trial_0")) == str(path)
    with pytest.raises(UserError, match=f"{path}: missing or bad metric 'APl'"):
        trials.read_trial_metrics(str(path))


def test_undefined_metrics_average_over_the_trials_that_have_them(tmp_path):
    """null (an area range without ground truth) is left out of the mean; n/a when in none."""
    box = [[40.0, 60.0, 43.0, 22.0, 44.0, None], [42.0, 62.0, 45.0, 24.0, 46.0, 50.0]]
    segm = [[35.0, 57.0, 37.0, 16.0, 37.0, None], [37.0, 59.0, 39.0, 18.0, 39.0, None]]
    for index in range(2):
        _write_trial(tmp_path / f"trial_{index}", box[index], segm[index])
    per_trial = [
        trials.read_trial_metrics(str(tmp_path / f"trial_{i}" / COCO_METRICS_FILE))
        for i in range(2)
    ]
    assert per_trial[0]["APl"] is None and per_trial[1]["APl"] == 50.0
    summary = trials.summarize(per_trial)
    assert summary["AP"] == {"mean": 41.0, "std": pytest.approx(2**0.5), "n": 2}
    assert summary["APl"] == {"mean": 50.0, "std": 0.0, "n": 1}
    assert summary["segm"]["APl"] == {"mean": None, "std": None, "n": 0}
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN stands in for "undefined"
    markdown = trials.format_markdown(per_trial, summary, reference=None)
    rows = [line.split(" | ") for line in markdown.splitlines()]
    assert rows[2][6] == "n/a" and rows[3][6] == "50.00"  # box APl per trial
    assert rows[4][6] == "**50.00 ± 0.00** (1 of 2)"
    assert rows[4][12] == "n/a |"  # mask APl, last column
