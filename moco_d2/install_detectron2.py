"""Make detectron2 importable: keep a working install, else build the pure-Python 0.6 package.

detectron2 is not on PyPI under its own name; the sdist ``pb1-detectron2==0.6`` carries the
official v0.6 Python sources (checked file by file) but not the C++ sources, so its own build
fails. This downloads it, verifies its sha256 and installs the Python package alone: R50-C4
needs none of the compiled ops (torchvision has nms and roi_align), and
:mod:`moco_d2.detection.compat` handles the rest.

    python -m moco_d2.install_detectron2           # install if needed (idempotent)
    python -m moco_d2.install_detectron2 --check   # report version and source only
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

from moco_d2.errors import DETECTRON2_MISSING
from moco_d2.io import sha256_of

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
SIMPLE_INDEX = "https://pypi.org/simple/pb1-detectron2/"
NETWORK_TIMEOUT_S = 30
# Points at an already-downloaded sdist, for machines without network access.
SDIST_ENV = "MOCO_D2_DETECTRON2_SDIST"

OFFICIAL_HINT = (
    "for the official build with C++ ops: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"
)

# Replaces the sdist's setup.py: no extension, no black pin, model-zoo configs included.
_SETUP_PY = """\
from setuptools import find_packages, setup

setup(
    name="{name}",
    version="{version}",
    description="detectron2 {version} Python sources (no C++ ops), installed by moco_d2",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.7",
)
"""


class InstallError(RuntimeError):
    pass


def describe() -> str | None:
    """One line: which detectron2 is importable, its version and source, or None."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None:
        return None
    import detectron2

    location = os.path.dirname(detectron2.__file__)
    compiled_spec = importlib.util.find_spec("detectron2._C")
    # moco_d2.detection.compat's stand-in for the missing extension has a spec without an origin.
    compiled = compiled_spec is not None and compiled_spec.origin is not None
    try:
        from_sdist = bool(importlib.metadata.version(SDIST_NAME))
    except importlib.metadata.PackageNotFoundError:
        from_sdist = False
    if compiled:
        source = "compiled build with C++ ops"
    elif from_sdist:
        source = f"PyPI sdist {SDIST_NAME}=={SDIST_VERSION}, pure Python (no C++ ops)"
    else:
        source = "pure Python (no C++ ops)"
    return f"detectron2 {detectron2.__version__} ({source}) at {location}"


def _sdist_url() -> str:
    request = urllib.request.Request(
        SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S) as response:
        index = json.load(response)
    filename = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
    for entry in index.get("files", []):
        if entry["filename"] == filename:
            return entry["url"]
    raise InstallError(f"{filename} is not listed at {SIMPLE_INDEX}")


def fetch_sdist(workdir: str) -> str:
    """Path of a verified sdist: from $MOCO_D2_DETECTRON2_SDIST, else downloaded from PyPI."""
    path = os.environ.get(SDIST_ENV)
    if path:
        if not os.path.isfile(path):
            raise InstallError(f"{SDIST_ENV}={path} is not a file")
    else:
        path = os.path.join(workdir, f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz")
        try:
            url = _sdist_url()
            with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_S) as response:
                with open(path, "wb") as f:
                    shutil.copyfileobj(response, f)
        except OSError as e:
            raise InstallError(
                f"could not download {SDIST_NAME}=={SDIST_VERSION} from PyPI ({e}); "
                f"offline, download it elsewhere and set {SDIST_ENV}=/path/to/the.tar.gz"
            ) from None
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise InstallError(f"{path}: sha256 {digest} does not match the expected {SDIST_SHA256}")
    return path


def install_from_sdist(sdist: str, workdir: str) -> None:
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    source = os.path.join(workdir, f"{SDIST_NAME}-{SDIST_VERSION}")
    if not os.path.isdir(os.path.join(source, "detectron2")):
        raise InstallError(f"{sdist} has no detectron2/ package")
    with open(os.path.join(source, "setup.py"), "w") as f:
        f.write(_SETUP_PY.format(name=SDIST_NAME, version=SDIST_VERSION))
    flags = "--quiet --no-deps --no-build-isolation --no-index".split()
    command = [sys.executable, "-m", "pip", "install", *flags, source]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise InstallError("pip could not install detectron2:\n" + result.stderr.strip())


def ensure_installed() -> str:
    """Install detectron2 unless one is importable already; return the description line."""
    found = describe()
    if found:
        return found
    with tempfile.TemporaryDirectory(prefix="moco_d2_detectron2_") as workdir:
        install_from_sdist(fetch_sdist(workdir), workdir)
    importlib.invalidate_caches()
    found = describe()
    if not found:
        raise InstallError("detectron2 still does not import after installation")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report what is installed")
    args = parser.parse_args(argv)
    try:
        line = describe() if args.check else ensure_installed()
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if line is None:
        print(DETECTRON2_MISSING, file=sys.stderr)
        return 1
    print(line)
    if "no C++ ops" in line:
        print(f"note: rotated-box and deformable-conv ops are unavailable; {OFFICIAL_HINT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
