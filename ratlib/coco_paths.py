"""COCO split parsing and path resolution that cannot double a year.

``parse_split("train2017")``, ``parse_split("2017_train")``, ``parse_split("instances_train2017.json")``
and ``parse_split("train", year=2017)`` are all ``CocoSplit("train", 2017)``; file names are built from
that parsed form, never by pasting a year onto user input. ``resolve_coco`` finds the annotation file
and image folder in the layouts people really have (COCO's own, Roboflow exports, detectron2 dataset
roots) and, when they are not there, says what is. Standard library only.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratlib.errors import RatlibError, message
from ratlib.rank_logger import get_logger

__all__ = [
    "KINDS",
    "LAYOUTS",
    "SPLITS",
    "CocoPathError",
    "CocoPaths",
    "CocoSplit",
    "CocoSplitError",
    "CocoSplitTypeError",
    "CocoValidationError",
    "CocoYearError",
    "ValidationReport",
    "annotation_filename",
    "parse_split",
    "resolve_coco",
    "validate_annotations",
]

# split name -> the years COCO published it for (the first is the default when no year is given)
SPLITS: dict[str, tuple[int, ...]] = {
    "train": (2017, 2014),
    "val": (2017, 2014),
    "test": (2017, 2015, 2014),
    "test-dev": (2017, 2015),
    "unlabeled": (2017,),
    "minival": (2014,),
    "valminusminival": (2014,),
}
KINDS = ("instances", "person_keypoints", "captions", "panoptic", "image_info")
LAYOUTS = ("coco", "roboflow", "detectron2")
# other names people use, after separators are removed
_ALIASES = {"valid": "val", "validation": "val", "testdev": "test-dev", "unlabelled": "unlabeled"}
# the words a split name may be written in, with separators between them ("test-dev", "val_minus_minival")
_WORDS = {
    "train",
    "val",
    "valid",
    "validation",
    "test",
    "dev",
    "testdev",
    "unlabeled",
    "unlabelled",
    "mini",
    "minival",
    "minus",
    "valminusminival",
}
_SEP = r"[\s_\-]"
# [year] name [year [year]]: a year may be written twice (train2017_2017) as long as the years agree
_SPELLING = re.compile(rf"^(?:(\d{{4}}){_SEP}*)?([a-z][a-z\s_\-]*?)(?:{_SEP}*(\d{{4}}))?(?:{_SEP}*(\d{{4}}))?$")
# Roboflow export folders per split (Roboflow names the validation folder "valid")
_ROBOFLOW = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}


def _valid_names() -> list[str]:
    return [f"{name}{year}" for name, years in SPLITS.items() for year in years] + list(SPLITS)


def _suggest(text: str) -> str:
    close = difflib.get_close_matches(text, _valid_names(), n=3, cutoff=0.5)
    return ", ".join(close or ["train2017", "val2017", "test2017"])


@dataclass(frozen=True, order=True)
class CocoSplit:
    """A COCO split, parsed: ``name`` (train, val, test, test-dev, unlabeled, minival, valminusminival)
    and ``year``. ``str()`` gives the canonical spelling, e.g. ``train2017``. Build one from user input
    with ``parse_split``; constructing an impossible pair (``CocoSplit("minival", 2017)``) raises."""

    name: str
    year: int

    def __post_init__(self) -> None:
        if self.name not in SPLITS or isinstance(self.year, bool) or not isinstance(self.year, int):
            raise CocoSplitError(
                message(
                    f"CocoSplit(name={self.name!r}, year={self.year!r}) is not a COCO split",
                    expected=f"a name in {', '.join(SPLITS)} and an int year",
                    fix="use parse_split() for other spellings",
                )
            )
        if self.year not in SPLITS[self.name]:
            raise CocoSplitError(
                message(
                    f"CocoSplit: COCO has no split {self.name}{self.year}; {self.name} exists as: "
                    + ", ".join(f"{self.name}{y}" for y in SPLITS[self.name])
                )
            )

    def __str__(self) -> str:
        return f"{self.name}{self.year}"

    @property
    def image_folder(self) -> str:
        """The image folder's name in COCO's own layout (minival images live in val2014, test-dev's in test)."""
        if self.name in ("minival", "valminusminival"):
            return "val2014"
        if self.name == "test-dev":
            return f"test{self.year}"
        return str(self)

    @property
    def is_test(self) -> bool:
        """Test splits have no labels, only ``image_info_*.json``."""
        return self.name in ("test", "test-dev")


def _year(value: int | str | None, what: str) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"\d{4}", text):
        raise CocoSplitError(
            message(f"parse_split: {what}={value!r} is not a year", expected="a four-digit year such as 2017 or 2014")
        )
    return int(text)


