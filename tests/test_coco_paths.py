"""ratlib.coco_paths: properties over spellings and trees, every layout, exact errors, validation, the CLI."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from ratlib.coco_paths import (
    KINDS,
    SPLITS,
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

FAST = settings(max_examples=150, deadline=None)
VALID = {f"{n}{y}" for n, ys in SPLITS.items() for y in ys} | set(SPLITS)

# ---------------------------------------------------------------------------------------------
# Properties (strategies from ratlib.testing.strategies, the same ones downstream projects use)


@FAST
@given(coco_split_spellings(), st.sampled_from(KINDS))
def test_file_name_has_the_year_exactly_once(pair: tuple[str, CocoSplit], kind: str) -> None:
    spelling, split = pair
    try:
        name = annotation_filename(spelling, kind=kind)
    except ValueError as exc:  # e.g. panoptic minival: refused with a reason, never a made-up name
        assert str(split) in str(exc)
        return
    assert name.count(str(split.year)) == 1, name
    assert not re.search(r"(\d{4})\D*\1", name), name
    assert name == annotation_filename(split, kind=kind) and name.endswith(f"{split}.json")


@FAST
@given(coco_split_spellings())
def test_every_spelling_parses_to_its_split_and_round_trips(pair: tuple[str, CocoSplit]) -> None:
    spelling, split = pair
    assert parse_split(spelling) == split
    assert parse_split(str(parse_split(spelling))) == parse_split(spelling)
    assert parse_split(spelling, year=split.year) == split  # the same year twice is fine
    assert parse_split(split) is split


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_spellings_of_one_split_resolve_to_the_same_paths(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    split = data.draw(st.sampled_from([CocoSplit("train", 2017), CocoSplit("val", 2014), CocoSplit("minival", 2014)]))
    root = _DATASET_ROOTS.get(split) or _make_root(tmp_path_factory, split)
    a, _ = data.draw(coco_split_spellings(split=split.name, year=split.year))
    b, _ = data.draw(coco_split_spellings(split=data.draw(st.sampled_from([str(split), split]))))
    assert resolve_coco(root, a) == resolve_coco(root, b) == resolve_coco(root, split.name, year=split.year)


_DATASET_ROOTS: dict[CocoSplit, Path] = {}


def _make_root(factory: pytest.TempPathFactory, split: CocoSplit) -> Path:
    root = factory.mktemp(str(split))
    for other in {split, *(CocoSplit(split.name, y) for y in SPLITS[split.name])}:  # other years as decoys
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / annotation_filename(other)).write_text("{}")
        (root / other.image_folder).mkdir(exist_ok=True)
    _DATASET_ROOTS[split] = root
    return root


@pytest.mark.parametrize(
    "spelling",
    ["train20172017", "train2017_2017", "2017_train_2017", "TRAIN-2017-2017", "instances_train2017_2017.json"],
)
def test_a_year_written_twice_that_agrees_is_fine(spelling: str) -> None:
    assert parse_split(spelling) == CocoSplit("train", 2017)
    assert annotation_filename(spelling) == "instances_train2017.json"  # never instances_train20172017.json


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coco_trees(), st.booleans(), st.data())
def test_resolve_on_generated_trees(tree, auto: bool, data: st.DataObject) -> None:
    """Existing, expected paths or CocoPathError: never another exception, never a decoy file. The split is
    given in any spelling that parse_split accepts (train2017, 2017_train, instances_train2017.json, ...)."""
    spelling, _ = data.draw(coco_split_spellings(split=tree.split.name, year=tree.split.year), label="spelling")
    try:
        paths = resolve_coco(tree.root, spelling, kind=tree.kind, layout="auto" if auto else tree.layout)
    except CocoPathError as exc:
        assert tree.expected is None, f"should have resolved to {tree.expected}: {exc}"
        assert str(tree.split) in str(exc) and str(tree.root) in str(exc)
        return
    assert paths == tree.expected, f"{paths} != {tree.expected}; tree: {tree.files}"
    assert paths.annotations.is_file() and paths.images.is_dir()


def test_strategy_arguments_are_checked_at_once() -> None:
    with pytest.raises(ValueError, match="unknown COCO split 'tain'"):
        coco_split_spellings(split="tain")
    with pytest.raises(
        ValueError, match="COCO has no split minival in year 2017. Expected: years per split: train 2017/2014"
    ):
        coco_split_spellings(split="minival", year=2017)
    with pytest.raises(ValueError, match="split='val2014' and year=2017 disagree"):
        coco_split_spellings(split="val2014", year=2017)
    with pytest.raises(ValueError, match="coco_trees: layout='yolo' is unknown. Expected: None or one of coco"):
        coco_trees("yolo")


def test_the_strategies_catch_the_doubled_year_bug() -> None:
    """The f-string this module exists for, and a resolver that only knows 'train2017', fail fast."""

    def doubled(split: str) -> str:
        return f"instances_{split.strip().lower()}2017.json"

    def naive(split: str) -> str:
        return f"instances_{split.strip().lower().removeprefix('instances_').removesuffix('.json')}.json"

    for buggy in (doubled, naive):
        spelling, split = find(
            coco_split_spellings(),
            lambda p, f=buggy: f(p[0]) != annotation_filename(p[1]),
            settings=settings(max_examples=100, database=None),
        )
        assert buggy(spelling) != annotation_filename(split)


@FAST
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_- ./", min_size=1, max_size=16))
def test_bad_names_raise_value_error_with_suggestions(text: str) -> None:
    try:
        split = parse_split(text)
    except ValueError as exc:
        message = str(exc)
        assert repr(text) in message or repr(text.strip()) in message or "year" in message
        assert {w.strip(".,;:()'") for w in message.split()} & VALID, message  # a valid name to try
        return
    assert str(split) in VALID


@FAST
@given(coco_split_spellings(), st.integers(1900, 2100))
def test_a_disagreeing_year_is_refused(pair: tuple[str, CocoSplit], year: int) -> None:
    spelling, split = pair
    if year == split.year or not re.search(r"\d{4}", spelling):
        return
    with pytest.raises(ValueError, match=f"says {split.year} but year={year}. Fix: pass split="):
        parse_split(spelling, year=year)


# ---------------------------------------------------------------------------------------------
# parse_split and annotation_filename, by example


@pytest.mark.parametrize(
    "spelling,expected",
    [
        ("train", "train2017"),
        ("val", "val2017"),
        ("test", "test2017"),
        ("minival", "minival2014"),
        (" TRAIN_2014 ", "train2014"),
        ("2017_val", "val2017"),
        ("instances_val2014.json", "val2014"),
        ("annotations/person_keypoints_train2017.json", "train2017"),
        ("image_info_test-dev2017.json", "test-dev2017"),
        ("testdev2015", "test-dev2015"),
        ("val_minus_minival_2014", "valminusminival2014"),
        ("valid", "val2017"),
        ("export/valid/_annotations.coco.json", "val2017"),
        ("unlabelled", "unlabeled2017"),
        ("train/", "train2017"),
    ],
)
def test_spellings(spelling: str, expected: str) -> None:
    assert str(parse_split(spelling)) == expected


@pytest.mark.parametrize(
    "bad,year,message",
    [
        (
            "train2017",
            2014,
            "parse_split: split 'train2017' says 2017 but year=2014. Fix: pass split='train' with year=2014, "
            "or drop year.",
        ),
        (
            "minival2017",
            None,
            "COCO has no split minival2017 (from 'minival2017'); minival exists as: minival2014. "
            "Fix: use one of the closest valid names: minival2014",
        ),
        (
            "test-dev2014",
            None,
            "COCO has no split test-dev2014 (from 'test-dev2014'); test-dev exists as: test-dev2017, test-dev2015.",
        ),
        (
            "trian",
            None,
            "unknown COCO split 'trian'. Expected: a split name (train, val, test, test-dev, unlabeled, minival, "
            "valminusminival) with an optional year, e.g. train2017. Fix: use one of the closest valid names: "
            "train, train2017, train2014.",
        ),
        ("2017", None, "split '2017' is only a year. Fix: name the split too, e.g. train2017, val2017."),
        (
            "2014_train2017",
            None,
            "split '2014_train2017' names different years (2014 and 2017). "
            "Fix: keep one; closest valid names: train2014, train2017.",
        ),
        (
            "train20142017",
            None,
            "names different years (2014 and 2017). Fix: keep one; closest valid names: train2014, train2017",
        ),
        ("minival2014_2017", None, "closest valid names: minival2014"),
        ("train", "17", "parse_split: year='17' is not a year. Expected: a four-digit year such as 2017 or 2014."),
        ("_annotations.coco.json", None, "is Roboflow's annotation file name, not a split. Fix: pass its folder"),
    ],
)
def test_parse_errors(bad: str, year: str | int | None, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_split(bad, year=year)
    assert message in str(info.value)


def test_coco_split_is_checked_and_canonical() -> None:
    assert str(CocoSplit("test-dev", 2015)) == "test-dev2015" and CocoSplit("minival", 2014).image_folder == "val2014"
    assert CocoSplit("test-dev", 2017).image_folder == "test2017" and CocoSplit("test", 2017).is_test
    with pytest.raises(ValueError, match="COCO has no split minival2017; minival exists as: minival2014"):
        CocoSplit("minival", 2017)
    with pytest.raises(ValueError, match="Fix: use parse_split"):
        CocoSplit("Train", 2017)
    with pytest.raises(TypeError, match="split must be a str or CocoSplit. Got: int"):
        parse_split(2017)  # type: ignore[arg-type]


def test_annotation_filenames() -> None:
    assert annotation_filename("train2017") == "instances_train2017.json"
    assert annotation_filename("val", 2014, "person_keypoints") == "person_keypoints_val2014.json"
    assert annotation_filename("val2017", kind="captions") == "captions_val2017.json"
    assert annotation_filename("train", kind="panoptic") == "panoptic_train2017.json"
    assert annotation_filename("test") == "image_info_test2017.json"
    assert annotation_filename("test-dev2017", kind="image_info") == "image_info_test-dev2017.json"
    assert annotation_filename("unlabeled") == "image_info_unlabeled2017.json"
    assert annotation_filename("minival") == "instances_minival2014.json"
    for kind, bad, message in [
        ("instance", "train", "annotation kind 'instance' is unknown (did you mean 'instances'?)"),
        (
            "captions",
            "test2017",
            "test2017 has no captions annotations (test and unlabeled splits only have image_info_test2017.json)",
        ),
        ("panoptic", "val2014", "no panoptic annotations for val2014. Expected: train2017 or val2017"),
        ("image_info", "val", "val2017 has no image_info file"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            annotation_filename(bad, kind=kind)


# ---------------------------------------------------------------------------------------------
# resolve_coco on every layout


def _touch(root: Path, *files: str) -> Path:
    for rel in files:
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"images": [], "annotations": [], "categories": []}')
    return root


@pytest.mark.parametrize(
    "layout,files,split,kind,annotations,images",
    [
        (
            "coco",
            ["annotations/instances_train2017.json", "train2017/"],
            "train",
            "instances",
            "annotations/instances_train2017.json",
            "train2017",
        ),
        (
            "coco",
            ["annotations/instances_val2014.json", "images/val2014/"],
            "val2014",
            "instances",
            "annotations/instances_val2014.json",
            "images/val2014",
        ),
        (
            "coco",
            ["annotations/person_keypoints_minival2014.json", "val2014/"],
            "minival",
            "person_keypoints",
            "annotations/person_keypoints_minival2014.json",
            "val2014",
        ),
        (
            "coco",
            ["annotations/image_info_test-dev2017.json", "test2017/"],
            "test-dev",
            "instances",
            "annotations/image_info_test-dev2017.json",
            "test2017",
        ),
        (
            "roboflow",
            ["train/_annotations.coco.json", "valid/_annotations.coco.json"],
            "val",
            "instances",
            "valid/_annotations.coco.json",
            "valid",
        ),
        ("roboflow", ["val/_annotations.coco.json"], "val2017", "instances", "val/_annotations.coco.json", "val"),
        (
            "detectron2",
            ["coco/annotations/instances_val2017.json", "coco/val2017/"],
            "val",
            "instances",
            "coco/annotations/instances_val2017.json",
            "coco/val2017",
        ),
    ],
)
def test_layouts(
    tmp_path: Path, layout: str, files: list[str], split: str, kind: str, annotations: str, images: str
) -> None:
    _touch(tmp_path, *files)
    for asked in ("auto", layout):
        paths = resolve_coco(tmp_path, split, kind=kind, layout=asked)
        assert (paths.annotations, paths.images, paths.layout) == (tmp_path / annotations, tmp_path / images, layout)


def resolve_twice_on_ranks(root: str) -> int:
    """A data set built twice (say each epoch) on every rank, under ratlib's logging."""
    from ratlib.rank_logger import setup_logging

    setup_logging("INFO")
    for _ in range(2):
        resolve_coco(root, "train")
        resolve_coco(root, "val")
    return 0


