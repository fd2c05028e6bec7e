"""What the benchmarks share: one table format, JSON written atomically, device timing,
photo-like JPEG folders, and the package functions they build pretraining runs and data with
(the detection benchmarks import the detector's own modules), so that a change to those is met
in this one file.

The benchmarks run as scripts (``python benchmarks/NAME.py``), which puts this folder on
``sys.path``; they import this module as ``common``. The package is imported inside the
functions that need it, so that a light benchmark does not load torch or detectron2.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- arguments, tables and JSON ----------------------------------------------------------------


def parser(doc: str, json_default: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line as description, and ``--json``."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--json", default=json_default, help="where to write the results")
    return p


def add_tool_arguments(p: argparse.ArgumentParser, tool: str) -> None:
    """``-- ARGS``: the arguments of the project's tool that a benchmark runs, as ``tool_args``."""
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help=f"-- then {tool}'s arguments")


def tool_arguments(args: argparse.Namespace) -> list[str]:
    """``tool_args`` without the ``--`` in front."""
    return args.tool_args[1:] if args.tool_args[:1] == ["--"] else args.tool_args


def config(args: argparse.Namespace) -> dict:
    """The flags a result was measured with, for its JSON."""
    return {k: v for k, v in vars(args).items() if k != "json"}


def fmt(value, spec: str | None = None) -> str:
    """One table cell: None as n/a, a string as it is, a float to three significant digits
    (no exponent) unless ``spec`` says otherwise."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if spec is not None:
        return format(value, spec)
    if isinstance(value, int) or value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.{min(6, max(0, 2 - math.floor(math.log10(abs(value)))))}f}"


def print_table(header: Sequence[str], rows: Iterable[Sequence], title: str | None = None) -> None:
    """A Markdown table (ready to paste into the docs), cells through :func:`fmt`."""
    if title:
        print(title)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(fmt(cell) for cell in row) + " |")


def write_json(path: str, data) -> None:
    """Write ``data`` to ``path`` whole or not at all: a benchmark saves what it has measured as
    it goes, so a reader never sees half a file, even when the run is killed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=2)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)
    print(f"wrote {path}", flush=True)


def read_json(path: str):
    """A result file, or None where it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---- devices and timing ------------------------------------------------------------------------


def device(spec: str):
    """``auto`` (CUDA where there is one), ``cpu``, ``cuda`` or ``cuda:N`` as a torch.device."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(spec)


def machine(dev) -> dict:
    """What a result was measured on."""
    import torch

    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    return {"device": str(dev), "device_name": name, "torch": torch.__version__}


def sync(dev) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def seconds(fn: Callable[[], object], dev=None, repeats: int = 1) -> float:
    """Wall seconds of ``repeats`` calls of ``fn``, the device synced at both ends."""
    if dev is not None:
        sync(dev)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if dev is not None:
        sync(dev)
    return time.perf_counter() - start


