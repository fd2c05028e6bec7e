"""The bounds on weights and BN statistics (moco_d2/health.py): against known tensors, agreed over
gloo processes, and as pretraining and the detector's trainer use them (norms to TensorBoard, the
last checkpoint intact)."""

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from op_count import OpCounter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from moco_d2.errors import TrainingDiverged, UserError
from moco_d2.health import LAYER_RMS_FLOOR, MAX_NORM_RATIO, MAX_RUNNING_VAR, HealthMonitor
from moco_d2.launch import one_process
from moco_d2.pretrain import main as pretrain
from moco_d2.pretrain.config import PretrainConfig
from moco_d2.synthetic import make_synthetic_image_folder

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "voc_R50_C4.yaml"


def _model():
    """Linear 3→2 with weight all ones (norm √6) and a zero bias, then BN(2) at its init."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    return model


def test_ratio_var_and_norms_of_known_tensors():
    model = _model()
    monitor = HealthMonitor(model)
    with OpCounter() as counter:
        start = monitor.measure()
    assert counter.count.syncs == 0  # no host read per tensor: one .tolist() of the summary
    assert (start.ratio, start.var, start.non_finite) == (1.0, 1.0, False)
    # ones(2, 3), zeros(2), BN weight ones(2), BN bias zeros(2): √(6 + 0 + 2 + 0)
    assert start.param_norm == pytest.approx(math.sqrt(8))
    assert start.grad_norm == 0.0 and start.problem() is None

    with torch.no_grad():
        model[0].weight.mul_(5.0)
        model[0].bias.fill_(2.0)  # zero at the start: counted with its layer's weight
        model[1].running_var.copy_(torch.tensor([3.0, 7.0]))
    model[1].weight.grad = torch.tensor([3.0, 4.0])
    reading = monitor.measure()
    assert reading.ratio == pytest.approx(math.sqrt((25 * 6 + 4 * 2) / 6))
    assert reading.var == 7.0 and reading.grad_norm == pytest.approx(5.0)
    assert reading.param_norm == pytest.approx(math.sqrt(25 * 6 + 8 + 2))
    assert reading.problem() is None


def test_a_bias_a_step_off_zero_is_judged_with_its_layer():
    """As in a resumed detector: a bias of norm 1e-7 at the start that an ordinary step moves
    to 0.01 is a ratio of 1e5 on its own, but leaves its layer almost as it was."""
    model = _model()
    with torch.no_grad():
        model[0].bias.fill_(1e-7)
    monitor = HealthMonitor(model)
    with torch.no_grad():
        model[0].bias.fill_(0.01)
    assert monitor.measure().ratio == pytest.approx(math.sqrt((6 + 2e-4) / (6 + 2e-14)))
    with torch.no_grad():
        model[0].weight.mul_(2 * MAX_NORM_RATIO)  # the layer itself blows up: stopped
    assert monitor.measure().ratio > MAX_NORM_RATIO


def test_a_layer_that_starts_all_zero_is_judged_against_the_floor():
    model = _model()
    with torch.no_grad():
        model[0].weight.zero_()
    monitor = HealthMonitor(model)
    assert monitor.measure().ratio == 1.0  # the BN layer; the zero one reads 0
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    floor = LAYER_RMS_FLOOR * math.sqrt(6 + 2)  # weight and bias: 8 values
    assert monitor.measure().ratio == pytest.approx(2 * math.sqrt(6) / floor)
    assert monitor.measure().problem().startswith("a layer's norm reached 1.73e+03x its value")


@pytest.mark.parametrize(
    "fault, says",
    [
        ("ratio", "a layer's norm reached 2e+03x its value at the start (bound 1e+03)"),
        ("var", "BN running_var reached 2e+08 (bound 1e+08)"),
        ("nan weight", "a weight or a BN running_var became NaN or infinite"),
        ("inf var", "a weight or a BN running_var became NaN or infinite"),
    ],
)
def test_each_bound_is_named(fault, says):
    model = _model()
    monitor = HealthMonitor(model)
    with torch.no_grad():
        if fault == "ratio":
            model[1].weight.mul_(2 * MAX_NORM_RATIO)
        elif fault == "var":
            model[1].running_var[1] = 2 * MAX_RUNNING_VAR
        elif fault == "nan weight":
            model[0].bias[0] = float("nan")
        else:
            model[1].running_var[0] = float("inf")
    assert monitor.measure().problem() == says


def test_frozen_parameters_are_not_watched():
    model = _model()
    model[0].weight.requires_grad_(False)
    monitor = HealthMonitor(model)
    with torch.no_grad():
        model[0].weight.mul_(1e6)
    assert monitor.measure().ratio == 1.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("health_data")
    make_synthetic_image_folder(str(root / "train"), num_images=16, size=40, seed=0, num_classes=2)
    return root


def _tiny(data, out, *extra):
    argv = [str(data), "-a", "resnet18", "-b", "8", "--moco-k", "16", "--workers", "0"]
    argv += ["--crop-size", "64", "--seed", "1", "--device", "cpu", "--output-dir", str(out)]
    return argv + list(extra)


def test_pretraining_bounds_the_query_encoder_and_every_bn(data_dir, tmp_path):
    trainer = pretrain.Pretrainer(PretrainConfig.parse(_tiny(data_dir, tmp_path)), one_process())
    model, health = trainer.model, trainer.health
    with torch.no_grad():
        model.encoder_k.conv1.weight.mul_(1e4)  # the key encoder follows the query one
    assert health.measure().ratio == 1.0
    bn = model.encoder_k.layer4[1].bn2
    with torch.no_grad():
        bn.running_var[3] = 1e12
    assert health.measure().problem() == "BN running_var reached 1e+12 (bound 1e+08)"
    with torch.no_grad():
        bn.running_var[3] = 1.0
        model.encoder_q.conv1.weight.mul_(1e4)
    with pytest.raises(TrainingDiverged) as caught:
        health.check("at epoch 3, iteration 7", pretrain.DIVERGED_ADVICE)
    assert str(caught.value) == (
        "weights exploded at epoch 3, iteration 7: a layer's norm reached 1e+04x its value at the "
        "start (bound 1e+03); lower --lr or use larger BatchNorm groups (--crop-size, -b, "
        "--bn-splits); the last checkpoint is intact"
    )


def test_exploding_weights_stop_the_run_and_keep_the_last_checkpoint(data_dir, tmp_path):
    out = tmp_path / "out"
    assert pretrain.main(_tiny(data_dir, out, "--epochs", "1", "-p", "1")) == 0
    # A run at lr 1e5 whose first epoch ended healthy: --resume refuses another --lr, so the
    # checkpoint's config says 1e5.
    path = out / "checkpoint_0000.pth.tar"
    state = torch.load(path, weights_only=True)
    state["config"]["lr"] = 1e5
    torch.save(state, path)
    good = path.read_bytes()

    # lr 1e5: the features are L2-normalised, so the loss stays finite while weights explode
    argv = _tiny(data_dir, out, "--epochs", "2", "-p", "1", "--resume", str(out), "--lr", "1e5")
    with pytest.raises(TrainingDiverged) as caught:
        pretrain.main(argv)
    message = str(caught.value)
    assert message.startswith("weights exploded at epoch 1, iteration "), message
    assert message.endswith("the last checkpoint is intact") and "non-finite" not in message
    assert path.read_bytes() == good
    assert not (out / "checkpoint_0001.pth.tar").exists()

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/param_norm", "train/grad_norm", "train/loss"} <= set(tags)
    norms = [e.value for e in events.Scalars("train/param_norm")]
    assert all(v > 0 for v in norms) and len(norms) >= 2


def _rank(rank, init, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different weights: each rank has its own reference
        model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        monitor = HealthMonitor(model)
        with torch.no_grad():
            if rank == 1:
                model[0].weight.mul_(50.0)  # weight and bias: the layer's norm 50-fold
                model[0].bias.mul_(50.0)
            else:
                model[1].running_var[0] = 9.0
        reading = monitor.measure()
        results[rank] = (reading.ratio, reading.var, reading.non_finite)
    finally:
        dist.destroy_process_group()


def test_every_process_reads_the_maximum(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", results), nprocs=2)
    assert results[0][1:] == results[1][1:] == (9.0, False)
    assert results[0][0] == results[1][0] == pytest.approx(50.0)


@pytest.fixture
def trainer(registered_voc, tmp_path):
    """The detector's Trainer on the tiny R50-C4, from detectron2's random init."""
    from detectron2.utils.events import EventStorage
    from transfer_tiny import TINY_OPTS

    from moco_d2.detection.train_net import argument_parser, load_config
    from moco_d2.detection.trainer import Trainer

    args = argument_parser().parse_args(
        ["--config-file", str(CONFIG), *TINY_OPTS, "MODEL.WEIGHTS", ""]
        + ["SOLVER.MAX_ITER", "8", "OUTPUT_DIR", str(tmp_path)]
    )
    trainer = Trainer(load_config(args))
    with EventStorage(0) as trainer.storage:
        yield trainer


def _param(trainer, name):
    return dict(trainer.model.named_parameters())[name]


def test_detector_reference_is_the_loaded_model(trainer):
    """Weights as loaded (here: larger than detectron2's init) are the start, ratio 1."""
    weight = _param(trainer, "roi_heads.box_predictor.cls_score.weight")
    with torch.no_grad():
        weight.mul_(1e4)
    trainer.before_train()
    trainer.check_health()
    assert trainer.storage.latest()["health_max_weight_ratio"][0] == 1.0
    assert trainer.storage.latest()["health_max_bn_running_var"][0] == 1.0  # BN at its init


@pytest.mark.parametrize(
    "fault, says",
    [
        ("ratio", "a layer's norm reached 1e+04x its value at the start (bound 1e+03)"),
        ("var", "BN running_var reached 3e+08 (bound 1e+08)"),
    ],
)
def test_detector_stops_past_a_bound_with_iteration_and_lr(trainer, fault, says):
    bias = _param(trainer, "roi_heads.box_predictor.cls_score.bias")
    with torch.no_grad():
        bias.fill_(1e-7)  # as resumed after a step: its own ratio would be 1e5 below
    trainer.before_train()
    trainer.iter = 4
    with torch.no_grad():
        bias.fill_(0.01)
        if fault == "ratio":
            _param(trainer, "roi_heads.box_predictor.cls_score.weight").mul_(1e4)
        else:
            trainer.model.backbone.res3[0].conv2.norm.running_var[5] = 3e8
    with pytest.raises(TrainingDiverged) as caught:
        trainer.check_health()
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert str(caught.value) == (
        f"training diverged at iteration 5 of 8 (learning rate {lr:g}): {says}; no checkpoint "
        "was written and nothing of the diverged model was saved; lower SOLVER.BASE_LR, or "
        "check MODEL.WEIGHTS"
    )


@pytest.mark.parametrize("user_error", [True, False])
def test_train_loop_traceback_only_for_errors_that_are_not_user_errors(caplog, user_error):
    """detectron2's own train loop logs the exception; the filter the Trainer installs drops
    that record for a UserError only."""
    from detectron2.engine import TrainerBase

    from moco_d2.detection.trainer import TRAIN_LOOP_LOGGER, UserErrorTracebackFilter

    error = UserError("one line") if user_error else RuntimeError("a bug")

    class Loop(TrainerBase):
        def run_step(self):
            raise error

    logger = logging.getLogger(TRAIN_LOOP_LOGGER)
    log_filter = UserErrorTracebackFilter()
    logger.addFilter(log_filter)
    try:
        with caplog.at_level(logging.INFO, logger=TRAIN_LOOP_LOGGER):
            with pytest.raises(type(error)):
                Loop().train(0, 1)
    finally:
        logger.removeFilter(log_filter)
    logged = [r for r in caplog.records if r.getMessage() == "Exception during training:"]
    assert "Starting training from iteration 0" in caplog.text
    assert [r.exc_info[1] for r in logged] == ([] if user_error else [error])