def _split_name(raw: str) -> str | None:
    """'test_dev' -> 'test-dev', 'VAL' -> 'val'; None when the words are not a split name."""
    words = [w for w in re.split(rf"{_SEP}+", raw) if w]
    if not words or any(w not in _WORDS for w in words):
        return None
    name = "".join(words)
    name = _ALIASES.get(name, name)
    return name if name in SPLITS else None


class CocoSplitError(RatlibError, ValueError):
    """A split, year, annotation kind or layout that COCO (or ``resolve_coco``) does not have."""


class CocoSplitTypeError(CocoSplitError, TypeError):
    """``parse_split`` was given something other than a str or ``CocoSplit``."""


class CocoYearError(CocoSplitError):
    """``parse_split``: the split names one year and ``year`` another (``ratlib coco`` words its fix with --year)."""

    def __init__(self, text: str, *, split: str, name: str, year: int) -> None:
        super().__init__(text)
        self.split, self.name, self.year = split, name, year


def parse_split(split: str | CocoSplit, year: int | str | None = None) -> CocoSplit:
    """Parse any common spelling of a COCO split into a ``CocoSplit``.

    Accepts ``train``, ``train2017``, ``2017_train``, ``train_2017``, ``instances_train2017``,
    ``instances_train2017.json`` (also with a folder in front), ``val``, ``valid`` and
    ``valid/_annotations.coco.json`` (Roboflow),
    ``minival2014``, ``test-dev2017``, in any case, with surrounding spaces. Without a year the newest
    one is used (2017; 2014 for minival). A year in the name and ``year`` must agree. Unknown names,
    conflicting years and impossible pairs (``minival2017``) raise ``ValueError`` with the closest
    valid names.
    """
    given = _year(year, "year")
    if isinstance(split, CocoSplit):
        if given is not None and given != split.year:
            raise CocoYearError(
                message(f"parse_split: split {str(split)!r} has year {split.year} but year={given}", fix="drop one"),
                split=str(split),
                name=split.name,
                year=given,
            )
        return split
    if not isinstance(split, str):
        raise CocoSplitTypeError(
            message("parse_split: split must be a str or CocoSplit", got=f"{type(split).__name__} ({split!r})")
        )
    parts = re.split(r"[/\\]+", split.strip().rstrip("/\\"))
    if parts[-1].lower() == "_annotations.coco.json":  # Roboflow: the split is the folder's name
        if len(parts) < 2:
            raise CocoSplitError(
                message(
                    f"parse_split: split {split!r} is Roboflow's annotation file name, not a split",
                    fix="pass its folder (train, valid or test), or the path 'valid/_annotations.coco.json'",
                )
            )
        parts.pop()
    text = parts[-1].lower().strip()
    for suffix in (".coco.json", ".json"):
        text = text.removesuffix(suffix)
    for kind in sorted(KINDS, key=len, reverse=True):
        if re.match(rf"{kind}[_\-]", text):
            text = text[len(kind) + 1 :]
            break
    if re.fullmatch(r"\d{4}", text):
        year_text = text if int(text) in (2014, 2017) else "2017"  # suggest names that exist
        raise CocoSplitError(
            message(
                f"parse_split: split {split!r} is only a year",
                fix=f"name the split too, e.g. train{year_text}, val{year_text}",
            )
        )
    m = _SPELLING.match(text)
    name = _split_name(m.group(2)) if m else None
    if m is None or name is None:
        raise CocoSplitError(
            message(
                f"parse_split: unknown COCO split {split!r}",
                expected=f"a split name ({', '.join(SPLITS)}) with an optional year, e.g. train2017",
                fix=f"use one of the closest valid names: {_suggest(text)}",
            )
        )
    years = list(dict.fromkeys(y for y in (m.group(1), m.group(3), m.group(4)) if y))
    if len(years) > 1:
        valid = [f"{name}{y}" for y in years if y.isdigit() and int(y) in SPLITS[name]]
        raise CocoSplitError(
            message(
                f"parse_split: split {split!r} names different years ({' and '.join(years)})",
                fix=f"keep one; closest valid names: {', '.join(valid) if valid else _suggest(name)}",
            )
        )
    in_name = _year(years[0] if years else None, f"the year in split {split!r}")
    if in_name is not None and given is not None and in_name != given:
        raise CocoYearError(
            message(
                f"parse_split: split {split!r} says {in_name} but year={given}",
                fix=f"pass split={name!r} with year={given}, or drop year",
            ),
            split=split,
            name=name,
            year=given,
        )
    chosen = in_name if in_name is not None else given if given is not None else SPLITS[name][0]
    if chosen not in SPLITS[name]:
        raise CocoSplitError(
            message(
                f"parse_split: COCO has no split {name}{chosen} (from {split!r}); {name} exists as: "
                + ", ".join(f"{name}{y}" for y in SPLITS[name]),
                fix=f"use one of the closest valid names: {_suggest(f'{name}{chosen}')}",
            )
        )
    return CocoSplit(name, chosen)


