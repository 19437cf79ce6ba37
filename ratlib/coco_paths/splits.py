"""COCO split names: ``parse_split`` reads every spelling people use into one ``CocoSplit`` (a year is never
doubled), and ``annotation_filename`` builds file names from that parsed form. Standard library only.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ratlib.errors import RatlibError, message

__all__ = [
    "CocoSplit",
    "CocoSplitError",
    "CocoSplitTypeError",
    "CocoYearError",
    "KINDS",
    "LAYOUTS",
    "SPLITS",
    "annotation_filename",
    "parse_split",
]

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

    __module__ = "ratlib.coco_paths"  # tracebacks name it as users import it


class CocoSplitTypeError(CocoSplitError, TypeError):
    """``parse_split`` was given something other than a str or ``CocoSplit``."""

    __module__ = "ratlib.coco_paths"  # tracebacks name it as users import it


class CocoYearError(CocoSplitError):
    """``parse_split``: the split names one year and ``year`` another (``ratlib coco`` words its fix with --year)."""

    __module__ = "ratlib.coco_paths"  # tracebacks name it as users import it

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