@pytest.mark.distributed
def test_the_layout_and_the_paths_are_logged_once_by_the_main_rank(tmp_path: Path) -> None:
    """A folder holding coco/ is read as detectron2's layout: the main rank says so, once per split."""
    from ratlib.testing import run_on_ranks

    _touch(tmp_path, "coco/annotations/instances_train2017.json", "coco/train2017/")
    _touch(tmp_path, "coco/annotations/instances_val2017.json", "coco/val2017/")
    run = run_on_ranks(resolve_twice_on_ranks, 2, args=(str(tmp_path),), timeout=120).check()
    lines = [line for line in run.outputs[0].splitlines() if "resolve_coco:" in line]
    assert len(lines) == 2, run.outputs[0]
    assert "INFO ratlib.coco_paths: resolve_coco: train2017, detectron2 layout (found by layout='auto')" in lines[0]
    ann, img = tmp_path / "coco/annotations/instances_train2017.json", tmp_path / "coco/train2017"
    assert lines[0].endswith(f"annotations {ann}, images {img}")
    assert "val2017, detectron2 layout" in lines[1]
    assert "resolve_coco:" not in run.outputs[1]


def test_auto_prefers_coco_then_roboflow_then_detectron2(tmp_path: Path) -> None:
    _touch(tmp_path, "coco/annotations/instances_train2017.json", "coco/train2017/")
    assert resolve_coco(tmp_path, "train").layout == "detectron2"
    _touch(tmp_path, "train/_annotations.coco.json")
    assert resolve_coco(tmp_path, "train").layout == "roboflow"
    _touch(tmp_path, "annotations/instances_train2017.json", "train2017/")
    assert resolve_coco(tmp_path, "train").layout == "coco"
    assert resolve_coco(tmp_path, "train", layout="detectron2").layout == "detectron2"


