"""ratlib.coco_paths: properties over spellings and trees, every layout, exact errors, CLI, round trip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratlib.coco_paths import (
    KINDS,
    CocoPathError,
    CocoSplit,
    CocoValidationError,
    annotation_filename,
    parse_split,
    resolve_coco,
    validate_annotations,
)
from ratlib.synthetic import make_coco_detection
from ratlib.testing.strategies import coco_split_spellings, coco_trees

FAST = settings(max_examples=200, deadline=None)


@FAST
@given(coco_split_spellings(), st.sampled_from(KINDS))
def test_year_appears_exactly_once(pair: tuple[str, CocoSplit], kind: str) -> None:
    spelling, split = pair
    try:
        name = annotation_filename(spelling, kind=kind)
    except ValueError:
        return  # e.g. panoptic for minival: refused with a message, never a wrong name
    assert name.count(str(split.year)) == 1, name
    assert not re.search(r"(\d{4})\1", name)


@FAST
@given(coco_split_spellings())
def test_every_spelling_parses_to_its_split_and_round_trips(pair: tuple[str, CocoSplit]) -> None:
    spelling, split = pair
    assert parse_split(spelling) == split
    assert parse_split(str(parse_split(spelling))) == parse_split(spelling)
    assert parse_split(spelling, year=split.year) == split  # the same year twice is fine


@FAST
@given(coco_split_spellings(), coco_split_spellings())
def test_same_split_same_paths(a: tuple[str, CocoSplit], b: tuple[str, CocoSplit]) -> None:
    if a[1] == b[1]:
        assert annotation_filename(a[0]) == annotation_filename(b[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coco_trees())
def test_resolve_on_generated_trees(tree) -> None:
    try:
        paths = resolve_coco(tree.root, str(tree.split), layout="auto")
    except CocoPathError as exc:
        assert tree.expected is None, f"should have resolved: {exc}"
        assert str(tree.root) in str(exc) and ("Paths tried:" in str(exc) or "but no image folder" in str(exc))
        return
    assert tree.expected is not None, f"resolved {paths} where nothing should"
    assert paths.annotations.is_file() and paths.images.is_dir()
    assert (paths.annotations, paths.images, paths.split, paths.layout) == (
        tree.expected.annotations, tree.expected.images, tree.expected.split, tree.expected.layout)


@FAST
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=12))
def test_bad_names_raise_value_error_with_suggestions(name: str) -> None:
    try:
        parse_split(name)
    except ValueError as exc:
        assert "closest valid names:" in str(exc) or "only a year" in str(exc) or "names two" in str(exc)
        assert re.search(r"(train|val|test|minival|unlabeled)\S*", str(exc).split(":")[-1])


@pytest.mark.parametrize("bad,message", [
    ("train2017", "split 'train2017' says 2017 but year=2014 was given; the years disagree"),
    ("minival2017", "COCO has no split minival2017 (from 'minival2017'); minival exists as: minival2014"),
    ("test-dev2014", "COCO has no split test-dev2014"),
    ("trian", "unknown COCO split 'trian' (read as 'trian'); closest valid names: train"),
    ("2017", "split '2017' is only a year; name the split too, e.g. train2017, val2017"),
    ("2014_train2017", "names two different years (2014 and 2017)"),
])
def test_error_messages(bad: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_split(bad, year=2014 if bad == "train2017" else None)
    assert message in str(info.value)


def test_annotation_filenames() -> None:
    assert annotation_filename("train2017") == "instances_train2017.json"
    assert annotation_filename("val", 2014, "person_keypoints") == "person_keypoints_val2014.json"
    assert annotation_filename("val2017", kind="captions") == "captions_val2017.json"
    assert annotation_filename("train", kind="panoptic") == "panoptic_train2017.json"
    assert annotation_filename("test") == "image_info_test2017.json"
    assert annotation_filename("test-dev2017") == "image_info_test-dev2017.json"
    assert annotation_filename("minival") == "instances_minival2014.json"
    with pytest.raises(ValueError, match="did you mean 'instances'"):
        annotation_filename("train", kind="instance")
    with pytest.raises(ValueError, match="only have image_info"):
        annotation_filename("test2017", kind="captions")


@pytest.mark.parametrize("layout", ["coco", "roboflow", "detectron2"])
def test_each_layout_round_trip_with_pycocotools(tmp_path: Path, layout: str) -> None:
    from pycocotools.coco import COCO

    written = make_coco_detection(tmp_path, "val2017", num_images=6, layout=layout, seed=3)
    root = tmp_path
    paths = resolve_coco(root, "val", layout="auto")
    assert paths.layout == layout and paths.annotations == written.annotations and paths.images == written.images
    coco = COCO(str(paths.annotations))
    data = json.loads(paths.annotations.read_text())
    assert len(coco.getImgIds()) == len(data["images"]) == 6
    assert len(coco.getAnnIds()) == len(data["annotations"]) > 0
    assert validate_annotations(paths.annotations, paths.images).ok


def test_explicit_paths_win_and_are_checked(tmp_path: Path) -> None:
    written = make_coco_detection(tmp_path / "elsewhere", "train2017", num_images=2)
    paths = resolve_coco(tmp_path, "train", annotations=written.annotations, images=written.images)
    assert paths.layout == "explicit" and paths.annotations == written.annotations
    with pytest.raises(CocoPathError, match="annotations=.*given explicitly does not exist"):
        resolve_coco(tmp_path, "train", annotations=tmp_path / "nope.json", images=written.images)


def test_root_from_environment_and_user_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_coco_detection(tmp_path / "datasets", "train2017", num_images=2, layout="detectron2")
    monkeypatch.delenv("COCO_ROOT", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    assert resolve_coco(None, "train2017").layout == "detectron2"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_coco("~/datasets", "train2017").layout == "detectron2"
    monkeypatch.setenv("MYDATA", str(tmp_path / "datasets" / "coco"))
    assert resolve_coco("$MYDATA", "train").layout == "coco"
    monkeypatch.delenv("DETECTRON2_DATASETS")
    with pytest.raises(CocoPathError, match="neither COCO_ROOT nor DETECTRON2_DATASETS is set"):
        resolve_coco(None, "train")


def test_not_found_lists_what_exists(tmp_path: Path) -> None:
    make_coco_detection(tmp_path, "val2017", num_images=2)
    with pytest.raises(CocoPathError) as info:
        resolve_coco(tmp_path, "instances_train2017.json")
    text = str(info.value)
    assert "no instances annotations for split train2017 (parsed as name='train', year=2017)" in text
    assert str(tmp_path / "annotations" / "instances_train2017.json") in text
    assert "Annotation files that exist under the root:" in text
    assert f"Closest match: {tmp_path / 'annotations' / 'instances_val2017.json'}" in text
    assert isinstance(info.value, FileNotFoundError) and info.value.closest is not None


def test_missing_image_folder_is_an_error(tmp_path: Path) -> None:
    written = make_coco_detection(tmp_path, "train2017", num_images=2)
    for f in written.images.iterdir():
        f.unlink()
    written.images.rmdir()
    with pytest.raises(CocoPathError, match="but no image folder"):
        resolve_coco(tmp_path, "train")
    assert resolve_coco(tmp_path, "train", check=False).images == written.images


def test_validation_reports_every_problem(tmp_path: Path) -> None:
    written = make_coco_detection(tmp_path, "train2017", num_images=3, seed=1)
    data = json.loads(written.annotations.read_text())
    data["annotations"][0]["category_id"] = 99
    data["annotations"][1]["bbox"] = [0, 0, 0, 5]
    data["annotations"].append({"id": 1000, "image_id": 42, "category_id": 1, "bbox": [120, 120, 50, 50]})
    written.annotations.write_text(json.dumps(data))
    (written.images / "000002.png").unlink()
    with pytest.raises(CocoValidationError) as info:
        resolve_coco(tmp_path, "train", validate=True)
    errors = "\n".join(info.value.report.errors)
    assert "category_id 99 is not in categories" in errors
    assert "has non-positive size" in errors
    assert "image_id 42 is not in images" in errors
    assert "000002.png does not exist" in errors
    written.annotations.write_text("{not json")
    assert "not valid JSON" in validate_annotations(written.annotations).errors[0]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ratlib", "coco", *args], capture_output=True, text=True)


def test_cli(tmp_path: Path) -> None:
    make_coco_detection(tmp_path, "val2017", num_images=2, layout="roboflow")
    ok = _cli(str(tmp_path), "val", "--json", "--check")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["layout"] == "roboflow" and out["split"] == "val2017" and out["check"]["counts"]["images"] == 2
    text = _cli(str(tmp_path), "VAL2017")
    assert text.returncode == 0 and "layout       roboflow" in text.stdout
    bad = _cli(str(tmp_path), "train2017")
    assert bad.returncode == 1 and "Paths tried:" in bad.stderr and "_annotations.coco.json" in bad.stderr
    worse = _cli(str(tmp_path), "minival2017")
    assert worse.returncode == 1 and "minival exists as: minival2014" in worse.stderr


def test_synthetic_is_deterministic_and_has_options(tmp_path: Path) -> None:
    a = make_coco_detection(tmp_path / "a", "train2017", num_images=4, seed=7, empty_images=1, crowd_fraction=0.5)
    b = make_coco_detection(tmp_path / "b", "train2017", num_images=4, seed=7, empty_images=1, crowd_fraction=0.5)
    assert a.annotations.read_text() == b.annotations.read_text()
    assert (a.images / "000003.png").read_bytes() == (b.images / "000003.png").read_bytes()
    data = json.loads(a.annotations.read_text())
    assert 1 not in {ann["image_id"] for ann in data["annotations"]}  # the empty image
    with pytest.raises(ValueError, match="roboflow layout has no minival split"):
        make_coco_detection(tmp_path / "c", "minival", layout="roboflow")
