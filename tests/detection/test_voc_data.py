"""VOC loading fails with the path of what is wrong; registration and the synthetic tree work."""

import os
import shutil

import pytest

import moco_d2.detection  # noqa: F401  (compat shims and registrations must precede detectron2)

# isort: split
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from moco_d2.detection.data import prepare_voc
from moco_d2.detection.data.prepare_voc import check_voc_tree
from moco_d2.detection.data.synthetic import make_synthetic_voc
from moco_d2.detection.data.voc import CLASS_NAMES, load_voc_instances, register_all_voc
from moco_d2.errors import UserError

ANNOTATION = """<annotation><size><width>60</width><height>40</height><depth>3</depth></size>
<object><name>dog</name><difficult>1</difficult>
<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
<object><name>cat</name>
<bndbox><xmin>5</xmin><ymin>6</ymin><xmax>7</xmax><ymax>8</ymax></bndbox></object>
</annotation>"""


@pytest.fixture
def voc_dir(tmp_path):
    """A one-image VOC2007 folder, valid until a test breaks it."""
    d = tmp_path / "VOC2007"
    (d / "ImageSets" / "Main").mkdir(parents=True)
    (d / "Annotations").mkdir()
    (d / "JPEGImages").mkdir()
    (d / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    (d / "Annotations" / "000001.xml").write_text(ANNOTATION)
    (d / "JPEGImages" / "000001.jpg").write_bytes(b"not decoded by the loader")
    return d


def test_loads_boxes_classes_and_difficult(voc_dir):
    (record,) = load_voc_instances(str(voc_dir), "test")
    assert record["file_name"] == str(voc_dir / "JPEGImages" / "000001.jpg")
    assert (record["image_id"], record["height"], record["width"]) == ("000001", 40, 60)
    dog, cat = record["annotations"]
    assert dog["category_id"] == CLASS_NAMES.index("dog") and dog["difficult"] == 1
    assert dog["bbox"] == [0.0, 1.0, 30.0, 40.0] and dog["bbox_mode"] == BoxMode.XYXY_ABS
    assert cat["category_id"] == CLASS_NAMES.index("cat") and cat["difficult"] == 0


@pytest.mark.parametrize(
    "written, read",
    [("1", 1), ("0", 0), (" YES ", 1), ("no", 0), ("True", 1), ("false", 0), ("", 0)],
)
def test_difficult_spellings_of_annotation_tools(voc_dir, written, read):
    path = voc_dir / "Annotations" / "000001.xml"
    path.write_text(
        ANNOTATION.replace("<difficult>1</difficult>", f"<difficult>{written}</difficult>")
    )
    (record,) = load_voc_instances(str(voc_dir), "test")
    assert [a["difficult"] for a in record["annotations"]] == [read, 0]


def test_decimal_coordinates_are_kept_and_pose_truncated_optional(voc_dir):
    path = voc_dir / "Annotations" / "000001.xml"
    path.write_text(ANNOTATION.replace("<xmin>1</xmin>", "<xmin>17.5</xmin>"))
    assert "<pose>" not in ANNOTATION and "<truncated>" not in ANNOTATION
    (record,) = load_voc_instances(str(voc_dir), "test")
    assert record["annotations"][0]["bbox"] == [16.5, 1.0, 30.0, 40.0]


def expect_error(voc_dir, path):
    with pytest.raises(UserError) as e:
        load_voc_instances(str(voc_dir), "test")
    assert str(path) in str(e.value)
    return str(e.value)


def test_missing_folder(tmp_path):
    expect_error(tmp_path / "VOC2007", tmp_path / "VOC2007")


def test_missing_split_file(voc_dir):
    path = voc_dir / "ImageSets" / "Main" / "test.txt"
    path.unlink()
    expect_error(voc_dir, path)


def test_missing_image(voc_dir):
    path = voc_dir / "JPEGImages" / "000001.jpg"
    path.unlink()
    expect_error(voc_dir, path)


def test_missing_annotation(voc_dir):
    path = voc_dir / "Annotations" / "000001.xml"
    path.unlink()
    expect_error(voc_dir, path)


@pytest.mark.parametrize(
    "broken, reason",
    [
        ("<annotation><size>", "malformed"),
        (ANNOTATION.replace("<xmax>30</xmax>", ""), "xmax"),
        (ANNOTATION.replace("<xmax>30</xmax>", "<xmax>3O</xmax>"), "3O"),
        (ANNOTATION.replace("<name>dog</name>", "<name>dragon</name>"), "dragon"),
        (ANNOTATION.replace("<width>60</width>", ""), "width"),
        (
            ANNOTATION.replace("<difficult>1</difficult>", "<difficult>maybe</difficult>"),
            "object 1 (dog): <difficult> is 'maybe' (expected 0 or 1",
        ),
    ],
)
def test_malformed_annotation(voc_dir, broken, reason):
    path = voc_dir / "Annotations" / "000001.xml"
    path.write_text(broken)
    assert reason in expect_error(voc_dir, path)


def test_registered_names_follow_the_root(registered_voc, tmp_path):
    for name, folder, split in [
        ("voc_2007_trainval", "VOC2007", "trainval"),
        ("voc_2012_trainval", "VOC2012", "trainval"),
        ("voc_2007_test", "VOC2007", "test"),
    ]:
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "pascal_voc"
        assert meta.dirname == os.path.join(str(registered_voc), folder) and meta.split == split
        assert meta.thing_classes == list(CLASS_NAMES)
        dicts = DatasetCatalog.get(name)
        assert dicts and all(d["file_name"].startswith(meta.dirname) for d in dicts)
    # Re-registering elsewhere replaces loader and metadata; errors then name the new root.
    register_all_voc(str(tmp_path))
    assert MetadataCatalog.get("voc_2007_test").dirname == str(tmp_path / "VOC2007")
    with pytest.raises(UserError, match=str(tmp_path / "VOC2007")):
        DatasetCatalog.get("voc_2007_test")


def test_synthetic_tree_layout_and_content(synthetic_voc_root):
    rows = {row["name"]: row for row in check_voc_tree(str(synthetic_voc_root))}
    assert {n: r["images"] for n, r in rows.items()} == {
        "voc_2007_trainval": 4,
        "voc_2012_trainval": 4,
        "voc_2007_test": 4,
    }
    assert all(not r["problems"] and r["objects"] >= r["images"] for r in rows.values())
    dicts = load_voc_instances(str(synthetic_voc_root / "VOC2007"), "trainval")
    for d in dicts:
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= d["width"] and 0 <= y0 < y1 <= d["height"]
            assert a["category_id"] < 4  # num_classes_used default


def test_synthetic_tree_is_deterministic_and_learnable_in_principle(tmp_path):
    make_synthetic_voc(tmp_path / "a", 4, 2, 64, seed=3, num_classes_used=2)
    make_synthetic_voc(tmp_path / "b", 4, 2, 64, seed=3, num_classes_used=2)
    for sub in ("VOC2007/Annotations/000000.xml", "VOC2007/JPEGImages/000003.jpg"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes()
    # Each class is its own colour: the pixel at a box centre identifies the class.
    colours = {}
    for d in load_voc_instances(str(tmp_path / "a" / "VOC2007"), "trainval"):
        image = Image.open(d["file_name"]).convert("RGB")
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            pixel = image.getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2)))
            colours.setdefault(a["category_id"], []).append(pixel)
    for pixels in colours.values():
        ref = pixels[0]
        assert all(max(abs(p - r) for p, r in zip(px, ref)) < 30 for px in pixels)


def test_prepare_voc_check_reports_problems(synthetic_voc_root, tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(synthetic_voc_root, tree)
    prepare_voc.main(["check", "--root", str(tree)])
    assert "OK" in capsys.readouterr().out
    missing = tree / "VOC2012" / "JPEGImages" / "2012_000001.jpg"
    missing.unlink()
    with pytest.raises(UserError, match="1 problem"):
        prepare_voc.main(["check", "--root", str(tree)])
    assert str(missing) in capsys.readouterr().out


def test_prepare_voc_synthetic_refuses_existing_tree(synthetic_voc_root):
    with pytest.raises(UserError, match="VOC2007"):
        prepare_voc.main(["synthetic", "--root", str(synthetic_voc_root)])
