"""A COCO-format dataset of one's own (``--coco-dataset NAME JSON IMAGE_DIR``, docs/coco.md):
the pre-launch checks of the protocol's COCO splits, and a run of train_net (through
run_trials) on one, from a release checkpoint converted in memory."""

import json
import os
import subprocess
import sys

import pytest
import releases
import torch
import torchvision
from coco_tiny import COCO_TINY_OPTS, make_synthetic_coco

from moco_d2.detection import train_net
from moco_d2.errors import UserError
from moco_d2.io import sha256_of

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO = os.path.join(REPO, "configs", "coco_R50_C4_2x.yaml")
VOC = os.path.join(REPO, "configs", "voc_R50_C4.yaml")


def own_coco(root):
    """The synthetic COCO tree relabelled as an export of one's own: its 3 categories only,
    with their ids (1, 3, 18) and names of the exporting tool's choosing."""
    make_synthetic_coco(root, num_train=4, num_val=2)
    names = {1: "red blob", 3: "green blob", 18: "blue blob"}
    splits = {}
    for split in ("train2017", "val2017"):
        json_file = root / "coco" / "annotations" / f"instances_{split}.json"
        data = json.loads(json_file.read_text())
        data["categories"] = [
            {"id": i, "name": n, "supercategory": "blob"} for i, n in names.items()
        ]
        json_file.write_text(json.dumps(data))
        splits[split] = (str(json_file), str(root / "coco" / split))
    return splits


@pytest.fixture
def own(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    splits = own_coco(tmp_path / "own")
    names = {"train2017": f"own_train_{tmp_path.name}", "val2017": f"own_val_{tmp_path.name}"}
    yield {
        "flags": [
            part
            for split, name in names.items()
            for part in ("--coco-dataset", name, *splits[split])
        ],
        "opts": ["DATASETS.TRAIN", f"('{names['train2017']}',)"]
        + ["DATASETS.TEST", f"('{names['val2017']}',)"],
        "train_json": splits["train2017"][0],
    }
    for name in names.values():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _own_train_net(own, tmp_path, *opts):
    return train_net.main(
        ["--config-file", COCO, *own["flags"], "MODEL.WEIGHTS", "", *own["opts"]]
        + [*COCO_TINY_OPTS, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / "out"), *opts]
    )


def test_own_dataset_needs_its_number_of_classes(own, tmp_path):
    with pytest.raises(UserError) as e:
        _own_train_net(own, tmp_path)
    assert str(e.value).endswith(
        "has 3 categories, but MODEL.ROI_HEADS.NUM_CLASSES is 80: add MODEL.ROI_HEADS.NUM_CLASSES 3"
    )
    assert not (tmp_path / "out").exists()


def test_own_dataset_gets_the_box_checks_of_coco(own, tmp_path):
    data = json.loads(open(own["train_json"]).read())
    data["annotations"][1]["bbox"][2] = -4.0
    with open(own["train_json"], "w") as f:
        json.dump(data, f)
    with pytest.raises(UserError, match=r"invalid COCO annotation .*annotation 2 .* is inverted"):
        _own_train_net(own, tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", "3")


@pytest.mark.parametrize(
    "flag, says",
    [
        (["own", "absent.json", "."], "--coco-dataset own: annotation file not found: absent.json"),
        (["own", VOC, "absent/"], "--coco-dataset own: image folder not found: absent/"),
        (
            ["coco_2017_val", VOC, "."],
            "--coco-dataset coco_2017_val: another dataset is registered",
        ),
    ],
)
def test_coco_dataset_flag_mistakes_are_one_line(flag, says):
    with pytest.raises(UserError, match=f"^{says}"):
        train_net.main(["--config-file", COCO, "--coco-dataset", *flag])


@pytest.fixture(scope="module")
def dino_checkpoint(tmp_path_factory):
    """DINO's full checkpoint (main_dino.py) around a randomly initialised ResNet-50 teacher."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    resnet.fc = torch.nn.Identity()
    checkpoint = releases.dino_full()
    checkpoint["teacher"] = {
        **releases.prefixed("module.backbone.", resnet.state_dict()),
        **{k: v for k, v in checkpoint["teacher"].items() if ".head." in k},
    }
    path = tmp_path_factory.mktemp("dino") / "dino_resnet50_pretrain_full_checkpoint.pth"
    torch.save(checkpoint, path)
    return str(path)


@pytest.mark.slow
def test_run_trials_fine_tunes_a_raw_dino_checkpoint_on_an_own_dataset(
    dino_checkpoint, own, tmp_path
):
    out = tmp_path / "trials"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "run_trials.py"), "--config-file", COCO]
        + ["--num-trials", "1", "--output-dir", str(out), *own["flags"]]
        + ["MODEL.WEIGHTS", dino_checkpoint, "MODEL.ROI_HEADS.NUM_CLASSES", "3", *own["opts"]]
        + [*COCO_TINY_OPTS, "SOLVER.MAX_ITER", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprint = json.loads((out / "trials_fingerprint.json").read_text())
    assert fingerprint["weights_sha256"] == sha256_of(dino_checkpoint)
    train_name = own["opts"][1].strip("(',)")
    assert fingerprint["datasets"]["train"][train_name]["annotations"] == sha256_of(
        own["train_json"]
    )
    (metrics,) = json.loads((out / "trial_0" / "metrics_coco.json").read_text()).values()
    assert {"AP", "AP50", "segm"} <= set(metrics) and 0 <= metrics["AP50"] <= 100
    log = (out / "trial_0" / "log.txt").read_text()
    assert "input format: checkpoint, teacher with module.backbone.*" in log
    assert "second trunks dropped (--trunk takes one instead): student" in log
    assert "converted 265 tensors in memory" in log
    assert "dropped  student/module.backbone.conv1.weight" in log  # the report, in the log file
