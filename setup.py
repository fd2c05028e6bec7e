"""moco_d2: MoCo v2 pretraining and Detectron2 transfer evaluation.

detectron2 is not listed in install_requires: it is not on PyPI under its own name.
`make install` (or `python -m moco_d2.install_detectron2`) provides it; see the README.
"""

from setuptools import find_packages, setup

setup(
    name="moco_d2",
    version="0.1.0",
    description="MoCo v2 pretraining, MoCo→Detectron2 conversion and VOC detection transfer",
    packages=find_packages(include=["moco_d2", "moco_d2.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "torchvision>=0.20",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools>=2.0.2",
        "safetensors>=0.4",
        "numpy",
        "Pillow",
        "matplotlib",
        "tqdm",
        "tensorboard",
        "submitit>=1.5",
        "scipy",
    ],
    extras_require={"test": ["pytest"]},
)
