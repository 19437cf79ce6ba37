"""``resolve_coco``: the annotation file and image folder of a split, in the layouts people really have (COCO's
own, Roboflow exports, detectron2 dataset roots), and when they are not there, a ``CocoPathError`` that says
what is.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratlib.coco_paths.annotations import CocoValidationError, _kind_of, validate_annotations
from ratlib.coco_paths.splits import (
    _ROBOFLOW,
    LAYOUTS,
    CocoSplit,
    CocoSplitError,
    _check_kind,
    annotation_filename,
    parse_split,
)
from ratlib.errors import RatlibError, message
from ratlib.rank_logger import get_logger

__all__ = ["CocoPathError", "CocoPaths", "resolve_coco"]


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

    __module__ = "ratlib.coco_paths"  # tracebacks name it as users import it

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
    get_logger("ratlib.coco_paths").info(
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