def test_explicit_paths_win_and_are_checked(tmp_path: Path) -> None:
    _touch(tmp_path, "annotations/instances_train2017.json", "train2017/", "mine/labels.json", "mine/pics/")
    paths = resolve_coco(tmp_path, "train", annotations=tmp_path / "mine/labels.json", images=tmp_path / "mine/pics")
    assert paths.layout == "explicit" and paths.annotations == tmp_path / "mine/labels.json"
    only_ann = resolve_coco(tmp_path, "train", annotations=tmp_path / "mine/labels.json")
    assert only_ann.images == tmp_path / "train2017" and only_ann.annotations == tmp_path / "mine/labels.json"
    only_img = resolve_coco(tmp_path, "train", images=tmp_path / "mine/pics")
    assert only_img.annotations == tmp_path / "annotations/instances_train2017.json"
    with pytest.raises(CocoPathError) as info:
        resolve_coco(tmp_path, "train", annotations=tmp_path / "mine/label.json", images=tmp_path / "mine/pics")
    assert str(info.value) == (
        f"resolve_coco: annotations='{tmp_path / 'mine/label.json'}' does not exist (split train2017). "
        f"Got: {tmp_path / 'mine'} holds labels.json; closest match: {tmp_path / 'mine/labels.json'}. "
        "Fix: correct annotations=, or leave it out to look it up under root."
    )
    with pytest.raises(CocoPathError, match="is a folder, expected a .json file"):
        resolve_coco(tmp_path, "train", annotations=tmp_path / "mine", images=tmp_path / "mine/pics")
    with pytest.raises(CocoPathError, match="annotations= was given but no image folder for split val2017"):
        resolve_coco(tmp_path, "val", annotations=tmp_path / "mine/labels.json")
    # both given explicitly: no root is needed at all
    assert resolve_coco(None, "val", annotations=tmp_path / "mine/labels.json", images=tmp_path / "mine/pics").images


