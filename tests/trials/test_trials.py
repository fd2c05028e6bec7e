"""tools/run_trials.py: real fine-tuning trials per backbone, the comparison report against an
independent computation, resume, refusals, and a submitit job preempted and requeued."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats
from transfer_tiny import TINY_OPTS

from moco_d2.errors import UserError
from moco_d2.io import sha256_of
from moco_d2.trials import main as trials
from tools import REPO, assert_error, snapshot

CONFIG = os.path.join(REPO, "configs", "voc_R50_C4.yaml")


def run_trials(out, voc_root, *args, timeout=900):
    command = [
        sys.executable, os.path.join(REPO, "tools", "run_trials.py"), "--config-file", CONFIG,
        "--output-dir", str(out), *map(str, args), "SOLVER.MAX_ITER", "2", *TINY_OPTS,
    ]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=str(voc_root))
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def trial_blocks(row_dir, n):
    blocks = []
    for k in range(n):
        with open(row_dir / f"trial_{k}" / "metrics_voc.json") as f:
            (block,) = json.load(f).values()
        blocks.append(block)
    return blocks


def test_two_backbones_compared_over_two_trials(tmp_path, synthetic_voc_root, converted_weights):
    out = tmp_path / "out"
    weights = ["--weights", f"moco={converted_weights}", "--weights", "random=none"]
    first = run_trials(out, synthetic_voc_root, "--num-trials", "2", *weights)
    assert first.returncode == 0, first.stderr[-3000:]

    report = json.loads((out / "comparison.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["moco", "random"]
    assert report["rows"][1]["weights"] == "none" and report["rows"][0]["n"] == 2
    values = {}
    for row in report["rows"]:
        blocks = trial_blocks(out / row["name"], 2)
        assert "SEED: 1" in (out / row["name"] / "trial_1" / "config.yaml").read_text()
        for metric in ("AP", "AP50", "AP75"):
            found = np.array([b[metric] for b in blocks])
            values[row["name"], metric] = found
            assert row["metrics"][metric]["trials"] == pytest.approx(found.tolist())
            assert row["metrics"][metric]["mean"] == pytest.approx(found.mean())
            assert row["metrics"][metric]["std"] == pytest.approx(found.std(ddof=1))
        person = [b["per_class"]["person"]["AP50"] for b in blocks]
        if None not in person:
            assert row["per_class_ap50"]["person"] == pytest.approx(np.mean(person))
    for pair in report["pairs"]:
        a, b = values["moco", pair["metric"]], values["random", pair["metric"]]
        assert (pair["a"], pair["b"]) == ("moco", "random")
        assert pair["diff"] == pytest.approx(a.mean() - b.mean())
        if a.std() + b.std() > 0:
            low, high = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
            assert pair["ci95"] == pytest.approx([low, high])
        low, high = pair["ci95"]
        expected = "a better" if low > 0 else "b better" if high < 0 else "no difference at 95%"
        assert pair["verdict"] == expected
    markdown = (out / "comparison.md").read_text()
    assert (
        markdown in first.stdout
        and "| published: MoCo v2 200ep | | 57.0 | 82.4 | 63.6 |" in markdown
    )
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun finds every trial done; other weights under a row's name are refused.
    before = snapshot(out / "moco")
    again = run_trials(out, synthetic_voc_root, "--num-trials", "2", *weights)
    assert again.returncode == 0 and "already done" in again.stdout, again.stderr[-3000:]
    other = tmp_path / "other.pkl"
    other.write_bytes(converted_weights.read_bytes() + b" ")
    mixed = run_trials(out, synthetic_voc_root, "--weights", f"moco={other}")
    line = assert_error(mixed)
    assert "holds trials of other settings (" in line and "weights_sha256" in line
    assert snapshot(out / "moco") == before


def _preempt(controller_pid):
    """Send the local job's task SLURM's preemption signal (as tests/pretrain/test_cluster.py)."""
    from submitit import JobEnvironment

    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == controller_pid:
            os.kill(int(stat.split("/")[2]), JobEnvironment._usr_sig())


def test_a_preempted_trial_job_resumes_at_its_last_checkpoint(
    tmp_path, synthetic_voc_root, converted_weights
):
    out = tmp_path / "out"
    command = [
        sys.executable, os.path.join(REPO, "tools", "run_trials.py"), "--config-file", CONFIG,
        "--output-dir", str(out), "--num-trials", "1", "--launch", "local",
        "MODEL.WEIGHTS", str(converted_weights), "SOLVER.MAX_ITER", "8",
        "SOLVER.CHECKPOINT_PERIOD", "1", *TINY_OPTS,
    ]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic_voc_root))
    run = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    trial = out / "trial_0"
    deadline = time.monotonic() + 300
    while not (trial / "last_checkpoint").exists():
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _preempt(int(json.loads((trial / trials.JOB_JSON).read_text())["job_id"]))
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    log = (trial / "log.txt").read_text()
    starts = [
        int(line.rsplit(" ", 1)[1])
        for line in log.splitlines()
        if "Starting training from iteration" in line
    ]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 1, starts  # resumed, not restarted
    report = json.loads((out / "comparison.json").read_text())
    (block,) = json.loads((trial / "metrics_voc.json").read_text()).values()
    assert report["rows"][0]["metrics"]["AP50"]["trials"] == [block["AP50"]]
    assert report["pairs"] == []  # one row: nothing to compare


def test_one_trial_gives_no_interval_and_says_so():
    from moco_d2.trials import compare

    rows = [
        compare.make_row("a", "w", "f", [{"AP": 50.0, "AP50": 80.0, "AP75": 55.0}]),
        compare.make_row("b", "v", "g", [{"AP": 49.0, "AP50": 79.0}, {"AP": 48.0, "AP50": 77.0}]),
    ]
    pairs = compare.make_pairs(rows)
    assert {p["metric"]: p["verdict"] for p in pairs} == {
        "AP": compare.TOO_FEW,
        "AP50": compare.TOO_FEW,
    }
    assert all(p["ci95"] is None for p in pairs)
    markdown = compare.markdown({"rows": rows, "pairs": pairs, "references": []})
    assert "| a | 1 | 50.0 (1 trial) | 80.0 (1 trial) | 55.0 (1 trial) |" in markdown
    assert "| b | 2 | 48.5 ± 0.7 | 78.0 ± 1.4 | n/a |" in markdown


def test_coco_rows_aggregate_box_and_mask_and_undefined_metrics(tmp_path):
    from moco_d2.trials import compare

    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    box = [[40.0, 60.0, 43.0, 22.0, 44.0, None], [42.0, 62.0, 45.0, 24.0, 46.0, 50.0]]
    segm = [[35.0, 57.0, 37.0, 16.0, 37.0, None], [37.0, 59.0, 39.0, 18.0, 39.0, None]]
    blocks = []
    for k in range(2):
        block = {**dict(zip(names, box[k])), "segm": dict(zip(names, segm[k]))}
        (tmp_path / f"t{k}.json").write_text(json.dumps({"coco_2017_val": block}))
        blocks.append(trials.read_trial(str(tmp_path / f"t{k}.json")))
    row = compare.make_row("moco", "w", "f", blocks)
    assert row["metrics"]["AP"]["mean"] == 41.0 and row["metrics"]["AP"]["std"] == pytest.approx(
        2**0.5
    )
    assert row["metrics"]["APl"] == {"trials": [50.0], "mean": 50.0, "std": None}
    assert row["metrics"]["segm/APl"] == {"trials": [], "mean": None, "std": None}
    assert row["metrics"]["segm/AP50"]["mean"] == 58.0
    report = compare.write_report(str(tmp_path), [row], ["MoCo v2 200ep"])
    assert report["references"] == []  # the published rows are VOC's
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN stands in for "undefined"
    assert "| 50.0 (1 of 2 trials) |" in (tmp_path / "comparison.md").read_text()
    (tmp_path / "bad.json").write_text(
        json.dumps({"coco": {**dict(zip(names, box[1])), "segm": {}}})
    )
    with pytest.raises(UserError, match="bad.json: missing or bad metric 'AP'"):
        trials.read_trial(str(tmp_path / "bad.json"))


@pytest.mark.parametrize(
    "weights, says",
    [
        (["moco/v2=x.pkl"], "expected NAME=PATH"),
        (["moco"], "expected NAME=PATH"),
        (["a=missing.pkl"], "no readable file 'missing.pkl'"),
        (["a=none", "a=none"], "two rows are named 'a'"),
    ],
)
def test_bad_rows_are_refused_before_anything_runs(tmp_path, weights, says):
    argv = ["--config-file", CONFIG, "--output-dir", str(tmp_path / "out")]
    argv += [part for item in weights for part in ("--weights", item)]
    args, cluster = trials.parse_args(argv)
    with pytest.raises(UserError, match=says):
        trials.run_trials(args, cluster)
    assert not (tmp_path / "out").exists()


def test_launch_slurm_without_sbatch_is_refused_before_anything_is_built(tmp_path):
    argv = ["--config-file", CONFIG, "--output-dir", str(tmp_path / "out"), "--launch", "slurm"]
    args, cluster = trials.parse_args(argv + ["--weights", "a=none"])
    with pytest.raises(UserError, match="--launch slurm: no sbatch"):
        trials.run_trials(args, cluster)
    assert not (tmp_path / "out").exists()


def test_restart_discards_earlier_trials_and_unfingerprinted_trials_are_refused(tmp_path):
    (tmp_path / "trial_0").mkdir()
    current = {
        "weights_sha256": "ab",
        "config": {"SOLVER": {"BASE_LR": 0.02}},
        "datasets": {"train": {"voc_2007_trainval": "cd"}, "test": {"voc_2007_test": "ef"}},
    }
    with pytest.raises(UserError, match="without a trials_fingerprint.json.*--restart"):
        trials.claim_output_dir(str(tmp_path), current, restart=False)
    trials.claim_output_dir(str(tmp_path), current, restart=True)
    assert os.listdir(tmp_path) == [trials.FINGERPRINT_JSON]
    assert json.loads((tmp_path / trials.FINGERPRINT_JSON).read_text()) == current
    trials.claim_output_dir(str(tmp_path), current, restart=False)  # same settings: fine
    older = {"weights_sha256": "ab", "config": {}}
    (tmp_path / trials.FINGERPRINT_JSON).write_text(json.dumps(older))
    with pytest.raises(UserError, match="fingerprinted without their datasets.*--restart"):
        trials.claim_output_dir(str(tmp_path), current, restart=False)


def test_unreadable_trial_metrics_is_a_user_error(tmp_path):
    path = tmp_path / "metrics_voc.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read trial metrics"):
        trials.read_trial(str(path))


def test_trials_on_other_data_under_the_same_names_are_refused(
    tmp_path, synthetic_voc_root, converted_weights
):
    """VOC: the same image ids with one object annotated otherwise; COCO: the same annotation
    file with an image folder of the same names but other pixels. Either is another fingerprint:
    refused."""
    import coco_tiny

    from moco_d2.detection.data.coco import register_coco_datasets
    from moco_d2.detection.data.voc import register_all_voc

    other = tmp_path / "other_voc"
    shutil.copytree(synthetic_voc_root, other)
    xml = sorted((other / "VOC2007" / "Annotations").glob("*.xml"))[-1]
    text = xml.read_text()
    xml.write_text(text.replace("<truncated>0</truncated>", "<truncated>1</truncated>", 1))
    out = tmp_path / "trials"
    opts = ["MODEL.WEIGHTS", str(converted_weights), "SOLVER.MAX_ITER", "2", *TINY_OPTS]
    register_all_voc(str(synthetic_voc_root))  # the set as a first run on the original tree
    try:
        first = trials.fingerprint(CONFIG, opts)
    finally:
        register_all_voc()
    assert set(first["datasets"]["test"]["voc_2007_test"]) == {"annotations", "images"}
    trials.claim_output_dir(str(out), first, restart=False)
    before = snapshot(out)
    line = assert_error(run_trials(out, other, "MODEL.WEIGHTS", converted_weights))
    assert "(datasets.test.voc_2007_test.annotations differ" in line
    assert snapshot(out) == before

    coco = coco_tiny.make_synthetic_coco(str(tmp_path / "data"), num_train=1, num_val=2)
    val = os.path.join(coco, "coco", "val2017")
    moved = tmp_path / "other_images"
    shutil.copytree(val, moved)
    for image in moved.iterdir():
        image.write_bytes(image.read_bytes() + b"\0")  # other pixels, the same names
    json_file = os.path.join(coco, "coco", "annotations", "instances_val2017.json")
    register_coco_datasets([("mine_val", json_file, val), ("mine_moved", json_file, str(moved))])
    a, b = trials.dataset_fingerprint("mine_val"), trials.dataset_fingerprint("mine_moved")
    assert a["annotations"] == b["annotations"] == sha256_of(json_file)
    assert a["images"] != b["images"]
