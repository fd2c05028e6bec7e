#!/usr/bin/env bash
# Build .device/site/ for benchmarks/gpu_check.py on a GPU machine that has no network.
#
# Such a machine's python3 has torch, torchvision, numpy, Pillow, tensorboard, tqdm, matplotlib
# and pytest, but not detectron2 and its pure-Python dependencies, nor pycocotools. This script
# copies those pure-Python distributions out of the development environment (PYTHON, default
# .venv/bin/python; compiled extensions and __pycache__ left out), unpacks a CPython 3.12
# manylinux pycocotools wheel next to them, and then checks that the project imports with only
# those packages and the GPU machine's own on the path. Rebuilds the folder from scratch on every
# run; the wheel is downloaded once into .device/wheels/.
#
# Then .device/dali/: NVIDIA DALI, the peer feed of feed_throughput.py, and its requirements
# (requirements-dali.txt) as CPython 3.12 manylinux wheels, unpacked into one folder, so that the
# packages of the nvidia/ namespace share it (pip install --target would not merge them). About
# 1 GB; gpu_check.py puts it on the path where the GPU machine's Python lacks DALI. If the download
# fails, the script says so and goes on: the GPU check then reports DALI as missing.
#
#   bash benchmarks/gpu_prepare.sh                    # then carry .device/ to the GPU machine
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_prepare.sh
#   GPU_PREPARE_CHECK=0 bash benchmarks/gpu_prepare.sh   # skip the import check (about 20 s)
#   GPU_PREPARE_DALI=0 bash benchmarks/gpu_prepare.sh    # leave DALI out
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SITE=.device/site
DALI_SITE=.device/dali
WHEELS=.device/wheels
PYCOCOTOOLS=pycocotools==2.0.11
# detectron2 is the pure-Python 0.6 published on PyPI as pb1-detectron2 (docs/install.md).
DISTS="pb1-detectron2 fvcore iopath yacs omegaconf hydra-core antlr4-python3-runtime termcolor
tabulate portalocker cloudpickle PyYAML"
# What the GPU machine's python3 already has; the import check sees only these (and their
# requirements) from PYTHON's environment.
ON_GPU_MACHINE="torch torchvision numpy pillow tensorboard tqdm matplotlib pytest"

if ! "$PYTHON" -c "import detectron2" 2>/dev/null; then
    echo "error: $PYTHON cannot import detectron2; set PYTHON to the project's environment" >&2
    exit 2
fi

rm -rf "$SITE.tmp"
mkdir -p "$SITE.tmp" "$WHEELS"
# shellcheck disable=SC2086
"$PYTHON" - "$SITE.tmp" $DISTS <<'EOF'
"""Copy each distribution's recorded files, without compiled extensions or bytecode."""
import importlib.metadata
import shutil
import sys
from pathlib import Path

target = Path(sys.argv[1])
for name in sys.argv[2:]:
    dist = importlib.metadata.distribution(name)
    copied = skipped = 0
    for entry in dist.files or []:
        if entry.parts[0] == ".." or "__pycache__" in entry.parts:
            continue  # scripts in bin/, bytecode for another Python
        if entry.suffix in (".so", ".pyd"):
            skipped += 1  # PyYAML's libyaml binding: yaml falls back to pure Python
            continue
        destination = target / entry
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(entry.locate(), destination)
        copied += 1
    note = f", {skipped} compiled extension(s) left out" if skipped else ""
    print(f"  {name} {dist.version}: {copied} files{note}")
EOF

wheel=$(ls "$WHEELS"/pycocotools-2.0.11-cp312-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --no-deps "$PYCOCOTOOLS" -d "$WHEELS"
    wheel=$(ls "$WHEELS"/pycocotools-2.0.11-cp312-*.whl | head -n 1)
fi
"$PYTHON" -m zipfile -e "$wheel" "$SITE.tmp"
echo "  $(basename "$wheel") unpacked"

rm -rf "$SITE"
mv "$SITE.tmp" "$SITE"
echo "built $SITE: $(du -sh "$SITE" | cut -f1)"

if [ "${GPU_PREPARE_DALI:-1}" != 0 ]; then
    # one download folder per version of the pins, so that no stale wheel is unpacked
    dali_wheels=$WHEELS/dali-$(sha256sum requirements-dali.txt | cut -c1-12)
    if "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -r requirements-dali.txt -d "$dali_wheels"; then
        rm -rf "$DALI_SITE.tmp"
        for wheel in "$dali_wheels"/*.whl; do
            "$PYTHON" -m zipfile -e "$wheel" "$DALI_SITE.tmp"
        done
        rm -rf "$DALI_SITE"
        mv "$DALI_SITE.tmp" "$DALI_SITE"
        echo "built $DALI_SITE: $(du -sh "$DALI_SITE" | cut -f1)"
    else
        echo "warning: DALI's wheels did not download; the GPU check will report DALI missing" >&2
    fi
fi

if [ "${GPU_PREPARE_CHECK:-1}" = 0 ]; then
    exit 0
fi
# Import check: PYTHON without its site-packages (-S), with the project, .device/site and links
# to only the GPU machine's packages on the path. The pycocotools extension is built for 3.12:
# under an older PYTHON its own pycocotools stands in (the 3.12 import is checked by
# gpu_check.py's environment step on the GPU machine).
bare=$(mktemp -d)
trap 'rm -rf "$bare"' EXIT
mkdir "$bare/first" "$bare/gpu"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    ln -s "$("$PYTHON" -c 'import os, pycocotools; print(os.path.dirname(pycocotools.__file__))')" \
        "$bare/first/pycocotools"
fi
# shellcheck disable=SC2086
"$PYTHON" - "$bare/gpu" $ON_GPU_MACHINE <<'PY'
"""Link the top-level entries of these distributions and of everything they require."""
import importlib.metadata
import os
import re
import sys

bare, todo, seen = sys.argv[1], list(sys.argv[2:]), set()
while todo:
    name = re.split(r"[\s<>=!~;\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        continue  # an optional requirement not installed here
    todo += [r for r in dist.requires or [] if "extra ==" not in r]
    for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
        link = os.path.join(bare, top)
        if not os.path.lexists(link):
            os.symlink(dist.locate_file(top), link)
PY
echo "import check: $PYTHON -S with only $ON_GPU_MACHINE (and their requirements)"
PYTHONPATH="$PWD:$bare/first:$PWD/$SITE:$bare/gpu" "$PYTHON" -S - <<'PY'
import moco_d2.detection.train_net  # noqa: F401  (first: it patches detectron2 0.6)
import detectron2.evaluation  # noqa: F401  (pycocotools)
import fvcore.nn  # noqa: F401  (the benchmark's FLOP count)
import moco_d2.demo  # noqa: F401
import moco_d2.pretrain.main  # noqa: F401

print("  fine: moco_d2 pretraining, detection and demo, detectron2.evaluation, fvcore.nn")
PY
