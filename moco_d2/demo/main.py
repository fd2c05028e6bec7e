"""``make demo``: the protocol at toy scale, ending in the comparison report of ``run_trials``.

On synthetic images whose categories are shape families (:mod:`moco_d2.synthetic`): MoCo v2
pretraining of ResNet-50 and, as the positive control, the same ResNet-50 trained with the
family labels for the same steps; both converted; then Faster R-CNN R50-C4 fine-tuned from
random init, the control and MoCo, a few trials each, on a VOC-format tree of the same families
(:func:`moco_d2.trials.main.run_trials`). The report adds each backbone's kNN top-1 on held-out
labelled images, the pretraining loss curves and each stage's minutes.
"""

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moco_d2.cli import ArgumentParser, positive_int
from moco_d2.io import atomic_path, atomic_write_text
from moco_d2.synthetic import FAMILIES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo", "voc_R50_C4_demo.yaml")
# Row folder (run_trials' NAME) → the label the report prints.
ROWS = {
    "random_init": "random init",
    "supervised_demo": "supervised (demo)",
    "moco_v2_demo": "MoCo v2 (demo)",
}
PUBLISHED = "MoCo v2 200ep"
IMAGENET_STEPS = 200 * 1_281_167 // 256  # the published row's pretraining steps


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the demo spends, per device. On 2 CPU cores the whole demo takes under 30 minutes;
    a GPU gets the thousands of steps, queue and momentum at which MoCo's row is expected to
    separate from random init."""

    pretrain_images: int
    pretrain_epochs: int
    pretrain_batch: int
    pretrain_lr: float
    crop_size: int
    moco_k: int
    moco_m: float  # a short run needs a faster key encoder than the released 0.999
    workers: int
    knn_per_class: int  # held-out kNN queries per family; twice as many labelled bank images
    det_train_images: int
    det_test_images: int
    max_iter: int
    trials: int


BUDGETS = {
    "cpu": Budget(512, 6, 32, 0.03, 64, 256, 0.99, 0, 16, 200, 60, 160, 2),
    "cuda": Budget(4096, 64, 128, 0.06, 64, 4096, 0.99, 8, 32, 400, 100, 300, 2),
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output_dir: str
    device: str
    budget: Budget


def parse(argv: list[str]) -> DemoConfig:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    for field in dataclasses.fields(Budget):
        kind = float if field.type is float else positive_int
        parser.add_argument(
            "--" + field.name.replace("_", "-"), type=kind, help="default: the device's budget"
        )
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)}
    budget = dataclasses.replace(
        BUDGETS[device], **{k: v for k, v in given.items() if v is not None}
    )
    return DemoConfig(os.path.abspath(args.output_dir), device, budget)


class Stages:
    """Numbered stage headers, and each stage's minutes for the report."""

    NAMES = (
        "synthetic data: pretraining images, labelled kNN images, a VOC-format tree",
        "MoCo v2 pretraining, ResNet-50, single-process shuffle-BN emulation",
        "supervised pretraining (the positive control), same images and steps",
        "convert both checkpoints; kNN top-1 of each backbone",
        "fine-tune Faster R-CNN R50-C4 from each backbone, trials with seeds 0, 1, …",
    )

    def __init__(self) -> None:
        self.minutes: dict[str, float] = {}

    @contextmanager
    def stage(self, number: int) -> Iterator[None]:
        name = self.NAMES[number - 1]
        print(f"\n=== [{number}/{len(self.NAMES)}] {name} ===", flush=True)
        start = time.monotonic()
        yield
        self.minutes[name.split(":")[0].split(",")[0]] = (time.monotonic() - start) / 60