def test_root_from_environment_and_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path, "datasets/coco/annotations/instances_train2017.json", "datasets/coco/train2017/")
    monkeypatch.delenv("COCO_ROOT", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    assert resolve_coco(None, "train2017").layout == "detectron2"
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "datasets" / "coco"))  # COCO_ROOT wins
    assert resolve_coco(None, "train2017").layout == "coco"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_coco("~/datasets", "train2017").layout == "detectron2"
    monkeypatch.setenv("MYDATA", str(tmp_path / "datasets"))
    assert resolve_coco("$MYDATA/coco", "train").layout == "coco"
    monkeypatch.delenv("COCO_ROOT")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    with pytest.raises(
        CocoPathError,
        match="no root given and neither COCO_ROOT nor DETECTRON2_DATASETS is set. "
        "Fix: pass root=, or export COCO_ROOT=/path/to/coco",
    ):
        resolve_coco(None, "train")


def test_not_found_lists_what_exists(tmp_path: Path) -> None:
    _touch(tmp_path, "annotations/instances_val2017.json", "annotations/instances_train20172017.json", "val2017/")
    with pytest.raises(CocoPathError) as info:
        resolve_coco(tmp_path, "instances_train2017.json")
    error = info.value
    ann = tmp_path / "annotations"
    assert str(error) == "\n".join(
        [
            f"resolve_coco: no instances annotations for split train2017 (parsed as name='train', year=2017) under "
            f"{tmp_path} (layout='auto').",
            "Paths tried:",
            f"  {ann / 'instances_train2017.json'}",
            f"  {tmp_path / 'train/_annotations.coco.json'}",
            f"  {tmp_path / 'coco/annotations/instances_train2017.json'}",
            "Annotation files that exist under the root:",
            f"  {ann / 'instances_train20172017.json'}",
            f"  {ann / 'instances_val2017.json'}",
            f"Closest match: {ann / 'instances_train20172017.json'}; if that is the file, pass "
            f"annotations='{ann / 'instances_train20172017.json'}'.",
            "Fix: check root and split, or pass annotations= and images= explicitly.",
        ]
    )
    assert isinstance(error, FileNotFoundError) and error.split == CocoSplit("train", 2017)
    assert error.layout == "auto" and len(error.tried) == 3 and len(error.found) == 2
    clone = pickle.loads(pickle.dumps(error))  # crosses process boundaries (loader workers) intact
    assert str(clone) == str(error) and clone.closest == error.closest and clone.split == error.split


