"""tools/run_trials.py: N real fine-tuning runs, mean ± std from their JSON files, resume."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from transfer_tiny import TINY_OPTS

from moco_d2.detection import trials
from moco_d2.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trials_command(out, num_trials, voc_root, weights, *extra):
    command = [
        sys.executable,
        os.path.join(REPO, "tools", "run_trials.py"),
        "--config-file",
        os.path.join(REPO, "configs", "voc_R50_C4.yaml"),
        "--num-trials",
        str(num_trials),
        "--output-dir",
        str(out),
        "--reference",
        "MoCo v2 200ep",
        "MODEL.WEIGHTS",
        str(weights),
        "SOLVER.MAX_ITER",
        "2",
        *TINY_OPTS,
        *extra,
    ]
    return command, dict(os.environ, DETECTRON2_DATASETS=str(voc_root))


def _run_trials(out, num_trials, voc_root, weights, *extra):
    command, env = _trials_command(out, num_trials, voc_root, weights, *extra)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_two_trials_resume_and_aggregate(
    tmp_path,
    synthetic_voc_root,  # noqa: F811
    converted_weights,
):  # noqa: F811
    out = tmp_path / "trials"
    first = _run_trials(out, 1, synthetic_voc_root, converted_weights)
    assert first.returncode == 0, first.stderr[-3000:]
    trial0 = out / "trial_0" / "metrics_voc.json"
    stamp = os.stat(trial0).st_mtime_ns

    # Asking for 2 trials finishes the set: trial 0 is reused, only trial 1 runs.
    second = _run_trials(out, 2, synthetic_voc_root, converted_weights)
    assert second.returncode == 0, second.stderr[-3000:]
    assert os.stat(trial0).st_mtime_ns == stamp
    assert "trial 0 already done" in second.stderr + second.stdout

    per_trial = []
    for index, seed in enumerate((0, 1)):
        directory = out / f"trial_{index}"
        with open(directory / "metrics_voc.json") as f:
            per_trial.append(json.load(f)["voc_2007_test"])
        # Each trial really ran with its own seed.
        assert f"SEED: {seed}" in (directory / "config.yaml").read_text()

    summary = json.loads((out / "trials_summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    for name in ("AP", "AP50", "AP75"):
        values = np.array([trial[name] for trial in per_trial])
        assert summary["summary"][name]["mean"] == pytest.approx(values.mean())
        assert summary["summary"][name]["std"] == pytest.approx(values.std(ddof=1))
    markdown = (out / "trials_summary.md").read_text()
    assert "mean ± std (2 trials)" in markdown and "published: MoCo v2 200ep" in markdown
    assert markdown in second.stdout
    assert summary["fingerprint"]["weights_sha256"] == trials.sha256_of(str(converted_weights))
    assert "OUTPUT_DIR" not in summary["fingerprint"]["config"]

    # Other weights, or another override, must not be mixed into this set.
    other = tmp_path / "other.pkl"
    other.write_bytes(converted_weights.read_bytes() + b" ")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for weights, extra in ((other, ()), (converted_weights, ("SOLVER.BASE_LR", "0.5"))):
        mixed = _run_trials(out, 2, synthetic_voc_root, weights, *extra)
        assert mixed.returncode == 2 and "Traceback" not in mixed.stderr, mixed.stderr[-3000:]
        line = mixed.stderr.strip().splitlines()[-1]
        assert "holds trials of other settings" in line and "--restart" in line, line
        assert ("weights_sha256" if weights == other else "SOLVER.BASE_LR") in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_trial_killed_after_its_first_checkpoint_is_resumed_by_a_rerun(
    tmp_path, synthetic_voc_root, converted_weights
):
    """SIGKILL to run_trials and its trial process once the trial has checkpointed iteration
    0 of 2; the same command again resumes that trial from its checkpoint and finishes."""
    out = tmp_path / "trials"
    command, env = _trials_command(out, 1, synthetic_voc_root, converted_weights)
    command += ["SOLVER.CHECKPOINT_PERIOD", "1"]
    victim = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    last = out / "trial_0" / "last_checkpoint"  # written after the checkpoint it names
    deadline = time.monotonic() + 300
    while not last.exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{last} never appeared"
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)  # the trial is a child process: kill the group
    victim.communicate()
    assert last.read_text() == "model_0000000.pth", f"killed too late: {last.read_text()}"

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming trial in" in rerun.stderr + rerun.stdout
    log = (out / "trial_0" / "log.txt").read_text()
    assert "Starting training from iteration 1" in log
    trial = trials.read_trial_metrics(str(out / "trial_0" / "metrics_voc.json"))
    assert all(math.isfinite(trial[name]) for name in ("AP", "AP50", "AP75")), trial
    summary = json.loads((out / "trials_summary.json").read_text())
    assert summary["seeds"] == [0] and summary["summary"]["AP"]["mean"] == trial["AP"]


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


def test_summary_statistics_against_known_values():
    per_trial = [
        {"AP": 50.0, "AP50": 80.0, "AP75": 55.0},
        {"AP": 52.0, "AP50": 82.0, "AP75": 59.0},
        {"AP": 54.0, "AP50": 81.0, "AP75": 57.0},
    ]
    summary = trials.summarize(per_trial)
    assert summary["AP"] == {"mean": 52.0, "std": 2.0, "n": 3}
    assert summary["AP50"] == {"mean": 81.0, "std": 1.0, "n": 3}
    assert summary["AP75"] == {"mean": 57.0, "std": 2.0, "n": 3}
    assert trials.summarize(per_trial[:1])["AP"] == {"mean": 50.0, "std": 0.0, "n": 1}


def test_unreadable_trial_metrics_is_a_user_error(tmp_path):
    path = tmp_path / "metrics_voc.json"
    path.write_text("{not json")
    with pytest.raises(trials.UserError, match="cannot read trial metrics"):
        trials.read_trial_metrics(str(path))


def test_fingerprint_of_an_older_version_without_datasets_is_refused(tmp_path):
    current = {"weights_sha256": "ab", "config": {}, "datasets": {"train": {}, "test": {}}}
    older = {"weights_sha256": "ab", "config": {}}
    (tmp_path / trials.FINGERPRINT_JSON).write_text(json.dumps(older))
    with pytest.raises(UserError, match="fingerprinted without their datasets.*--restart"):
        trials.claim_output_dir(str(tmp_path), current, restart=False)
    trials.claim_output_dir(str(tmp_path), current, restart=True)
    assert json.loads((tmp_path / trials.FINGERPRINT_JSON).read_text()) == current


def test_trials_on_a_tree_with_another_split_are_refused(
    tmp_path, synthetic_voc_root, converted_weights
):
    from moco_d2.detection.data.voc import register_all_voc

    other = tmp_path / "other_voc"
    shutil.copytree(synthetic_voc_root, other)
    split = other / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    split.write_text("\n".join(split.read_text().split()[:-1]) + "\n")
    out = tmp_path / "trials"
    opts = ["MODEL.WEIGHTS", str(converted_weights), "SOLVER.MAX_ITER", "2", *TINY_OPTS]
    # The set as a first run on the original tree claims it.
    register_all_voc(str(synthetic_voc_root))
    try:
        first = trials.fingerprint(os.path.join(REPO, "configs", "voc_R50_C4.yaml"), opts)
    finally:
        register_all_voc()
    assert first["datasets"]["test"] == {
        "voc_2007_test": trials.sha256_of(
            str(synthetic_voc_root / "VOC2007" / "ImageSets" / "Main" / "test.txt")
        )
    }
    trials.claim_output_dir(str(out), first, restart=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = _run_trials(out, 1, other, converted_weights)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert "holds trials of other settings (datasets.test.voc_2007_test differ" in line, line
    assert "--restart" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