def _check_kind(kind: str, where: str) -> None:
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CocoSplitError(message(f"{where}: annotation kind {kind!r} is unknown{hint}", expected=", ".join(KINDS)))


def annotation_filename(split: str | CocoSplit, year: int | str | None = None, kind: str = "instances") -> str:
    """The annotation file name in COCO's own layout, e.g. ``instances_train2017.json``.

    Test and unlabeled splits have no labels: they map to ``image_info_test2017.json``,
    ``image_info_test-dev2017.json``, ``image_info_unlabeled2017.json`` (kind instances or image_info).
    """
    s = parse_split(split, year)
    _check_kind(kind, "annotation_filename")
    if s.is_test or s.name == "unlabeled":
        if kind not in ("instances", "image_info"):
            raise CocoSplitError(
                message(
                    f"annotation_filename: {s} has no {kind} annotations (test and unlabeled splits only have "
                    f"image_info_{s}.json)",
                    fix="use kind='image_info'",
                )
            )
        return f"image_info_{s}.json"
    if kind == "image_info":
        raise CocoSplitError(
            message(
                f"annotation_filename: {s} has no image_info file (those exist for test and unlabeled splits)",
                fix="use kind='instances'",
            )
        )
    if kind == "panoptic" and (s.year != 2017 or s.name not in ("train", "val")):
        raise CocoSplitError(
            message(f"annotation_filename: COCO has no panoptic annotations for {s}", expected="train2017 or val2017")
        )
    return f"{kind}_{s}.json"


@dataclass(frozen=True)
class CocoPaths:
    """Where a split's images and annotation file are, and the layout they were found in
    ("coco", "roboflow", "detectron2", or "explicit" when both paths were given)."""

    images: Path
    annotations: Path
    split: CocoSplit
    layout: str


class CocoPathError(RatlibError, FileNotFoundError):
    """A split's files are not where any layout puts them. The message lists the paths tried, the
    annotation files that do exist under the root and the closest one; so do the attributes."""

    def __init__(
        self,
        message: str,
        *,
        root: Path | None = None,
        split: CocoSplit | None = None,
        layout: str | None = None,
        tried: list[Path] | None = None,
        found: list[Path] | None = None,
        closest: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.root, self.split, self.layout = root, split, layout
        self.tried: list[Path] = list(tried or [])
        self.found: list[Path] = list(found or [])
        self.closest = closest

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (data loader workers)
        return (_rebuild_error, (self.args[0], self.__dict__))


def _rebuild_error(message: str, state: dict[str, Any]) -> CocoPathError:
    error = CocoPathError(message)
    error.__dict__.update(state)
    return error


def _candidates(root: Path, split: CocoSplit, kind: str, layout: str) -> list[tuple[Path, list[Path]]]:
    """(annotation file, image folders to try, best first) for one layout."""
    if layout == "coco":
        ann = root / "annotations" / annotation_filename(split, kind=kind)
        return [(ann, [root / split.image_folder, root / "images" / split.image_folder])]
    if layout == "detectron2":
        return _candidates(root / "coco", split, kind, "coco")
    if layout == "roboflow":  # one _annotations.coco.json per folder, no years, no kinds
        folders = _ROBOFLOW.get(split.name, ()) if kind == "instances" else ()
        return [(root / f / "_annotations.coco.json", [root / f]) for f in folders]
    raise CocoSplitError(
        message(f"resolve_coco: layout={layout!r} is unknown", expected=f"'auto' or one of {', '.join(LAYOUTS)}")
    )


def _existing_annotations(root: Path, depth: int = 3, max_dirs: int = 400, limit: int = 200) -> list[Path]:
    """JSON files under ``root``, breadth first, up to ``depth`` levels (hidden folders skipped)."""
    found: list[Path] = []
    level = [root]
    visited = 0
    for _ in range(depth):
        below: list[Path] = []
        for folder in level:
            visited += 1
            if visited > max_dirs:
                return found
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    below.append(Path(entry.path))
                elif entry.name.endswith(".json") and len(found) < limit:
                    found.append(Path(entry.path))
        level = below
    return found


def _expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expandvars(os.fspath(path))).expanduser()


