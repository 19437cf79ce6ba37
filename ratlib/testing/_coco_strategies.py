"""Hypothesis strategies over COCO split spellings and directory trees (see ``ratlib.testing.strategies``)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from ratlib.coco_paths import LAYOUTS, SPLITS, CocoPaths, CocoSplit, parse_split
from ratlib.errors import message
from ratlib.testing._errors import StrategyArgumentError

# how each split's name may be written: word lists, joined by any separator ("test-dev", "val_minus_minival")
_NAME_WORDS: dict[str, list[list[str]]] = {
    "train": [["train"]],
    "val": [["val"], ["valid"], ["validation"]],
    "test": [["test"]],
    "test-dev": [["test", "dev"], ["testdev"]],
    "unlabeled": [["unlabeled"], ["unlabelled"]],
    "minival": [["minival"], ["mini", "val"]],
    "valminusminival": [["valminusminival"], ["val", "minus", "minival"]],
}
_SEPARATORS = ["", "_", "-", " "]
_ROBOFLOW = {"train": "train", "val": "valid", "test": "test"}


# COCO's file names written out by hand (cocodataset.org/#download; minival and valminusminival from
# Detectron), not computed with ratlib's annotation_filename / image_folder, so that the expected answer of
# a tree does not repeat the code under test: (split, year) -> (image folder, {kind: annotation file}).
# Test and unlabeled splits have only image_info files; kind "instances" asks for the same file.
COCO_FILES: dict[tuple[str, int], tuple[str, dict[str, str]]] = {
    ("train", 2017): (
        "train2017",
        {
            "instances": "instances_train2017.json",
            "person_keypoints": "person_keypoints_train2017.json",
            "captions": "captions_train2017.json",
            "panoptic": "panoptic_train2017.json",
        },
    ),
    ("train", 2014): (
        "train2014",
        {
            "instances": "instances_train2014.json",
            "person_keypoints": "person_keypoints_train2014.json",
            "captions": "captions_train2014.json",
        },
    ),
    ("val", 2017): (
        "val2017",
        {
            "instances": "instances_val2017.json",
            "person_keypoints": "person_keypoints_val2017.json",
            "captions": "captions_val2017.json",
            "panoptic": "panoptic_val2017.json",
        },
    ),
    ("val", 2014): (
        "val2014",
        {
            "instances": "instances_val2014.json",
            "person_keypoints": "person_keypoints_val2014.json",
            "captions": "captions_val2014.json",
        },
    ),
    ("test", 2017): ("test2017", {"instances": "image_info_test2017.json", "image_info": "image_info_test2017.json"}),
    ("test", 2015): ("test2015", {"instances": "image_info_test2015.json", "image_info": "image_info_test2015.json"}),
    ("test", 2014): ("test2014", {"instances": "image_info_test2014.json", "image_info": "image_info_test2014.json"}),
    ("test-dev", 2017): (
        "test2017",  # test-dev's images are a subset of the test folder
        {"instances": "image_info_test-dev2017.json", "image_info": "image_info_test-dev2017.json"},
    ),
    ("test-dev", 2015): (
        "test2015",
        {"instances": "image_info_test-dev2015.json", "image_info": "image_info_test-dev2015.json"},
    ),
    ("unlabeled", 2017): (
        "unlabeled2017",
        {"instances": "image_info_unlabeled2017.json", "image_info": "image_info_unlabeled2017.json"},
    ),
    ("minival", 2014): (
        "val2014",  # minival's images live in val2014
        {
            "instances": "instances_minival2014.json",
            "person_keypoints": "person_keypoints_minival2014.json",
            "captions": "captions_minival2014.json",
        },
    ),
    ("valminusminival", 2014): (
        "val2014",
        {
            "instances": "instances_valminusminival2014.json",
            "person_keypoints": "person_keypoints_valminusminival2014.json",
            "captions": "captions_valminusminival2014.json",
        },
    ),
}


def _image_folder(split: CocoSplit) -> str:
    return COCO_FILES[(split.name, split.year)][0]


def _annotation_file(split: CocoSplit, kind: str) -> str:
    return COCO_FILES[(split.name, split.year)][1][kind]


def _kinds_for(split: CocoSplit) -> list[str]:
    """The annotation kinds COCO publishes for ``split`` (from the hand table ``COCO_FILES``)."""
    return list(COCO_FILES[(split.name, split.year)][1])


def _choices(split: str | CocoSplit | None, year: int | None) -> list[CocoSplit]:
    """Every CocoSplit allowed by ``split`` (a name, any spelling, or one with a year) and ``year``."""
    fixed_year, names = year, list(SPLITS)
    if split is not None:
        parsed = parse_split(split)  # ValueError with suggestions for an unknown name
        has_year = isinstance(split, CocoSplit) or any(ch.isdigit() for ch in split)
        if has_year and year is not None and parsed.year != int(year):
            raise StrategyArgumentError(
                message(f"coco_split_spellings: split={split!r} and year={year!r} disagree", fix="give the year once")
            )
        names, fixed_year = [parsed.name], parsed.year if has_year else year
    splits = [CocoSplit(n, y) for n in names for y in SPLITS[n] if fixed_year is None or y == int(fixed_year)]
    if not splits:
        raise StrategyArgumentError(
            message(
                f"coco_split_spellings: COCO has no split {split or '(any name)'} in year {year}",
                expected="years per split: " + ", ".join(f"{n} {'/'.join(map(str, ys))}" for n, ys in SPLITS.items()),
            )
        )
    return splits


def _case(draw: st.DrawFn, text: str) -> str:
    style = draw(st.sampled_from(["lower", "upper", "title", "random"]))
    if style == "random":
        flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        return "".join(c.upper() if f else c for c, f in zip(text, flips))
    return {"lower": text.lower(), "upper": text.upper(), "title": text.title()}[style]


def coco_split_spellings(
    split: str | CocoSplit | None = None, year: int | None = None
) -> st.SearchStrategy[tuple[str, CocoSplit]]:
    """``(spelling, CocoSplit)``: one accepted spelling of a COCO split and the split it stands for.

    ``split`` (any spelling; with a year it fixes the year too) and ``year`` narrow the splits drawn;
    an unknown name or a year the split never had raises ``ValueError`` at once. Spellings vary case,
    separators (none, ``_``, ``-``, space) inside and around the name, the year's position
    (``train2017``, ``2017_train``), a left-out default year, aliases (``valid``, ``testdev``),
    ``instances_``/``person_keypoints_``/``image_info_`` prefixes, ``.json`` suffixes, an
    ``annotations/`` folder, Roboflow's ``valid/_annotations.coco.json`` and surrounding spaces.
    """
    return _spellings(split, year)


@functools.cache
def _spellings(split: str | CocoSplit | None, year: int | None) -> st.SearchStrategy[tuple[str, CocoSplit]]:
    """Built once per (split, year): a new composite per call costs ~15 ms and slows hypothesis' explain phase."""
    splits = _choices(split, year)

    @st.composite
    def spellings(draw: st.DrawFn) -> tuple[str, CocoSplit]:
        s = draw(st.sampled_from(splits))
        words = draw(st.sampled_from(_NAME_WORDS[s.name]))
        name = draw(st.sampled_from(_SEPARATORS[1:])).join(words) if len(words) > 1 else words[0]
        default = SPLITS[s.name][0] == s.year
        forms = ["name_year", "year_name", "file", "path"] + (["name"] if default else [])
        if default and s.name in _ROBOFLOW:
            forms.append("roboflow")
        form = draw(st.sampled_from(forms))
        sep = draw(st.sampled_from(_SEPARATORS))
        if form == "roboflow":
            text = f"{_case(draw, name)}/_annotations.coco.json"
        elif form in ("file", "path"):
            kind = draw(st.sampled_from(_kinds_for(s)))
            text = f"{kind}{draw(st.sampled_from(['_', '-']))}{name}{sep}{s.year}"
            text = _case(draw, text) + draw(st.sampled_from(["", ".json", ".JSON"]))
            if form == "path":
                text = draw(st.sampled_from(["annotations/", "/data/coco/annotations/", "coco\\annotations\\"])) + text
        else:
            text = {"name_year": f"{name}{sep}{s.year}", "year_name": f"{s.year}{sep}{name}", "name": name}[form]
            text = _case(draw, text)
        return draw(st.sampled_from(["", " ", "  "])) + text + draw(st.sampled_from(["", " ", "\t", "\n"])), s

    return spellings()


