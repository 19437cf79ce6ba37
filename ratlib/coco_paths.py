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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CocoPathError",
    "CocoPaths",
    "CocoSplit",
    "CocoValidationError",
    "KINDS",
    "LAYOUTS",
    "ValidationReport",
    "annotation_filename",
    "parse_split",
    "resolve_coco",
    "validate_annotations",
]

# split name -> years it exists for (first: the default when no year is given)
SPLITS: dict[str, tuple[int, ...]] = {
    "train": (2017, 2014),
    "val": (2017, 2014),
    "test": (2017, 2015, 2014),
    "test-dev": (2017, 2015),
    "unlabeled": (2017,),
    "minival": (2014,),
    "valminusminival": (2014,),
}
_ALIASES = {"valid": "val", "validation": "val", "testdev": "test-dev", "unlabelled": "unlabeled"}
KINDS = ("instances", "person_keypoints", "captions", "panoptic", "image_info")
LAYOUTS = ("coco", "roboflow", "detectron2")
_ROBOFLOW = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}
_SPELLING = re.compile(r"^(?:(\d{4})[\s_\-]*)?([a-z][a-z\s_\-]*?)(?:[\s_\-]*(\d{4}))?$")


@dataclass(frozen=True, order=True)
class CocoSplit:
    """A COCO split, parsed: ``name`` (train, val, test, test-dev, unlabeled, minival, valminusminival)
    and ``year``. ``str()`` gives the canonical spelling, e.g. ``train2017``."""

    name: str
    year: int

    def __str__(self) -> str:
        return f"{self.name}{self.year}"

    @property
    def image_folder(self) -> str:
        """The image folder's name in COCO's own layout (minival images live in val2014)."""
        if self.name in ("minival", "valminusminival"):
            return "val2014"
        if self.name == "test-dev":
            return f"test{self.year}"
        return str(self)

    @property
    def is_test(self) -> bool:
        return self.name in ("test", "test-dev")


def _valid_names() -> list[str]:
    return [f"{name}{year}" for name, years in SPLITS.items() for year in years] + list(SPLITS)


def _suggest(text: str) -> str:
    close = difflib.get_close_matches(text, _valid_names(), n=3, cutoff=0.5)
    close = close or ["train2017", "val2017", "test2017"]
    return ", ".join(close)