# ---- synthetic JPEGs ---------------------------------------------------------------------------


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """A 'photograph': 1/f colour noise (natural-image spectrum), a few soft shapes, grain."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height)) ** 1.1
    shape = (height, width // 2 + 1)
    base = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    channels = []
    for _ in range(3):
        tint = rng.standard_normal(shape) * 0.3
        channels.append(np.fft.irfft2((base + tint) * amplitude, s=(height, width)))
    img = np.stack(channels, axis=-1)
    img = (img - img.mean()) / (img.std() + 1e-8) * 45 + rng.uniform(80, 170, 3)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(rng.integers(2, 6)):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
        mask = 1 / (1 + np.exp((np.hypot(yy - cy, xx - cx) - r) / 3))
        img += mask[..., None] * rng.uniform(-60, 60, 3)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_jpeg_folder(root: str, n: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> str:
    """``n`` photo-like JPEGs (quality 90, ImageNet's typical size) in ``root/photos``: an image
    folder with one class; returns ``root``."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "photos"), exist_ok=True)
    for i in range(n):
        photo_like(rng, *size).save(os.path.join(root, "photos", f"{i:05d}.jpg"), quality=90)
    return root


# ---- the project's tools ------------------------------------------------------------------------


def run_tool(command: list[str], env: dict | None = None) -> str:
    """One of the project's tools run from the repository root, its output passed on as it
    comes and returned; a failure exits with the tool's status."""
    print("$", " ".join(command), flush=True)
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if proc.wait():
        sys.exit(proc.returncode)
    return "".join(lines)


# ---- the package's pretraining run and data, as the tool builds them ---------------------------


def pretrain_config(argv: list[str]):
    """``tools/pretrain_moco.py``'s flags as the tool parses and checks them (the data folder
    must exist)."""
    from moco_d2.pretrain.config import PretrainConfig

    return PretrainConfig.parse(argv)


def pretrain_run(argv: list[str], dev):
    """The tool's config for ``argv`` resolved as for a run of one process on ``dev``: its
    device defaults, ``--bn-splits``, per-process ``batch`` and the seed (``--seed``, else 0)."""
    from moco_d2.launch import one_process

    config = pretrain_config(argv)
    return config.resolved(one_process(dev), config.seed if config.seed is not None else 0)


def build_run(config, dev, released: bool = False):
    """(model, optimizer) as the tool builds them, seeded as the tool seeds them; ``released``:
    the per-parameter momentum loop and per-parameter SGD of the released main_moco.py."""
    from moco_d2 import io
    from moco_d2.pretrain.main import build_model, build_optimizer

    io.seed_all(config.seed)
    model = build_model(config, dev, foreach_momentum=not released)
    optimizer = build_optimizer(model, config, dev, kernel={"foreach": False} if released else None)
    return model, optimizer


def train_data(config, folder: str):
    """The tool's training data of ``folder`` (``folder/train`` where there is one):
    ``.dataset``, ``.augment``, ``.decode``."""
    from moco_d2.pretrain.data import resolve_train_dir
    from moco_d2.pretrain.main import build_train_data

    return build_train_data(config, resolve_train_dir(folder))


def train_loader(data, config, dev, across_epochs: bool = True):
    """The tool's loader of ``data`` for one process; ``.epoch(e)`` gives the batches."""
    from moco_d2.launch import one_process
    from moco_d2.pretrain.main import build_train_loader

    return build_train_loader(data, config, one_process(dev), across_epochs)


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed this process as the tool does when it starts an epoch."""
    from moco_d2 import io
    from moco_d2.pretrain.main import epoch_seed

    io.seed_all(epoch_seed(seed, epoch, 0))


def train_epoch(model, batches, optimizer, dev, config, sync_every_step: bool, data=None) -> None:
    """The tool's steps over ``batches`` (``data``: the :func:`train_data` they come from; None:
    they hold the two normalised views), ending with the device synced. ``sync_every_step``:
    the loss read back after every forward, as the released main_moco.py does; else nothing is
    read back, as the tool runs between its ``--print-freq`` reads."""
    from moco_d2.pretrain.main import TrainData, train_step

    data = data or TrainData(dataset=None)
    read = (lambda loss: loss.item()) if sync_every_step else None
    model.train()
    for images, _, _ in batches:
        train_step(model, images, optimizer, data, config, dev, read)
    sync(dev)


def views_on_device(data, images, config, dev):
    """What the tool's step does with a batch before the model: decode (``--decode-on device``),
    then the two normalised views on ``dev`` (augmented there with ``--augment-on device``)."""
    from moco_d2.pretrain.main import views_to_device

    if data.decode is not None:
        images, _ = data.decode(images, dev)
    return views_to_device(images, dev, data.augment, config.channels_last)


def encoder(arch: str):
    """The MoCo encoder (trunk and MLP head) the tool trains, for counting its FLOPs."""
    import torchvision

    from moco_d2.pretrain.moco import build_encoder

    return build_encoder(torchvision.models.__dict__[arch], 128, mlp=True)


def device_augment():
    """The device augmentation of ``--augment-on device`` (aug+)."""
    from moco_d2.pretrain.device_augment import DeviceAugment

    return DeviceAugment(True)


def worker_items(crop_size: int) -> dict:
    """What a DataLoader worker does per file: ``loader`` (PIL decode and two crops) and
    ``device`` (read, parse the header, draw the two boxes)."""
    from moco_d2.pretrain.device_augment import TwoCropsLoader
    from moco_d2.pretrain.device_decode import EncodedTwoCrops

    return {"loader": TwoCropsLoader(crop_size), "device": EncodedTwoCrops(crop_size)}


def image_paths(folder: str) -> list[str]:
    """The image files the tool trains on in ``folder``, in its order."""
    from moco_d2.pretrain.data import resolve_train_dir, scan_image_folder

    return [path for path, _ in scan_image_folder(resolve_train_dir(folder))[0]]


def synthetic_voc(
    root: str, num_train: int, num_test: int, image_size: int, classes: int = 20, objects: int = 3
) -> str:
    """A synthetic VOC07+12 tree, ``classes`` of VOC's classes in use, up to ``objects`` boxes
    an image; returns ``root``."""
    from moco_d2.detection.data.synthetic import make_synthetic_voc

    make_synthetic_voc(root, num_train, num_test, image_size, 0, classes, objects)
    return root


def health_bounds() -> dict:
    """The divergence check's bounds."""
    from moco_d2 import health

    return {
        "layer_norm_ratio": health.MAX_NORM_RATIO,
        "layer_rms_floor": health.LAYER_RMS_FLOOR,
        "bn_running_var": health.MAX_RUNNING_VAR,
    }


def sha256_of(path: str) -> str:
    """The file hash ``run_trials`` fingerprints datasets with."""
    from moco_d2.io import sha256_of as package_sha256

    return package_sha256(path)