@dataclass(frozen=True)
class CocoTree:
    """A COCO tree written by ``coco_trees``.

    ``root`` (pass it to ``resolve_coco``), the ``split``, ``kind`` and ``layout`` it was built for,
    ``expected``: the ``CocoPaths`` that ``resolve_coco(root, split, kind=kind)`` must return, or None
    when it must raise ``CocoPathError``; ``files``: every file and folder created, relative to root.
    """

    root: Path
    split: CocoSplit
    kind: str
    layout: str
    expected: CocoPaths | None
    files: tuple[str, ...]


_BASE: list[Path] = []


def _base_dir() -> Path:
    """One temporary folder per process for all trees, removed when the process exits."""
    if not _BASE:
        _BASE.append(Path(tempfile.mkdtemp(prefix="ratlib-coco-trees-")))
        atexit.register(shutil.rmtree, _BASE[0], True)
    return _BASE[0]


def _coco_files(base: Path, split: CocoSplit, kind: str, images: str | None) -> tuple[Path, list[Path]]:
    """COCO's own layout: the annotation file and the image folder(s) to create."""
    ann = base / "annotations" / _annotation_file(split, kind)
    if images is None:
        return ann, []
    return ann, [base / _image_folder(split) if images == "top" else base / "images" / _image_folder(split)]