def make_data(out: str, b: Budget) -> tuple[str, str, str]:
    from moco_d2.detection.data.synthetic import make_synthetic_voc
    from moco_d2.synthetic import make_synthetic_image_folder

    data = os.path.join(out, "data")
    classes = len(FAMILIES)
    pretrain = make_synthetic_image_folder(
        os.path.join(data, "pretrain", "train"), b.pretrain_images, 96, 0, classes
    )
    knn = os.path.join(data, "knn")
    queries = b.knn_per_class * classes
    make_synthetic_image_folder(os.path.join(knn, "train"), 2 * queries, 96, 1, classes)
    make_synthetic_image_folder(os.path.join(knn, "val"), queries, 96, 2, classes)
    voc = os.path.join(data, "voc")
    make_synthetic_voc(
        voc, b.det_train_images, b.det_test_images, 128, 3, classes, 3, families=True
    )
    return pretrain, knn, voc


def pretrain_moco(train_dir: str, output_dir: str, b: Budget, device: str) -> str:
    from moco_d2.pretrain import main as pretrain_main

    flags = (
        f"-a resnet50 -b {b.pretrain_batch} --epochs {b.pretrain_epochs} --workers {b.workers} "
        f"--crop-size {b.crop_size} --moco-k {b.moco_k} --moco-m {b.moco_m} "
        f"--lr {b.pretrain_lr} --seed 0 --mlp --aug-plus --cos --moco-t 0.2 "
        f"--device {device} --print-freq 10"
    )
    pretrain_main.main([train_dir, *flags.split(), "--output-dir", output_dir])
    return os.path.join(output_dir, f"checkpoint_{b.pretrain_epochs - 1:04d}.pth.tar")


def convert(checkpoint: str, output: str) -> str:
    from moco_d2.convert import tool

    trunk, mapping = tool.convert(checkpoint)
    tool.write(tool.detectron2_weights(trunk, mapping), output)
    print(f"converted {len(mapping)} trunk tensors ({trunk.format}) → {output}")
    return output


def moco_losses(pretrain_dir: str) -> dict[int, float]:
    """The InfoNCE loss by step, as :mod:`moco_d2.pretrain.main` logs it (every --print-freq)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(pretrain_dir, "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {s.step: s.value for s in events.Scalars("train/loss")}


def fine_tune(out: str, voc_root: str, weights: dict[str, str], c: DemoConfig) -> dict:
    """``run_trials`` over the rows, in ``out/<row>/trial_k``; returns its report."""
    from moco_d2.config import ClusterFlags
    from moco_d2.detection.data.voc import register_all_voc
    from moco_d2.trials.main import Settings, run_trials

    os.environ["DETECTRON2_DATASETS"] = voc_root  # for train_net, as a user would set it
    register_all_voc(voc_root)  # and for the trials' fingerprints, in this process
    b = c.budget
    steps = str(tuple(sorted({s for s in (b.max_iter * 3 // 4, b.max_iter * 9 // 10) if s > 0})))
    opts = ("MODEL.DEVICE", c.device, "SOLVER.MAX_ITER", str(b.max_iter), "SOLVER.STEPS", steps)
    settings = Settings(
        DEMO_CONFIG, out, tuple(f"{row}={path}" for row, path in weights.items()), b.trials,
        0, 1, (PUBLISHED,), True, True, 1, False, (), opts,
    )  # fmt: skip
    return run_trials(settings, ClusterFlags())


def loss_figure(path: str, moco: dict[int, float], supervised: list[float], b: Budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(list(moco), list(moco.values()), color="tab:purple", label="InfoNCE loss")
    # Uniform logits over the positive and K negatives: features that tell nothing.
    left.axhline(math.log(b.moco_k + 1), color="gray", linestyle="--", label="chance, ln(K+1)")
    left.set(title="MoCo v2 pretraining", xlabel="step", ylabel="loss")
    right.plot(supervised, color="tab:green", label="cross-entropy")
    right.axhline(math.log(len(FAMILIES)), color="gray", linestyle="--", label="chance, ln(C)")
    right.set(title="supervised pretraining (control)", xlabel="step")
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def meaning(b: Budget, steps: int) -> str:
    return (
        f"The supervised row is the positive control: where it beats random init beyond the "
        f"trials' noise, this evaluation can see a better backbone at this scale. MoCo v2 ran "
        f"{steps} steps here ({b.pretrain_epochs} epochs of {b.pretrain_images} images at "
        f"{b.crop_size} px) against the published row's 200 ImageNet epochs, about "
        f"{IMAGENET_STEPS:,} steps of 256 images: its row shows what so little pretraining "
        "gives, not what MoCo v2 gives."
    )


def report_text(markdown: str, b: Budget, steps: int, c: DemoConfig, minutes: dict) -> str:
    stages = "\n".join(f"| {name} | {m:.1f} |" for name, m in minutes.items())
    return f"""# moco-d2 demo report