def _default_root(layout: str) -> tuple[Path, str]:
    """The root from ``$COCO_ROOT`` (a COCO folder), else ``$DETECTRON2_DATASETS`` (a datasets root)."""
    if os.environ.get("COCO_ROOT"):
        return _expand(os.environ["COCO_ROOT"]), layout
    if os.environ.get("DETECTRON2_DATASETS"):
        return _expand(os.environ["DETECTRON2_DATASETS"]), "detectron2" if layout == "auto" else layout
    raise CocoPathError(
        message(
            "resolve_coco: no root given and neither COCO_ROOT nor DETECTRON2_DATASETS is set",
            fix="pass root=, or export COCO_ROOT=/path/to/coco",
        ),
        layout=layout,
    )


def resolve_coco(
    root: str | os.PathLike[str] | None,
    split: str | CocoSplit,
    *,
    year: int | str | None = None,
    kind: str = "instances",
    layout: str = "auto",
    annotations: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    check: bool = True,
    validate: bool = False,
) -> CocoPaths:
    """Find ``split``'s annotation file and image folder under ``root``.

    ``layout``: "coco" (``annotations/instances_train2017.json`` + ``train2017/`` or
    ``images/train2017/``), "roboflow" (``train/_annotations.coco.json``; val is read from ``valid/``
    or ``val/``), "detectron2" (a datasets root holding ``coco/``) or "auto" (the first that exists, in
    that order; ``CocoPaths.layout`` says which). ``root`` may use ``~`` and ``$VARS``; when None it is
    ``$COCO_ROOT``, else ``$DETECTRON2_DATASETS``. Explicit ``annotations=`` / ``images=`` win and are
    checked; give one and the other is looked up. Raises ``CocoPathError`` (a ``FileNotFoundError``)
    rather than return a path that does not exist, unless ``check=False``. ``validate=True`` also checks
    the annotation file's contents and raises ``CocoValidationError`` on problems.
    """
    s = parse_split(split, year)
    _check_kind(kind, "resolve_coco")
    asked = layout
    if layout != "auto" and layout not in LAYOUTS:
        close = difflib.get_close_matches(str(layout), LAYOUTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CocoSplitError(
            message(
                f"resolve_coco: layout={layout!r} is unknown{hint}", expected=f"'auto' or one of {', '.join(LAYOUTS)}"
            )
        )
    ann = _expand(annotations) if annotations is not None else None
    img = _expand(images) if images is not None else None
    if ann is not None and img is not None:
        paths = CocoPaths(img, ann, s, "explicit")
    else:
        base, layout = _default_root(layout) if root is None else (_expand(root), layout)
        paths = _search(base, s, kind, layout, check, has_ann=ann is not None, has_img=img is not None)
        paths = CocoPaths(img or paths.images, ann or paths.annotations, s, paths.layout)
    if check:
        for path, what in ((ann, "annotations"), (img, "images")):
            if path is not None:
                _check_explicit(path, what, s)
    if validate:
        report = validate_annotations(paths.annotations, paths.images, kind=_kind_of(paths.annotations, kind))
        if not report.ok:
            raise CocoValidationError(report)
    _log_resolved(paths, asked)
    return paths


_LOGGED: set[tuple[str, str, str]] = set()  # (layout, annotations, images) already logged by this process


def _log_resolved(paths: CocoPaths, asked: str) -> None:
    """Say once (INFO, so the main rank's console) which layout was read and the two paths: a folder that
    holds ``coco/`` is read as detectron2's layout, and a data set built every epoch should not repeat it."""
    key = (paths.layout, str(paths.annotations), str(paths.images))
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    how = "found by layout='auto'" if asked == "auto" and paths.layout != "explicit" else "as given"
    get_logger(__name__).info(
        "resolve_coco: %s, %s layout (%s): annotations %s, images %s",
        paths.split,
        paths.layout,
        how,
        paths.annotations,
        paths.images,
    )


def _check_explicit(path: Path, what: str, split: CocoSplit) -> None:
    want_dir = what == "images"
    if path.is_dir() if want_dir else path.is_file():
        return
    if path.exists():
        problem = "is a file, expected the image folder" if want_dir else "is a folder, expected a .json file"
        raise CocoPathError(
            message(f"resolve_coco: {what}={str(path)!r} {problem} (split {split})", fix=f"pass the {what} path"),
            split=split,
            layout="explicit",
            tried=[path],
        )
    near = next((p for p in path.parents if p.is_dir()), None)
    got = None
    found: list[Path] = []
    closest = None
    if near is not None and not want_dir:
        found = sorted(near.glob("*.json"))[:12]
        close = difflib.get_close_matches(path.name, [p.name for p in found], n=1, cutoff=0.3)
        closest = near / close[0] if close else None
        got = f"{near} holds {', '.join(p.name for p in found) or 'no .json files'}"
        got += f"; closest match: {closest}" if closest is not None else ""
    elif near is not None:
        got = f"the nearest existing parent is {near}"
    text = message(
        f"resolve_coco: {what}={str(path)!r} does not exist (split {split})",
        got=got,
        fix=f"correct {what}=, or leave it out to look it up under root",
    )
    raise CocoPathError(text, split=split, layout="explicit", tried=[path], found=found, closest=closest)


def _search(
    root: Path, split: CocoSplit, kind: str, layout: str, check: bool, *, has_ann: bool = False, has_img: bool = False
) -> CocoPaths:
    """Walk the layouts' candidates; with ``has_ann``/``has_img`` that part is given and not needed."""
    layouts = LAYOUTS if layout == "auto" else (layout,)
    tried: list[Path] = []
    first: CocoPaths | None = None
    for name in layouts:
        for ann, image_dirs in _candidates(root, split, kind, name):
            first = first or CocoPaths(image_dirs[0], ann, split, name)
            if has_ann:  # only the image folder is looked up
                tried.extend(image_dirs)
                found_dir = next((d for d in image_dirs if d.is_dir()), None)
                if found_dir is not None:
                    return CocoPaths(found_dir, ann, split, name)
                continue
            tried.append(ann)
            if not ann.is_file():
                continue
            found_dir = next((d for d in image_dirs if d.is_dir()), None)
            if found_dir is not None or has_img or not check:
                return CocoPaths(found_dir or image_dirs[0], ann, split, name)
            tried.extend(image_dirs)
            raise CocoPathError(
                message(
                    f"resolve_coco: found {ann} ({name} layout) for split {split}, but no image folder",
                    got=f"tried {', '.join(map(str, image_dirs))}",
                    fix=f"put the {split} images in {image_dirs[0]}, or pass images=",
                ),
                root=root,
                split=split,
                layout=name,
                tried=tried,
            )
    if not check and first is not None:
        return first
    if has_ann:
        raise CocoPathError(
            message(
                f"resolve_coco: annotations= was given but no image folder for split {split} "
                f"exists under {root} (layout={layout!r})",
                got=f"tried {', '.join(map(str, tried))}",
                fix="pass images= too",
            ),
            root=root,
            split=split,
            layout=layout,
            tried=tried,
        )
    raise _not_found(root, split, kind, layout, tried)


def _other_year(filename: str, split: CocoSplit, kind: str) -> int | None:
    """The year of ``filename`` when it is ``split``'s annotation file of another year, else None."""
    for year in (2014, 2015, 2017):
        if year != split.year:
            try:
                if annotation_filename(CocoSplit(split.name, year), kind=kind) == filename:
                    return year
            except ValueError:  # no such split in that year (minival2017, ...)
                continue
    return None


def _not_found(root: Path, split: CocoSplit, kind: str, layout: str, tried: list[Path]) -> CocoPathError:
    found = _existing_annotations(root) if root.is_dir() else []
    expected = annotation_filename(split, kind=kind)
    names = [p.name for p in found]
    same_name = [p for p in found if p.name == expected]
    close = difflib.get_close_matches(expected, names, n=1, cutoff=0.3)
    closest = same_name[0] if same_name else found[names.index(close[0])] if close else None
    lines = [
        f"resolve_coco: no {kind} annotations for split {split} (parsed as name={split.name!r}, "
        f"year={split.year}) under {root} (layout={layout!r}).",
        "Paths tried:",
    ]
    lines += [f"  {p}" for p in tried] or ["  (none)"]
    if layout == "roboflow" and not tried:
        lines.append(
            f"The roboflow layout has only train/, valid/ and test/ folders with instances "
            f"annotations; it has nothing for {split} ({kind})."
        )
    if not root.exists():
        near = next((p for p in root.parents if p.is_dir()), None)
        lines.append(f"The root {root} does not exist" + (f"; its nearest existing parent is {near}." if near else "."))
    elif not root.is_dir():
        lines.append(f"The root {root} is a file; pass the folder that holds the dataset.")
    elif found:
        lines.append("Annotation files that exist under the root:")
        lines += [f"  {p}" for p in found[:12]]
        if len(found) > 12:
            lines.append(f"  ... and {len(found) - 12} more")
        if same_name and same_name[0].parent.name == "annotations":
            lines.append(
                f"Closest match: {closest}; it has the expected name, so the dataset root is probably "
                f"root={str(same_name[0].parent.parent)!r}."
            )
        elif closest is not None and _other_year(closest.name, split, kind) is not None:
            other = _other_year(closest.name, split, kind)
            lines.append(
                f"Closest match: {closest}; it is the {other} {split.name} split: ask for year {other} "
                f"(Python: year={other}; the ratlib command: --year {other})."
            )
        elif closest is not None:
            lines.append(f"Closest match: {closest}; if that is the file, pass annotations={str(closest)!r}.")
    else:
        lines.append("No .json file exists under the root (3 levels searched).")
    if (root / "_annotations.coco.json").is_file():
        lines.append(
            f"{root} holds _annotations.coco.json itself: it looks like one Roboflow split folder; "
            f"pass its parent {root.parent} as root."
        )
    if root.name == "annotations":
        lines.append(f"The root is an annotations/ folder; pass its parent {root.parent} as root.")
    lines.append("Fix: check root and split, or pass annotations= and images= explicitly.")
    return CocoPathError(
        "\n".join(lines), root=root, split=split, layout=layout, tried=tried, found=found, closest=closest
    )


# ----------------------------------------------------------------------------------------------
# Validation of an annotation file's contents


@dataclass
class ValidationReport:
    """What ``validate_annotations`` found: counts, and every problem (none dropped; ``str`` shortens)."""

    annotations: Path
    kind: str = "instances"
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items()) or "nothing counted"
        lines = [
            f"{self.annotations} ({self.kind}): {counts}; {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        ]
        lines += [f"  error: {e}" for e in self.errors[:50]]
        if len(self.errors) > 50:
            lines.append(f"  ... and {len(self.errors) - 50} more errors (all in .errors)")
        lines += [f"  warning: {w}" for w in self.warnings[:20]]
        if len(self.warnings) > 20:
            lines.append(f"  ... and {len(self.warnings) - 20} more warnings (all in .warnings)")
        return "\n".join(lines)


class CocoValidationError(RatlibError, ValueError):
    """An annotation file failed ``validate_annotations``; ``.report`` holds every problem."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(f"{len(report.errors)} problem(s) in COCO annotations:\n{report}")
        self.report = report


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind_of(path: Path, default: str = "instances") -> str:
    """The kind a file name announces (``captions_val2017.json`` -> captions), else ``default``."""
    name = path.name
    return next((k for k in sorted(KINDS, key=len, reverse=True) if name.startswith(k + "_")), default)


def _check_box(report: ValidationReport, where: str, box: Any, image: dict[str, Any] | None) -> None:
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        report.errors.append(f"{where}: bbox {box!r} is not [x, y, width, height] numbers")
        return
    x, y, w, h = box
    if w <= 0 or h <= 0:
        report.errors.append(f"{where}: bbox {box} has non-positive size")
    if image is not None and _number(image.get("width")) and _number(image.get("height")):
        tol = 1.0  # COCO's own boxes overrun their image by rounding, up to about a pixel
        if x < -tol or y < -tol or x + w > image["width"] + tol or y + h > image["height"] + tol:
            report.errors.append(f"{where}: bbox {box} lies outside its image ({image['width']}x{image['height']})")


def _check_segmentation(report: ValidationReport, where: str, seg: Any) -> None:
    if isinstance(seg, list):
        for poly in seg:
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(_number(v) for v in poly)):
                report.errors.append(
                    f"{where}: segmentation polygon must be a flat list of at least 3 x,y pairs, got {str(poly)[:60]}"
                )
                return
    elif isinstance(seg, dict):
        size = seg.get("size")
        if "counts" not in seg or not (isinstance(size, list) and len(size) == 2):
            report.errors.append(f"{where}: RLE segmentation needs 'counts' and 'size' [height, width]")
    else:
        report.errors.append(f"{where}: segmentation is a {type(seg).__name__}; expected polygons or RLE")


def _objects(report: ValidationReport, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """``data[key]``'s entries; anything that is not an object is reported, not skipped silently."""
    entries = data.get(key)
    if not isinstance(entries, list):
        return []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            report.errors.append(f"{key}[{index}] is a {type(entry).__name__}, expected an object")
    return [e for e in entries if isinstance(e, dict)]


def _check_ids(report: ValidationReport, what: str, entries: list[dict[str, Any]], key: str = "id") -> None:
    for value, n in Counter(e.get(key) for e in entries if key in e).items():
        if n > 1:
            report.errors.append(f"{what} {key} {value!r} appears {n} times; it must be unique")


def _check_annotation(
    report: ValidationReport,
    kind: str,
    ann: dict[str, Any],
    image: dict[str, Any] | None,
    cats: dict[Any, dict[str, Any]],
) -> None:
    """One annotation of ``kind`` (its image_id is checked by the caller)."""
    where = f"annotation {ann.get('id')!r}"
    if kind == "captions":
        if not isinstance(ann.get("caption"), str):
            report.errors.append(f"{where}: caption is missing or not a string")
        return
    if kind == "panoptic":
        for seg in ann.get("segments_info") or []:
            seg_where = f"annotation of image {ann.get('image_id')!r}, segment {seg.get('id')!r}"
            if seg.get("category_id") not in cats:
                report.errors.append(f"{seg_where}: category_id {seg.get('category_id')!r} is not in categories")
            _check_box(report, seg_where, seg.get("bbox"), image)
        return
    if ann.get("category_id") not in cats:
        report.errors.append(f"{where}: category_id {ann.get('category_id')!r} is not in categories")
    _check_box(report, where, ann.get("bbox"), image)
    if ann.get("iscrowd", 0) not in (0, 1):
        report.errors.append(f"{where}: iscrowd is {ann.get('iscrowd')!r}; expected 0 or 1")
    if "segmentation" in ann:
        _check_segmentation(report, where, ann["segmentation"])
    if not _number(ann.get("area")):
        report.errors.append(f"{where}: area {ann.get('area')!r} is missing or not a number (COCOeval needs it)")
    elif ann["area"] <= 0:
        report.warnings.append(f"{where}: area {ann['area']} is not positive; COCOeval's area ranges skip it")
    if kind == "person_keypoints":
        points = ann.get("keypoints")
        expected = 3 * len((cats.get(ann.get("category_id")) or {}).get("keypoints") or [])
        if not (isinstance(points, list) and len(points) == expected):
            got = len(points) if isinstance(points, list) else repr(points)
            report.errors.append(
                f"{where}: keypoints has {got} values; expected {expected} (3 per keypoint of its category)"
            )


def validate_annotations(
    annotations: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *, kind: str | None = None
) -> ValidationReport:
    """Light check of a COCO annotation file: JSON parses, required keys are there, ids are unique,
    every annotation's image_id and category_id exist, boxes have positive size inside their image,
    polygons and RLE are well formed, and (with ``images``) image files exist. ``kind`` defaults to the
    file name's prefix (``captions_*``, ``panoptic_*``, ...; instances otherwise). Reports every
    problem; drops nothing."""
    path = Path(annotations)
    kind = kind or _kind_of(path)
    _check_kind(kind, "validate_annotations")
    report = ValidationReport(path, kind)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        report.errors.append(f"not valid JSON: {exc}")
        return report
    except OSError as exc:
        report.errors.append(f"cannot read: {exc}")
        return report
    if not isinstance(data, dict):
        report.errors.append(
            f"top level is a {type(data).__name__}; expected an object with images, annotations and categories"
        )
        return report
    for key in (
        ["images"] + (["annotations"] if kind != "image_info" else []) + (["categories"] if kind != "captions" else [])
    ):
        if not isinstance(data.get(key), list):
            hint = " (a test split's image_info file? pass kind='image_info')" if key == "annotations" else ""
            report.errors.append(f"missing or non-list key {key!r}{hint}")
    images_list, cat_list, anns = (_objects(report, data, k) for k in ("images", "categories", "annotations"))
    _check_ids(report, "image", images_list)
    _check_ids(report, "image", images_list, "file_name")
    _check_ids(report, "category", cat_list)
    _check_ids(report, "annotation", anns, "image_id" if kind == "panoptic" else "id")
    for im in images_list:
        missing = [k for k in ("id", "file_name", "width", "height") if k not in im]
        if missing:
            report.errors.append(f"image {im.get('id')!r}: missing {', '.join(map(repr, missing))}")
    imgs = {im.get("id"): im for im in images_list}
    cats = {c.get("id"): c for c in cat_list}
    for ann in anns:
        if ann.get("image_id") not in imgs:
            report.errors.append(f"annotation {ann.get('id')!r}: image_id {ann.get('image_id')!r} is not in images")
        _check_annotation(report, kind, ann, imgs.get(ann.get("image_id")), cats)
    report.counts = {"images": len(imgs), "annotations": len(anns), "categories": len(cats)}
    if kind in ("instances", "person_keypoints"):
        report.counts["crowd annotations"] = sum(ann.get("iscrowd") == 1 for ann in anns)
    unused = len(set(imgs) - {ann.get("image_id") for ann in anns})
    if anns and unused:
        report.warnings.append(
            f"{unused} image(s) have no annotations (fine for negatives; torchvision's "
            "detection references drop them from training)"
        )
    if images is not None:
        _check_image_files(report, Path(images), images_list)
    return report


def _check_image_files(report: ValidationReport, folder: Path, images_list: list[dict[str, Any]]) -> None:
    if not folder.is_dir():
        report.errors.append(f"image folder {folder} does not exist")
        return
    names = {e.name for e in os.scandir(folder)}
    for im in images_list:
        name = im.get("file_name")
        if isinstance(name, str) and not (name in names if "/" not in name else (folder / name).is_file()):
            report.errors.append(f"image file {folder / name} does not exist (image id {im.get('id')!r})")


# ----------------------------------------------------------------------------------------------
# `ratlib coco ROOT SPLIT`


def _cli_error(args: argparse.Namespace, exc: Exception) -> int:
    if args.json:
        out: dict[str, Any] = {"ok": False, "error": str(exc)}
        if isinstance(exc, CocoPathError):
            out.update(
                split=str(exc.split) if exc.split else None,
                layout=exc.layout,
                tried=[str(p) for p in exc.tried],
                found=[str(p) for p in exc.found],
                closest=str(exc.closest) if exc.closest else None,
            )
        print(json.dumps(out, indent=2))
    print(f"error: {exc}", file=sys.stderr)
    return 1


def cli_main(args: argparse.Namespace) -> int:
    """``ratlib coco``: print the resolved paths (or the error to stderr); exit 1 on error."""
    try:
        paths = resolve_coco(args.root, args.split, year=args.year, kind=args.kind, layout=args.layout)
        kind = _kind_of(paths.annotations, args.kind)  # a test split's instances file is image_info_*.json
        report = validate_annotations(paths.annotations, paths.images, kind=kind) if args.check else None
    except CocoYearError as exc:  # the Python form (year=...) would not help on the command line
        error = ValueError(
            message(
                f"split {exc.split!r} names another year than --year {exc.year}",
                fix=f"run `ratlib coco {args.root} {exc.name} --year {exc.year}`, or drop --year",
            )
        )
        return _cli_error(args, error)
    except (CocoPathError, ValueError) as exc:
        return _cli_error(args, exc)
    ok = report is None or report.ok
    if args.json:
        result: dict[str, Any] = {
            "ok": ok,
            "split": str(paths.split),
            "layout": paths.layout,
            "annotations": str(paths.annotations),
            "images": str(paths.images),
        }
        if report is not None:
            result["check"] = {
                "kind": report.kind,
                "counts": report.counts,
                "errors": report.errors,
                "warnings": report.warnings,
            }
        print(json.dumps(result, indent=2))
    else:
        print(
            f"split        {paths.split}\nlayout       {paths.layout}\nannotations  {paths.annotations}\n"
            f"images       {paths.images}"
        )
        if report is not None:
            print(f"check        {report}")
    if not ok:
        assert report is not None
        print(
            f"error: {len(report.errors)} problem(s) in {paths.annotations}; first: {report.errors[0]}", file=sys.stderr
        )
    return 0 if ok else 1
