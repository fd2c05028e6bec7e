"""The comparison report: each backbone's trials as mean ± std, and whether one backbone beats
another beyond the noise of its trials.

A difference of two rows' means is read through Welch's t interval (unequal variances, the
Welch–Satterthwaite degrees of freedom) at 95%: when the whole interval is above zero the first
row is better, below zero the second, and otherwise the trials cannot tell them apart. A row of
one trial has no spread, so no interval and no verdict.
"""

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from moco_d2.io import atomic_path, atomic_write_json, atomic_write_text
from moco_d2.published import VOC_DETECTION, VOC_DETECTION_SOURCE

COMPARISON = "comparison"  # OUT/comparison.json, .md and .png
A_BETTER, B_BETTER, NO_DIFFERENCE = "a better", "b better", "no difference at 95%"
TOO_FEW = "too few trials (a verdict needs at least 2 per row)"


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` (possibly fractional) degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n−1); None where there are too few values."""
    mean = statistics.fmean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> list[float]:
    """Welch's ``level`` interval of mean(a) − mean(b); needs 2 values on each side."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    assert sa is not None and sb is not None and ma is not None and mb is not None
    va, vb = sa**2 / len(a), sb**2 / len(b)
    diff, se = ma - mb, math.sqrt(va + vb)
    if se == 0:  # every trial of both rows gave the same value
        return [diff, diff]
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return [diff - half, diff + half]


def verdict(ci: list[float]) -> str:
    return A_BETTER if ci[0] > 0 else B_BETTER if ci[1] < 0 else NO_DIFFERENCE


def make_row(name: str, weights: str, fingerprint: str, trials: list[dict[str, Any]]) -> dict:
    """One backbone: per metric its trials' values, mean and std; VOC's per-class AP50 means.

    ``trials`` are the trials' metrics files' blocks (``{"AP": .., "per_class": {..},
    "segm": {..}}``); mask metrics are named ``segm/AP`` and so on."""
    values: dict[str, list[float]] = {}
    per_class: dict[str, list[float]] = {}
    for trial in trials:
        for metric, value in _flat(trial).items():
            values.setdefault(metric, [])
            if value is not None:  # undefined in this trial (null in its file)
                values[metric].append(value)
        for cls, aps in (trial.get("per_class") or {}).items():
            if aps.get("AP50") is not None:
                per_class.setdefault(cls, []).append(aps["AP50"])
    metrics = {}
    for metric, found in values.items():
        mean, std = mean_std(found)
        metrics[metric] = {"trials": found, "mean": mean, "std": std}
    return {
        "name": name,
        "weights": weights,
        "fingerprint": fingerprint,
        "n": len(trials),
        "metrics": metrics,
        "per_class_ap50": {cls: statistics.fmean(v) for cls, v in per_class.items()},
    }


def _flat(trial: dict[str, Any]) -> dict[str, float | None]:
    flat = {k: v for k, v in trial.items() if k not in ("per_class", "segm", "undefined")}
    flat.update({f"segm/{k}": v for k, v in (trial.get("segm") or {}).items() if k != "per_class"})
    return flat


def make_pairs(rows: list[dict], all_pairs: bool = False) -> list[dict]:
    """The first row against each other row (every pair with ``all_pairs``), per metric."""
    index_pairs = [(0, j) for j in range(1, len(rows))]
    if all_pairs:
        index_pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    pairs = []
    for i, j in index_pairs:
        a, b = rows[i], rows[j]
        for metric in a["metrics"]:
            if metric not in b["metrics"]:
                continue
            va, vb = a["metrics"][metric]["trials"], b["metrics"][metric]["trials"]
            pair: dict[str, Any] = {"a": a["name"], "b": b["name"], "metric": metric}
            pair["diff"] = statistics.fmean(va) - statistics.fmean(vb) if va and vb else None
            if len(va) < 2 or len(vb) < 2:
                pairs.append({**pair, "ci95": None, "verdict": TOO_FEW})
                continue
            ci = welch_interval(va, vb)
            pairs.append({**pair, "ci95": ci, "verdict": verdict(ci)})
    return pairs


def references(names: Sequence[str]) -> list[dict]:
    """The published rows chosen with ``--reference``, with their sources."""
    return [
        {"name": name, "source": VOC_DETECTION_SOURCE[name], **VOC_DETECTION[name]}
        for name in names
    ]


def _cell(metric: dict | None, n: int) -> str:
    """``57.1 ± 0.2``; with how many trials when some left the metric undefined."""
    if metric is None or metric["mean"] is None:
        return "n/a"
    k = len(metric["trials"])
    text = f"{metric['mean']:.1f}" + ("" if metric["std"] is None else f" ± {metric['std']:.1f}")
    if k < n:
        return f"{text} ({k} of {n} trials)"
    return f"{text} (1 trial)" if k == 1 else text


def markdown(report: dict) -> str:
    """The tables a paper would print: rows as mean ± std, then the verdicts."""
    rows, pairs = report["rows"], report["pairs"]
    metrics = list(rows[0]["metrics"]) if rows else []
    knn = any("knn_top1" in row for row in rows)  # the demo's rows carry their kNN top-1
    lines = ["| backbone | trials | " + " | ".join(metrics) + (" | kNN top-1" if knn else "")]
    lines[0] += " |"
    lines.append("|---|---|" + "---|" * (len(metrics) + knn))
    for row in rows:
        cells = " | ".join(_cell(row["metrics"].get(m), row["n"]) for m in metrics)
        cells += f" | {row['knn_top1']:.1f}" if knn else ""
        lines.append(f"| {row['name']} | {row['n']} | {cells} |")
    for ref in report["references"]:
        cells = " | ".join(
            "not published" if ref.get(m) is None else f"{ref[m]:.1f}" for m in metrics
        )
        lines.append(f"| published: {ref['name']} | | {cells}{' |' if knn else ''} |")
    if report["references"]:
        sources = sorted({ref["source"] for ref in report["references"]})
        lines += ["", "Published rows: " + "; ".join(sources) + "."]
    if pairs:
        lines += ["", "| a − b | metric | difference | 95% interval (Welch) | verdict |"]
        lines.append("|---|---|---|---|---|")
        for p in pairs:
            diff = "n/a" if p["diff"] is None else f"{p['diff']:+.2f}"
            ci = "none" if p["ci95"] is None else f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
            lines.append(
                f"| {p['a']} − {p['b']} | {p['metric']} | {diff} | {ci} | {p['verdict']} |"
            )
    return "\n".join(lines) + "\n"


def figure(report: dict, path: str) -> None:
    """Each row's mean per metric with its 95% t interval of the mean (none for one trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    metrics = [m for m in (rows[0]["metrics"] if rows else {}) if "/" not in m][:3]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(metrics) * max(len(rows), 1) / 2, 3.6))
    width = 0.8 / max(len(rows), 1)
    for k, row in enumerate(rows):
        means, errors = [], []
        for metric in metrics:
            m = row["metrics"].get(metric, {})
            values = m.get("trials", [])
            means.append(math.nan if m.get("mean") is None else m["mean"])
            spread = m.get("std")
            half = 0.0 if spread is None else t_quantile(0.975, len(values) - 1) * spread
            errors.append(half / math.sqrt(max(len(values), 1)))
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=f"{row['name']} (n={row['n']})")
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("VOC07 test, %" if metrics and metrics[0] == "AP" else "%")
    ax.set_title("mean over trials, 95% interval of the mean")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(
    output_dir: str,
    rows: list[dict],
    reference_names: Sequence[str] = (),
    all_pairs: bool = False,
    extra: dict | None = None,
) -> dict:
    """``comparison.json``, ``.md`` and ``.png`` in ``output_dir``; returns the report (with
    ``extra``'s keys added to the JSON). The published rows are VOC's: they are left out beside
    COCO trials."""
    coco = any("APs" in row["metrics"] for row in rows)
    report = {
        "rows": rows,
        "pairs": make_pairs(rows, all_pairs),
        "references": [] if coco else references(reference_names),
        **(extra or {}),
    }
    base = os.path.join(output_dir, COMPARISON)
    atomic_write_json(report, base + ".json")
    atomic_write_text(markdown(report), base + ".md")
    figure(report, base + ".png")
    return report