{markdown}
kNN top-1: each backbone's pooled ResNet-50 features, k=20, on
{b.knn_per_class * len(FAMILIES)} held-out labelled images ({len(FAMILIES)} shape families,
chance {100 / len(FAMILIES):.1f}%).

![AP by backbone](comparison.png)

![pretraining losses](pretraining.png)

## What these numbers mean
{meaning(b, steps)}

Detection: {b.max_iter} iterations of Faster R-CNN R50-C4 per trial, {b.trials} trials per
row, on {b.det_train_images} training and {b.det_test_images} test images of the shape families
under VOC's class names; VOC07 11-point AP, Welch 95% intervals.

## Stages on {c.device}
| stage | minutes |
|---|---|
{stages}
| total | {sum(minutes.values()):.1f} |
"""


def main(argv: list[str]) -> int:
    from moco_d2.demo.control import knn_top1, train_supervised
    from moco_d2.trials import compare

    c = parse(argv)
    b, out, stages = c.budget, c.output_dir, Stages()
    print(f"moco-d2 demo on {c.device}; everything goes to {out}")
    with stages.stage(1):
        for stale in ("data", "pretrain", *ROWS):
            shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
        pretrain_dir, knn_root, voc_root = make_data(out, b)
    with stages.stage(2):
        moco_checkpoint = pretrain_moco(pretrain_dir, os.path.join(out, "pretrain"), b, c.device)
    with stages.stage(3):
        supervised_checkpoint = os.path.join(out, "pretrain", "supervised.pth")
        supervised_losses = train_supervised(
            pretrain_dir, supervised_checkpoint, epochs=b.pretrain_epochs,
            batch_size=b.pretrain_batch, lr=b.pretrain_lr, crop_size=b.crop_size,
            device=c.device, workers=b.workers,
        )  # fmt: skip
    with stages.stage(4):
        weights = {
            "random_init": "none",
            "supervised_demo": convert(supervised_checkpoint, os.path.join(out, "supervised.pkl")),
            "moco_v2_demo": convert(moco_checkpoint, os.path.join(out, "moco_v2.pkl")),
        }
        checkpoints = {"supervised_demo": supervised_checkpoint, "moco_v2_demo": moco_checkpoint}
        knn = {row: knn_top1(checkpoints.get(row), knn_root, b.crop_size, c.device) for row in ROWS}
    with stages.stage(5):
        report = fine_tune(out, voc_root, weights, c)
    rows = [dict(row, name=ROWS[row["name"]], knn_top1=knn[row["name"]]) for row in report["rows"]]
    moco = moco_losses(os.path.join(out, "pretrain"))
    loss_figure(os.path.join(out, "pretraining.png"), moco, supervised_losses, b)
    extra = {
        "demo": {
            "device": c.device,
            "budget": dataclasses.asdict(b),
            "stage_minutes": stages.minutes,
            "loss_by_step": {
                "moco_v2_demo": sorted(moco.items()),
                "supervised_demo": list(enumerate(supervised_losses)),
            },
        }
    }
    report = compare.write_report(out, rows, (PUBLISHED,), all_pairs=True, extra=extra)
    steps = len(supervised_losses)  # the same loader length and epochs as MoCo's
    text = report_text(compare.markdown(report), b, steps, c, stages.minutes)
    atomic_write_text(text, os.path.join(out, "report.md"))
    print("\n" + text)
    print(f"report: {os.path.join(out, 'report.md')}; comparison.json, .md and .png beside it")
    return 0