def test_error_hints_for_a_misplaced_root(tmp_path: Path) -> None:
    _touch(
        tmp_path, "coco2017/annotations/instances_val2017.json", "coco2017/val2017/", "rf/valid/_annotations.coco.json"
    )
    with pytest.raises(
        CocoPathError,
        match=re.escape(f"it has the expected name, so the dataset root is probably root='{tmp_path / 'coco2017'}'"),
    ):
        resolve_coco(tmp_path, "val")
    with pytest.raises(CocoPathError, match="The root is an annotations/ folder; pass its parent"):
        resolve_coco(tmp_path / "coco2017/annotations", "val")
    with pytest.raises(CocoPathError, match="looks like one Roboflow split folder; pass its parent"):
        resolve_coco(tmp_path / "rf/valid", "val")
    with pytest.raises(CocoPathError, match=re.escape(f"does not exist; its nearest existing parent is {tmp_path}")):
        resolve_coco(tmp_path / "nope" / "coco", "val")
    with pytest.raises(CocoPathError, match="The roboflow layout has only train/, valid/ and test/ folders"):
        resolve_coco(tmp_path / "rf", "minival", layout="roboflow")
    with pytest.raises(ValueError, match="layout='robflow' is unknown \\(did you mean 'roboflow'\\?\\)"):
        resolve_coco(tmp_path, "val", layout="robflow")


