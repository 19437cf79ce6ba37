"""ratlib.synthetic.make_coco_detection: valid COCO that pycocotools loads, boxes that match the pixels."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ratlib.coco_paths import CocoSplit, resolve_coco, validate_annotations
from ratlib.synthetic import make_coco_detection
from ratlib.synthetic.coco import SHAPES

# pycocotools' mask decoding warns under numpy 2 (its own code, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def _coco(path: Path):  # pycocotools prints progress; keep test output clean
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _check_pixels(paths) -> list[float]:
    """Every box and area equals the drawn pixels of its colour; returns polygon/pixel IoUs."""
    coco = _coco(paths.annotations)
    ious = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.imgs[ann["image_id"]]
        pixels = np.asarray(Image.open(paths.images / image["file_name"]).convert("RGB"))
        assert pixels.shape == (image["height"], image["width"], 3)
        x, y, w, h = map(int, ann["bbox"])
        assert [x, y, w, h] == ann["bbox"] and w > 0 and h > 0
        drawn = np.zeros(pixels.shape[:2], dtype=bool)  # boxes never overlap: only this object is inside
        drawn[y : y + h, x : x + w] = (pixels[y : y + h, x : x + w] == SHAPES[ann["category_id"] - 1][1]).all(axis=-1)
        ys, xs = np.nonzero(drawn)
        assert (xs.min(), ys.min(), xs.max() + 1 - x, ys.max() + 1 - y) == (x, y, w, h), ann["id"]
        assert drawn.sum() == ann["area"]
        mask = coco.annToMask(ann).astype(bool)
        if ann["iscrowd"]:
            assert isinstance(ann["segmentation"], dict) and (mask == drawn).all()  # RLE: exact
        else:
            ious.append((mask & drawn).sum() / (mask | drawn).sum())
    return ious


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.one_of(st.integers(48, 160), st.tuples(st.integers(40, 160), st.integers(40, 160))),
    categories=st.integers(1, len(SHAPES)),
    objects=st.tuples(st.integers(0, 3), st.integers(0, 4)).map(sorted),
    crowd=st.sampled_from([0.0, 0.3, 1.0]),
    layout=st.sampled_from(["coco", "roboflow", "detectron2"]),
    split=st.sampled_from(["train", "val2014", "val"]),
    seed=st.integers(0, 2**32),
)
def test_generated_datasets_are_valid_and_exact(
    tmp_path_factory: pytest.TempPathFactory,
    size,
    categories: int,
    objects: list[int],
    crowd: float,
    layout: str,
    split: str,
    seed: int,
) -> None:
    root = tmp_path_factory.mktemp("gen")
    written = make_coco_detection(
        root,
        split,
        num_images=3,
        layout=layout,
        seed=seed,
        image_size=size,
        num_categories=categories,
        min_objects=objects[0],
        max_objects=objects[1],
        crowd_fraction=crowd,
    )
    assert resolve_coco(root, split) == written  # what it wrote is what resolve_coco finds
    report = validate_annotations(written.annotations, written.images)
    assert report.ok, report
    data = json.loads(written.annotations.read_text())
    assert [c["name"] for c in data["categories"]] == [s[0] for s in SHAPES[:categories]]
    assert report.counts["images"] == 3 and report.counts["annotations"] <= 3 * objects[1]
    crowds = {ann["iscrowd"] for ann in data["annotations"]}
    assert crowds <= ({1} if crowd == 1.0 else {0} if crowd == 0.0 else {0, 1})
    ious = _check_pixels(written)
    assert all(iou >= 0.6 for iou in ious), ious


def test_round_trip_through_pycocotools(tmp_path: Path) -> None:
    written = make_coco_detection(
        tmp_path, "val2017", num_images=12, seed=0, image_size=(160, 128), crowd_fraction=0.2, empty_images=2
    )
    assert written == resolve_coco(tmp_path, "val") and written.layout == "coco"
    assert written.annotations == tmp_path / "annotations" / "instances_val2017.json"
    coco = _coco(written.annotations)
    data = json.loads(written.annotations.read_text())
    assert len(coco.getImgIds()) == len(data["images"]) == 12 == len(list(written.images.iterdir()))
    assert len(coco.getAnnIds()) == len(data["annotations"]) > 12
    assert len(coco.getCatIds()) == 3 and {ann["iscrowd"] for ann in data["annotations"]} == {0, 1}
    assert coco.getAnnIds(imgIds=[1, 2]) == []  # the empty images come first
    assert all(img["width"] == 160 and img["height"] == 128 for img in data["images"])
    assert data["images"][0]["file_name"] == "000000000001.png"
    ious = _check_pixels(written)
    assert min(ious) >= 0.75 and sum(ious) / len(ious) >= 0.95, ious


def test_deterministic_by_seed_and_split_and_stable_in_length(tmp_path: Path) -> None:
    a = make_coco_detection(tmp_path / "a", "train", num_images=4, seed=7, crowd_fraction=0.5)
    b = make_coco_detection(tmp_path / "b", "train", num_images=4, seed=7, crowd_fraction=0.5)
    c = make_coco_detection(tmp_path / "c", "train", num_images=6, seed=7, crowd_fraction=0.5)
    d = make_coco_detection(tmp_path / "d", "train", num_images=4, seed=8, crowd_fraction=0.5)
    e = make_coco_detection(tmp_path / "e", "val", num_images=4, seed=7, crowd_fraction=0.5)
    read = lambda p: {f.name: f.read_bytes() for f in sorted(p.images.iterdir())}  # noqa: E731
    assert a.annotations.read_text() == b.annotations.read_text() and read(a) == read(b)
    assert {k: v for k, v in read(c).items() if k in read(a)} == read(a)  # image i is the same for any length
    assert read(d) != read(a) and read(e) != read(a)


def test_layouts_and_test_splits(tmp_path: Path) -> None:
    rf = make_coco_detection(tmp_path / "rf", "val", num_images=2, layout="roboflow")
    assert rf.annotations == tmp_path / "rf/valid/_annotations.coco.json" and rf.images == tmp_path / "rf/valid"
    d2 = make_coco_detection(tmp_path / "d2", "minival", num_images=2, layout="detectron2")
    assert d2.annotations == tmp_path / "d2/coco/annotations/instances_minival2014.json"
    assert d2.images == tmp_path / "d2/coco/val2014" and resolve_coco(tmp_path / "d2", "minival") == d2
    test = make_coco_detection(tmp_path / "t", "test-dev", num_images=2)
    assert test.annotations.name == "image_info_test-dev2017.json" and test.images.name == "test2017"
    assert "annotations" not in json.loads(test.annotations.read_text())  # like COCO: no test labels
    assert validate_annotations(test.annotations, test.images).ok
    labelled = make_coco_detection(tmp_path / "rf", "test", num_images=2, layout="roboflow")
    assert json.loads(labelled.annotations.read_text())["annotations"]  # Roboflow test folders have labels
    with pytest.raises(ValueError, match="the roboflow layout has no minival split"):
        make_coco_detection(tmp_path / "x", "minival", layout="roboflow")


def test_jpeg_keeps_boxes_and_colours_close(tmp_path: Path) -> None:
    written = make_coco_detection(tmp_path, "train", num_images=2, image_format="jpg", image_size=96)
    data = json.loads(written.annotations.read_text())
    assert all(im["file_name"].endswith(".jpg") for im in data["images"])
    ann = data["annotations"][0]
    x, y, w, h = map(int, ann["bbox"])
    pixels = np.asarray(Image.open(written.images / data["images"][ann["image_id"] - 1]["file_name"]))
    centre = pixels[y + h // 2 + 1, x + w // 2].astype(int)  # +1: inside a triangle too
    assert np.abs(centre - SHAPES[ann["category_id"] - 1][1]).max() < 24


def test_reruns_replace_their_own_output_and_nothing_else(tmp_path: Path) -> None:
    make_coco_detection(tmp_path, "train", num_images=5)
    again = make_coco_detection(tmp_path, "train", num_images=3, image_format="jpg")
    assert sorted(f.name for f in again.images.iterdir()) == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    again.annotations.unlink()  # as if interrupted before the JSON: its images are still known as ours
    assert make_coco_detection(tmp_path, "train", num_images=3, image_format="jpg").annotations.is_file()
    foreign = tmp_path / "real"
    (foreign / "annotations").mkdir(parents=True)
    (foreign / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(FileExistsError) as info:
        make_coco_detection(foreign, "val")
    assert str(info.value) == (
        f"make_coco_detection: {foreign / 'annotations/instances_val2017.json'} exists and was not written by "
        "make_coco_detection; refusing to replace it. Fix: choose another root, or pass overwrite=True."
    )
    (foreign / "val2017").mkdir()
    Image.new("RGB", (8, 8)).save(foreign / "val2017" / "000000000001.png")  # someone's own image
    (foreign / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(FileExistsError, match=re.escape("already holds 1 file(s) it would replace (e.g. 000000000001")):
        make_coco_detection(foreign, "val", num_images=2)
    assert Image.open(foreign / "val2017" / "000000000001.png").size == (8, 8)
    assert make_coco_detection(foreign, "val", num_images=2, overwrite=True).annotations.is_file()


def test_argument_errors_name_every_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        make_coco_detection(
            tmp_path,
            "train",
            num_images=0,
            num_categories=9,
            min_objects=3,
            max_objects=1,
            crowd_fraction=2.0,
            image_format="gif",
            object_size=(0.5, 0.1),
        )
    assert str(info.value) == (
        "make_coco_detection: bad arguments. Got: num_images=0 (expected an int >= 1); num_categories=9 "
        "(expected 1 to 5: square, "
        "circle, triangle, diamond, hexagon); min_objects=3, max_objects=1 (expected 0 <= min <= max <= 20); "
        "object_size=(0.5, 0.1) (expected (low, high) fractions of the shorter image side, 0.05 <= low <= high "
        "<= 0.6); crowd_fraction=2.0 (expected 0.0 to 1.0); "
        "image_format='gif' (expected 'png' or 'jpg')."
    )
    with pytest.raises(ValueError, match="image_size=\\(16, 64\\). Expected: an int or a \\(width, height\\) pair"):
        make_coco_detection(tmp_path, "train", image_size=(16, 64))
    with pytest.raises(ValueError, match="unknown COCO split 'trian'"):
        make_coco_detection(tmp_path, "trian")
    with pytest.raises(ValueError, match="layout='yolo' is unknown"):
        make_coco_detection(tmp_path, "train", layout="yolo")
    assert not any(tmp_path.iterdir())  # nothing written before the arguments were checked


def test_import_is_light() -> None:
    code = (
        "import sys, ratlib.synthetic.coco, ratlib.synthetic\n"
        "print(','.join(m for m in ('PIL', 'numpy', 'torch', 'pycocotools', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_returns_coco_paths_of_a_checked_split(tmp_path: Path) -> None:
    written = make_coco_detection(tmp_path, CocoSplit("val", 2014), num_images=1)
    assert written.split == CocoSplit("val", 2014) and written.annotations.name == "instances_val2014.json"