def _year(value: int | str | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        year = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{what}={value!r} is not a year; expected 2014, 2015 or 2017") from None
    return year


def parse_split(split: str | CocoSplit, year: int | str | None = None) -> CocoSplit:
    """Parse any common spelling of a COCO split into a ``CocoSplit``.

    Accepts ``train``, ``train2017``, ``2017_train``, ``train_2017``, ``instances_train2017``,
    ``instances_train2017.json``, ``val``, ``minival2014``, ``test-dev2017``, ``valid`` (Roboflow), in
    any case with surrounding spaces. A year in the name and ``year`` must agree. Unknown names,
    conflicting years and impossible pairs (``minival2017``) raise ``ValueError`` with the closest
    valid names.
    """
    given_year = _year(year, "year")
    if isinstance(split, CocoSplit):
        if given_year is not None and given_year != split.year:
            raise ValueError(f"split {str(split)!r} has year {split.year} but year={given_year} was given; "
                             "drop one of them")
        return split
    if not isinstance(split, str):
        raise TypeError(f"parse_split: split must be a str, got {type(split).__name__} ({split!r})")
    text = os.path.basename(split.strip()).lower()
    for suffix in (".coco.json", ".json"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    for kind in sorted(KINDS, key=len, reverse=True):
        for sep in ("_", "-"):
            if text.startswith(kind + sep):
                text = text[len(kind) + 1:]
    text = text.strip()
    if re.fullmatch(r"\d{4}", text):
        raise ValueError(f"split {split!r} is only a year; name the split too, e.g. {', '.join(f'{n}{text}' for n in ('train', 'val'))}")
    m = _SPELLING.match(text)
    if m is None:
        raise ValueError(f"unknown COCO split {split!r}; closest valid names: {_suggest(text)}")
    year_a, raw_name, year_b = m.groups()
    if year_a and year_b and year_a != year_b:
        raise ValueError(f"split {split!r} names two different years ({year_a} and {year_b}); keep one")
    name = re.sub(r"[\s_\-]+", "", raw_name)
    name = _ALIASES.get(name, name)
    if name not in SPLITS:
        raise ValueError(f"unknown COCO split {split!r} (read as {name!r}); closest valid names: "
                         f"{_suggest(name + (year_a or year_b or ''))}")
    in_name = _year(year_a or year_b, f"the year in split {split!r}")
    if in_name is not None and given_year is not None and in_name != given_year:
        raise ValueError(f"split {split!r} says {in_name} but year={given_year} was given; the years disagree. "
                         f"Pass split={name!r} with year={given_year}, or drop year")
    chosen = in_name if in_name is not None else given_year
    years = SPLITS[name]
    if chosen is None:
        chosen = years[0]
    if chosen not in years:
        valid = ", ".join(f"{name}{y}" for y in years)
        raise ValueError(f"COCO has no split {name}{chosen} (from {split!r}); {name} exists as: {valid}. "
                         f"Closest valid names: {_suggest(f'{name}{chosen}')}")
    return CocoSplit(name, chosen)


def annotation_filename(split: str | CocoSplit, year: int | str | None = None, kind: str = "instances") -> str:
    """The annotation file name in COCO's own layout, e.g. ``instances_train2017.json``.

    Test splits have no labels: they map to ``image_info_test2017.json`` / ``image_info_test-dev2017.json``.
    """
    s = parse_split(split, year)
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"annotation kind {kind!r} is unknown{hint}; expected one of {', '.join(KINDS)}")
    if s.is_test or s.name == "unlabeled":
        if kind not in ("instances", "image_info"):
            raise ValueError(f"{s} has no {kind} annotations (test and unlabeled splits only have image_info_*.json); "
                             "use kind='image_info'")
        return f"image_info_{s}.json"
    if kind == "image_info":
        raise ValueError(f"{s} has no image_info file; image_info_*.json exists for test and unlabeled splits. "
                         "Use kind='instances'")
    if kind == "panoptic" and (s.year != 2017 or s.name not in ("train", "val")):
        raise ValueError(f"COCO panoptic annotations exist for train2017 and val2017 only, not {s}")
    return f"{kind}_{s}.json"


@dataclass(frozen=True)
class CocoPaths:
    """Where a split's images and annotation file are, and which layout they were found in."""

    images: Path
    annotations: Path
    split: CocoSplit
    layout: str


class CocoPathError(FileNotFoundError):
    """The split's files are not where any layout puts them. The message lists the paths tried, the
    annotation files that do exist under the root and the closest match."""

    def __init__(self, message: str, *, tried: list[Path] | None = None, found: list[Path] | None = None,
                 closest: Path | None = None) -> None:
        super().__init__(message)
        self.tried = tried or []
        self.found = found or []
        self.closest = closest

    def __str__(self) -> str:
        return str(self.args[0])


def _candidates(root: Path, split: CocoSplit, kind: str, layout: str) -> list[tuple[Path, list[Path]]]:
    """(annotation file, image folders to try) for one layout."""
    if layout == "coco":
        ann = root / "annotations" / annotation_filename(split, kind=kind)
        return [(ann, [root / split.image_folder, root / "images" / split.image_folder])]
    if layout == "detectron2":
        return _candidates(root / "coco", split, kind, "coco")
    if layout == "roboflow":
        names = _ROBOFLOW.get(split.name, ())
        return [(root / n / "_annotations.coco.json", [root / n]) for n in names]
    raise ValueError(f"layout={layout!r} is unknown; expected 'auto' or one of {', '.join(LAYOUTS)}")


def _existing_annotations(root: Path, limit: int = 12) -> list[Path]:
    found: list[Path] = []
    if not root.is_dir():
        return found
    for depth in ("*.json", "*/*.json", "*/*/*.json"):
        for path in sorted(root.glob(depth)):
            found.append(path)
            if len(found) >= limit:
                return found
    return found


def _default_root() -> tuple[Path, str]:
    if os.environ.get("COCO_ROOT"):
        return Path(os.environ["COCO_ROOT"]), "COCO_ROOT"
    if os.environ.get("DETECTRON2_DATASETS"):
        return Path(os.environ["DETECTRON2_DATASETS"]), "DETECTRON2_DATASETS"
    raise CocoPathError("resolve_coco: no root given and neither COCO_ROOT nor DETECTRON2_DATASETS is set; "
                        "pass root=, or export COCO_ROOT=/path/to/coco")


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

    ``layout``: "coco" (``annotations/instances_train2017.json`` + ``train2017/``), "roboflow"
    (``train/_annotations.coco.json``; ``val`` is read from ``valid/``), "detectron2" (a datasets root
    holding ``coco/``) or "auto" (the first that exists, in that order; ``CocoPaths.layout`` says which).
    ``root`` may use ``~`` and ``$VARS``; when None it is ``$COCO_ROOT``, else ``$DETECTRON2_DATASETS``
    (read as a detectron2 datasets root). Explicit ``annotations=`` / ``images=`` win and are checked.
    Never returns a path that does not exist unless ``check=False``. ``validate=True`` also checks the
    annotation file's contents (see ``validate_annotations``).
    """
    s = parse_split(split, year)
    if root is None:
        base, source = _default_root()
        if source == "DETECTRON2_DATASETS" and layout == "auto":
            layout = "detectron2"
    else:
        base = Path(os.path.expandvars(os.fspath(root))).expanduser()
    layouts = LAYOUTS if layout == "auto" else (layout,)
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"resolve_coco: layout={layout!r} is unknown; expected 'auto' or one of {', '.join(LAYOUTS)}")
    tried: list[Path] = []

    if annotations is not None or images is not None:
        ann = Path(os.path.expandvars(os.fspath(annotations))).expanduser() if annotations is not None else None
        img = Path(os.path.expandvars(os.fspath(images))).expanduser() if images is not None else None
        if ann is None or img is None:  # one given: find the other through the layouts
            auto = resolve_coco(base, s, kind=kind, layout=layout, check=check)
            ann, img = ann or auto.annotations, img or auto.images
        if check:
            for path, what, ok in ((ann, "annotations", ann.is_file()), (img, "images", img.is_dir())):
                if not ok:
                    raise CocoPathError(f"resolve_coco: {what}={os.fspath(path)!r} given explicitly does not exist "
                                        f"(split {s}); fix the path", tried=[path])
        paths = CocoPaths(img, ann, s, "explicit")
    else:
        paths = None
        for name in layouts:
            for ann, image_dirs in _candidates(base, s, kind, name):
                tried.append(ann)
                if not check:
                    paths = paths or CocoPaths(image_dirs[0], ann, s, name)
                    continue
                if not ann.is_file():
                    continue
                found_dir = next((d for d in image_dirs if d.is_dir()), None)
                tried.extend(image_dirs)
                if found_dir is None:
                    raise CocoPathError(
                        f"resolve_coco: found {ann} ({name} layout) for split {s}, but no image folder: tried "
                        f"{', '.join(map(str, image_dirs))}. Fix: put the {s} images in {image_dirs[0]}, or pass "
                        f"images=", tried=tried)
                paths = CocoPaths(found_dir, ann, s, name)
                break
            if paths is not None and check:
                break
        if paths is None:
            raise _not_found(base, s, kind, layout, tried)
    if validate:
        report = validate_annotations(paths.annotations, paths.images)
        if not report.ok:
            raise CocoValidationError(report)
    return paths


def _not_found(root: Path, split: CocoSplit, kind: str, layout: str, tried: list[Path]) -> CocoPathError:
    found = _existing_annotations(root)
    expected = annotation_filename(split, kind=kind)
    names = [p.name for p in found]
    close = difflib.get_close_matches(expected, names, n=1, cutoff=0.3)
    closest = found[names.index(close[0])] if close else None
    lines = [f"resolve_coco: no {kind} annotations for split {split} (parsed as name={split.name!r}, "
             f"year={split.year}) under {root} (layout={layout!r}).", "Paths tried:"]
    lines += [f"  {p}" for p in tried]
    if not root.exists():
        lines.append(f"The root {root} does not exist.")
    elif found:
        lines.append("Annotation files that exist under the root:")
        lines += [f"  {p}" for p in found]
        if closest is not None:
            lines.append(f"Closest match: {closest}; if that is the file, pass annotations={str(closest)!r}.")
    else:
        lines.append("No .json file exists under the root (3 levels searched).")
    lines.append("Fix: check root and split, or pass annotations= and images= explicitly.")
    return CocoPathError("\n".join(lines), tried=tried, found=found, closest=closest)


# ----------------------------------------------------------------------------------------------
# Validation of an annotation file's contents


@dataclass
class ValidationReport:
    """What ``validate_annotations`` found: counts and every problem, none dropped."""

    annotations: Path
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [f"{self.annotations}: " + ", ".join(f"{v} {k}" for k, v in self.counts.items())]
        lines += [f"  error: {e}" for e in self.errors[:50]]
        if len(self.errors) > 50:
            lines.append(f"  ... and {len(self.errors) - 50} more errors")
        lines += [f"  warning: {w}" for w in self.warnings[:20]]
        return "\n".join(lines)


class CocoValidationError(ValueError):
    """An annotation file failed ``validate_annotations``; ``.report`` holds every problem."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(f"{len(report.errors)} problem(s) in COCO annotations:\n{report}")
        self.report = report


def validate_annotations(annotations: str | os.PathLike[str], images: str | os.PathLike[str] | None = None
                         ) -> ValidationReport:
    """Light check of a COCO annotation file: JSON parses, required keys are there, every
    annotation's image_id and category_id exist, boxes have positive size inside their image, and
    (with ``images``) image files exist. Reports every problem; drops nothing."""
    path = Path(annotations)
    report = ValidationReport(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        report.errors.append(f"not valid JSON: {exc}")
        return report
    except OSError as exc:
        report.errors.append(f"cannot read: {exc}")
        return report
    if not isinstance(data, dict):
        report.errors.append(f"top level is a {type(data).__name__}, expected an object with images/annotations")
        return report
    for key in ("images", "categories") + (("annotations",) if "annotations" in data or "categories" in data else ()):
        if not isinstance(data.get(key), list):
            report.errors.append(f"missing or non-list key {key!r}")
    imgs = {im.get("id"): im for im in data.get("images") or [] if isinstance(im, dict)}
    cats = {c.get("id") for c in data.get("categories") or [] if isinstance(c, dict)}
    anns = data.get("annotations") or []
    report.counts = {"images": len(imgs), "categories": len(cats), "annotations": len(anns)}
    for im in imgs.values():
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                report.errors.append(f"image {im.get('id')!r}: missing {key!r}")
    for ann in anns:
        aid = ann.get("id")
        if ann.get("image_id") not in imgs:
            report.errors.append(f"annotation {aid}: image_id {ann.get('image_id')!r} is not in images")
        if ann.get("category_id") not in cats:
            report.errors.append(f"annotation {aid}: category_id {ann.get('category_id')!r} is not in categories")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4):
            report.errors.append(f"annotation {aid}: bbox {box!r} is not [x, y, w, h]")
            continue
        x, y, w, h = box
        if w <= 0 or h <= 0:
            report.errors.append(f"annotation {aid}: bbox {box} has non-positive size")
        im = imgs.get(ann.get("image_id"))
        if im and "width" in im and "height" in im:
            if x < 0 or y < 0 or x + w > im["width"] + 1 or y + h > im["height"] + 1:
                report.errors.append(f"annotation {aid}: bbox {box} lies outside its image "
                                     f"({im['width']}x{im['height']})")
    if images is not None:
        folder = Path(images)
        missing = [im["file_name"] for im in imgs.values() if "file_name" in im
                   and not (folder / im["file_name"]).is_file()]
        for name in missing[:20]:
            report.errors.append(f"image file {folder / name} does not exist")
        if len(missing) > 20:
            report.errors.append(f"... {len(missing) - 20} more image files do not exist")
    return report


# ----------------------------------------------------------------------------------------------
# `ratlib coco ROOT SPLIT`


def cli_main(args: argparse.Namespace) -> int:
    """``ratlib coco``: print the resolved paths (or the error); exit 1 on error."""
    try:
        paths = resolve_coco(args.root, args.split, year=args.year, kind=args.kind, layout=args.layout)
        report = validate_annotations(paths.annotations, paths.images) if args.check else None
    except (CocoPathError, ValueError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ok = report is None or report.ok
    if args.json:
        out: dict[str, Any] = {"ok": ok, "split": str(paths.split), "layout": paths.layout,
                               "annotations": str(paths.annotations), "images": str(paths.images)}
        if report is not None:
            out["check"] = {"counts": report.counts, "errors": report.errors, "warnings": report.warnings}
        print(json.dumps(out, indent=2))
    else:
        print(f"split        {paths.split}\nlayout       {paths.layout}\nannotations  {paths.annotations}\n"
              f"images       {paths.images}")
        if report is not None:
            print(str(report))
    return 0 if ok else 1