def test_missing_image_folder_and_check_false(tmp_path: Path) -> None:
    _touch(tmp_path, "annotations/instances_train2017.json")
    with pytest.raises(CocoPathError) as info:
        resolve_coco(tmp_path, "train")
    assert str(info.value) == (
        f"resolve_coco: found {tmp_path / 'annotations/instances_train2017.json'} (coco layout) for split "
        f"train2017, but no image folder. Got: tried {tmp_path / 'train2017'}, {tmp_path / 'images/train2017'}. "
        f"Fix: put the train2017 images in {tmp_path / 'train2017'}, or pass images=."
    )
    assert resolve_coco(tmp_path, "train", check=False).images == tmp_path / "train2017"
    unchecked = resolve_coco(tmp_path / "empty", "val2014", check=False)  # nothing there: COCO's own layout
    assert unchecked.annotations == tmp_path / "empty/annotations/instances_val2014.json"
    assert unchecked.layout == "coco"


# ---------------------------------------------------------------------------------------------
# Validation


def test_validation_reports_every_problem(tmp_path: Path) -> None:
    written = make_coco_detection(tmp_path, "train2017", num_images=3, seed=1, min_objects=2)
    data = json.loads(written.annotations.read_text())
    first = data["images"][1]["file_name"]
    data["annotations"][0]["category_id"] = 99
    data["annotations"][1]["bbox"] = [0, 0, 0, 5]
    data["annotations"][2]["bbox"] = [0, 0, "5", 5]
    data["annotations"][3]["segmentation"] = [[1, 2, 3]]
    data["annotations"].append(
        {"id": 1000, "image_id": 42, "category_id": 1, "bbox": [100, 100, 50, 50], "area": 0, "iscrowd": 2}
    )
    data["annotations"].append({"id": 1000, "image_id": 1, "category_id": 1, "bbox": [120, 120, 50, 50], "area": 9})
    data["images"].append("000000000009.png")
    written.annotations.write_text(json.dumps(data))
    (written.images / first).unlink()
    with pytest.raises(CocoValidationError) as info:
        resolve_coco(tmp_path, "train", validate=True)
    report = info.value.report
    assert report.counts == {
        "images": 3,
        "annotations": len(data["annotations"]),
        "categories": 3,
        "crowd annotations": 0,
    }
    errors = "\n".join(report.errors)
    for expected in [
        "annotation id 1000 appears 2 times; it must be unique",
        "images[3] is a str, expected an object",
        "annotation 1: category_id 99 is not in categories",
        "annotation 2: bbox [0, 0, 0, 5] has non-positive size",
        "annotation 3: bbox [0, 0, '5', 5] is not [x, y, width, height] numbers",
        "annotation 4: segmentation polygon must be a flat list of at least 3 x,y pairs, got [1, 2, 3]",
        "annotation 1000: image_id 42 is not in images",
        "annotation 1000: iscrowd is 2; expected 0 or 1",
        "annotation 1000: bbox [120, 120, 50, 50] lies outside its image (128x128)",
        f"image file {written.images / first} does not exist (image id 2)",
    ]:
        assert expected in errors
    assert "annotation 1000: area 0 is not positive; COCOeval's area ranges skip it" in report.warnings
    assert len(report.errors) == 10, errors
    written.annotations.write_text("{not json")
    assert validate_annotations(written.annotations).errors[0].startswith("not valid JSON: ")


def test_validation_knows_the_kinds(tmp_path: Path) -> None:
    image = {"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}
    captions = tmp_path / "captions_val2017.json"
    captions.write_text(json.dumps({"images": [image], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]}))
    assert validate_annotations(captions).ok and validate_annotations(captions).kind == "captions"
    info = tmp_path / "image_info_test2017.json"
    info.write_text(json.dumps({"images": [image], "categories": [{"id": 1, "name": "a"}]}))
    assert validate_annotations(info).ok
    plain = tmp_path / "labels.json"
    plain.write_text(info.read_text())
    assert validate_annotations(plain).errors == [
        "missing or non-list key 'annotations' (a test split's image_info file? pass kind='image_info')"
    ]
    keypoints = tmp_path / "person_keypoints_val2017.json"
    keypoints.write_text(
        json.dumps(
            {
                "images": [image],
                "categories": [{"id": 1, "keypoints": ["a", "b"]}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4, "keypoints": [1, 1, 2]}
                ],
            }
        )
    )
    assert validate_annotations(keypoints).errors == [
        "annotation 1: keypoints has 3 values; expected 6 (3 per keypoint of its category)"
    ]
    panoptic = tmp_path / "panoptic_val2017.json"
    segments = [{"id": 5, "category_id": 1, "bbox": [0, 0, 4, 4]}, {"id": 6, "category_id": 3, "bbox": [0, 0, 4, 4]}]
    panoptic.write_text(
        json.dumps(
            {
                "images": [image],
                "categories": [{"id": 1, "name": "a"}],
                "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segments}],
            }
        )
    )
    assert validate_annotations(panoptic).errors == [
        "annotation of image 1, segment 6: category_id 3 is not in categories"
    ]