def coco_trees(layout: str | None = None) -> st.SearchStrategy[CocoTree]:
    """``CocoTree``: a COCO directory tree in a new temporary folder (removed at process exit).

    The tree is in ``layout`` (any of ``LAYOUTS`` when None) and holds the drawn split's annotation
    file and image folder, or only one of them, or neither; plus decoys that must never be returned:
    the same split in another year or kind, other splits, a doubled-year file name
    (``instances_train20172017.json``), and other layouts holding other splits.
    """
    if layout is not None and layout not in LAYOUTS:
        raise StrategyArgumentError(
            message(f"coco_trees: layout={layout!r} is unknown", expected=f"None or one of {', '.join(LAYOUTS)}")
        )

    @st.composite
    def trees(draw: st.DrawFn) -> CocoTree:
        lay = layout or draw(st.sampled_from(LAYOUTS))
        if lay == "roboflow":
            s, kind = CocoSplit(draw(st.sampled_from(sorted(_ROBOFLOW))), 2017), "instances"
        else:
            s = draw(st.sampled_from(_choices(None, None)))
            kind = draw(st.sampled_from(_kinds_for(s)))
        root = Path(tempfile.mkdtemp(prefix="tree-", dir=_base_dir()))
        files: set[Path] = set()
        folders: set[Path] = set()

        def coco_split(base: Path, split: CocoSplit, kind_: str, ann: bool, images: str | None) -> None:
            ann_path, image_dirs = _coco_files(base, split, kind_, images)
            files.update([ann_path] if ann else [])
            folders.update(image_dirs)

        def roboflow_split(name: str, ann: bool) -> None:
            folder = root / (draw(st.sampled_from(["valid", "val"])) if name == "val" else name)
            folders.add(folder)
            files.update([folder / "_annotations.coco.json"] if ann else [])

        has_ann = draw(st.sampled_from([True, True, False]))
        base = root / "coco" if lay == "detectron2" else root
        if lay == "roboflow":
            if has_ann or draw(st.booleans()):
                roboflow_split(s.name, has_ann)
            for other in draw(st.lists(st.sampled_from([n for n in _ROBOFLOW if n != s.name]), unique=True)):
                roboflow_split(other, True)
        else:
            coco_split(base, s, kind, has_ann, draw(st.sampled_from([None, "top", "images"])))
            decoys = [
                (CocoSplit(s.name, y), kind)
                for y in SPLITS[s.name]
                if y != s.year and kind in _kinds_for(CocoSplit(s.name, y))
            ]
            decoys += [
                (s, k) for k in _kinds_for(s) if k != kind and _annotation_file(s, k) != _annotation_file(s, kind)
            ]
            decoys += [(CocoSplit(n, SPLITS[n][0]), "instances") for n in SPLITS if n != s.name]
            for decoy, decoy_kind in draw(st.lists(st.sampled_from(decoys), max_size=3, unique=True)):
                coco_split(base, decoy, decoy_kind, True, draw(st.sampled_from([None, "top"])))
            if draw(st.booleans()):  # the file the old f-string bug would have asked for
                files.add(base / "annotations" / f"instances_{s}{s.year}.json")
            # another layout beside it, holding only what auto must not pick: other split names, or
            # (Roboflow has one instances file per folder) the same name when another kind is asked for
            others = [n for n in _ROBOFLOW if n != s.name or kind != "instances"]
            if lay == "coco" and others and draw(st.booleans()):
                roboflow_split(draw(st.sampled_from(others)), True)
            if lay == "detectron2" and draw(st.booleans()):
                other = draw(st.sampled_from([n for n in SPLITS if n != s.name]))
                coco_split(root, CocoSplit(other, SPLITS[other][0]), "instances", True, "top")
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        for path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"images": [], "annotations": [], "categories": []}')
        expected = _expected(root, lay, s, kind, files, folders)
        created = tuple(sorted(str(p.relative_to(root)) for p in files | folders))
        return CocoTree(root, s, kind, lay, expected, created)

    return trees()


def _expected(
    root: Path, layout: str, split: CocoSplit, kind: str, files: set[Path], folders: set[Path]
) -> CocoPaths | None:
    """What resolve_coco must return, from what was created (not from looking at the disk)."""
    if layout == "roboflow":
        for name in ("valid", "val") if split.name == "val" else (_ROBOFLOW[split.name],):
            if root / name / "_annotations.coco.json" in files:
                return CocoPaths(root / name, root / name / "_annotations.coco.json", split, layout)
        return None
    base = root / "coco" if layout == "detectron2" else root
    ann = base / "annotations" / _annotation_file(split, kind)
    image_dir = next(
        (d for d in (base / _image_folder(split), base / "images" / _image_folder(split)) if d in folders), None
    )
    return CocoPaths(image_dir, ann, split, layout) if ann in files and image_dir is not None else None
