"""Two real gloo processes on CPU: SyncBN falls back to naiveSyncBN, which synchronizes, and
train_net trains, runs precise BN and evaluates."""

import json

import pytest
import torch

import moco_d2.detection  # noqa: F401  (compat shims and registrations must precede detectron2)

# isort: split
from detectron2.config import get_cfg
from detectron2.layers import get_norm
from detectron2.utils import comm
from transfer_tiny import TINY_OPTS

from moco_d2.detection import train_net
from moco_d2.detection.evaluation import METRICS_FILE
from moco_d2.detection.train_net import launch, resolve_sync_bn


def _norm_worker(output_dir):
    cfg = get_cfg()
    cfg.merge_from_file("configs/voc_R50_C4.yaml")
    cfg.MODEL.DEVICE = "cpu"
    norm = get_norm(resolve_sync_bn(cfg).MODEL.RESNETS.NORM, 3).train()
    rank = comm.get_rank()
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) * (rank + 1) + 10 * rank
    out = norm(x)
    out.sum().backward()
    torch.save(
        {
            "norm": cfg.MODEL.RESNETS.NORM,
            "local_rank": comm.get_local_rank(),
            "x": x,
            "out": out.detach(),
            "running_mean": norm.running_mean,
            "running_var": norm.running_var,
        },
        f"{output_dir}/rank{rank}.pt",
    )


def test_naive_sync_bn_synchronizes_over_gloo(tmp_path):
    launch(_norm_worker, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["norm"] for r in ranks] == ["naiveSyncBN", "naiveSyncBN"]
    assert [r["local_rank"] for r in ranks] == [0, 1]
    # Same statistics as one BatchNorm over both processes' inputs.
    x = torch.cat([r["x"] for r in ranks])
    reference = torch.nn.BatchNorm2d(3).train()
    out = reference(x)
    # NaiveSyncBatchNorm keeps the biased batch variance in running_var (torch: unbiased).
    running_var = 0.9 + 0.1 * x.var(dim=(0, 2, 3), unbiased=False)
    for r, expected in zip(ranks, out.split(2)):
        assert torch.allclose(r["out"], expected, atol=1e-4)
        assert torch.allclose(r["running_mean"], reference.running_mean, atol=1e-4)
        assert torch.allclose(r["running_var"], running_var, rtol=1e-4)


@pytest.mark.slow
def test_train_net_two_cpu_processes(registered_voc, tmp_path, monkeypatch):
    # The parent checks the datasets it has registered; the spawned workers register from env.
    monkeypatch.setenv("DETECTRON2_DATASETS", str(registered_voc))
    out = tmp_path / "out"
    train_net.main(
        [
            "--config-file",
            "configs/voc_R50_C4.yaml",
            "--num-gpus",
            "2",
            "--dist-url",
            "auto",
            "MODEL.WEIGHTS",
            "",
            *TINY_OPTS,
            "SOLVER.MAX_ITER",
            "2",
            "OUTPUT_DIR",
            str(out),
        ]
    )
    log = (out / "log.txt").read_text()
    assert log.count("MODEL.RESNETS.NORM: SyncBN -> naiveSyncBN") == 1
    assert "World size: 2" in log and "Running precise-BN" in log
    assert "NORM: naiveSyncBN" in (out / "config.yaml").read_text()
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert set(metrics["voc_2007_test"]) == {"AP", "AP50", "AP75", "per_class", "undefined"}
    assert (out / "model_final.pth").exists()