# ---------------------------------------------------------------------------------------------
# `ratlib coco` through a real process


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ratlib", "coco", *args], capture_output=True, text=True, timeout=60)


def test_cli(tmp_path: Path) -> None:
    written = make_coco_detection(tmp_path, "val2017", num_images=2, layout="roboflow")
    ok = _cli(str(tmp_path), "val", "--json", "--check")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["ok"] and out["layout"] == "roboflow" and out["split"] == "val2017"
    assert out["annotations"] == str(written.annotations) and out["check"]["counts"]["images"] == 2
    text = _cli(str(tmp_path), "VAL2017", "--check")
    assert text.returncode == 0 and text.stderr == ""
    assert text.stdout.startswith(f"split        val2017\nlayout       roboflow\nannotations  {written.annotations}\n")
    assert "0 error(s)" in text.stdout

    bad = _cli(str(tmp_path), "train2017", "--json")
    assert bad.returncode == 1 and bad.stderr.startswith("error: resolve_coco: no instances annotations")
    failure = json.loads(bad.stdout)
    assert not failure["ok"] and failure["split"] == "train2017" and failure["closest"] == str(written.annotations)
    assert str(tmp_path / "train" / "_annotations.coco.json") in failure["tried"]
    worse = _cli(str(tmp_path), "minival2017")
    assert worse.returncode == 1 and worse.stdout == "" and "minival exists as: minival2014" in worse.stderr
    kind = _cli(str(tmp_path), "val", "--kind", "captons")
    assert kind.returncode == 1 and "did you mean 'captions'?" in kind.stderr

    data = json.loads(written.annotations.read_text())
    data["annotations"][0]["image_id"] = 77
    written.annotations.write_text(json.dumps(data))
    test = make_coco_detection(tmp_path / "t", "test2017", num_images=1)
    assert _cli(str(tmp_path / "t"), "test", "--check").returncode == 0  # image_info file: no annotations needed
    assert resolve_coco(tmp_path / "t", "test", validate=True) == test
    broken = _cli(str(tmp_path), "val", "--check")
    assert broken.returncode == 1 and "image_id 77 is not in images" in broken.stdout
    assert broken.stderr.startswith(f"error: 1 problem(s) in {written.annotations}; first: annotation 1: image_id 77")


def test_cli_year_conflict_suggests_the_command_line_flag(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ratlib", "coco", str(tmp_path), "train2017", "--year", "2014"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert (
        f"error: split 'train2017' names another year than --year 2014. Fix: run `ratlib coco {tmp_path} train "
        "--year 2014`, or drop --year." in out.stderr
    ), out.stderr
    assert "year=2014" not in out.stderr and "Traceback" not in out.stderr


def test_coco_errors_are_ratlib_errors_and_builtins() -> None:
    from ratlib.coco_paths import CocoValidationError, CocoYearError
    from ratlib.errors import RatlibError

    assert issubclass(CocoPathError, RatlibError) and issubclass(CocoPathError, FileNotFoundError)
    assert issubclass(CocoValidationError, RatlibError) and issubclass(CocoValidationError, ValueError)
    with pytest.raises(CocoYearError) as info:
        parse_split("train2017", year=2014)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RatlibError)


def test_a_split_found_only_in_another_year_suggests_that_year(tmp_path: Path) -> None:
    from ratlib.cli import main

    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text("{}")
    with pytest.raises(CocoPathError, match=r"--year 2014") as err:
        resolve_coco(tmp_path, "val")
    assert "annotations=" not in str(err.value).split("Closest match:")[1].splitlines()[0]
    assert main(["coco", str(tmp_path), "val"]) != 0
