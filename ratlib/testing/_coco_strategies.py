"""Hypothesis strategies over COCO split spellings and directory trees (see ``ratlib.testing.strategies``)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from ratlib.coco_paths import LAYOUTS, SPLITS, CocoPaths, CocoSplit, annotation_filename

_ROBOFLOW = {"train": "train", "val": "valid", "test": "test"}


@st.composite
def _split(draw: st.DrawFn, split: str | None, year: int | None) -> CocoSplit:
    names = [split] if split else sorted(SPLITS)
    name = draw(st.sampled_from(names))
    years = [y for y in SPLITS[name] if year is None or y == year]
    if not years:
        raise ValueError(f"coco_split_spellings: COCO has no split {name}{year}")
    return CocoSplit(name, draw(st.sampled_from(years)))


def _case(draw: st.DrawFn, text: str) -> str:
    style = draw(st.sampled_from(["lower", "upper", "title", "random"]))
    if style == "upper":
        return text.upper()
    if style == "title":
        return text.title()
    if style == "random":
        flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        return "".join(c.upper() if f else c for c, f in zip(text, flips))
    return text


@st.composite
def coco_split_spellings(draw: st.DrawFn, split: str | None = None, year: int | None = None
                         ) -> tuple[str, CocoSplit]:
    """``(spelling, CocoSplit)``: one accepted spelling of a COCO split and the split it stands for.

    Spellings vary case, separators (none, ``_``, ``-``, space), year position (``train2017``,
    ``2017_train``), an omitted default year, ``instances_`` prefixes, ``.json`` suffixes and spaces.
    """
    s = draw(_split(split, year))
    name = s.name
    if name == "test-dev":
        name = draw(st.sampled_from(["test-dev", "testdev", "test_dev"]))
    if name == "val":
        name = draw(st.sampled_from(["val", "val", "valid"]))
    sep = draw(st.sampled_from(["", "_", "-", " "]))
    default = SPLITS[s.name][0] == s.year
    form = draw(st.sampled_from(["name_year", "year_name", "name"] if default else ["name_year", "year_name"]))
    text = {"name_year": f"{name}{sep}{s.year}", "year_name": f"{s.year}{sep}{name}", "name": name}[form]
    if form == "name_year" and draw(st.booleans()):
        text = draw(st.sampled_from(["instances_", "INSTANCES_"])) + text
        if draw(st.booleans()):
            text += ".json"
    text = _case(draw, text)
    text = draw(st.sampled_from(["", " ", "  "])) + text + draw(st.sampled_from(["", " ", "\t"]))
    return text, s


@dataclass(frozen=True)
class CocoTree:
    """A COCO tree written by ``coco_trees``: ``root``, the ``split`` asked for, its ``layout``, and
    ``expected``: the paths ``resolve_coco`` must return, or None when it must raise ``CocoPathError``."""

    root: Path
    split: CocoSplit
    layout: str
    expected: CocoPaths | None


@st.composite
def coco_trees(draw: st.DrawFn, layout: str | None = None) -> CocoTree:
    """A COCO directory tree in a new temporary folder, in any supported layout, with or without the
    annotation file and image folder the drawn split needs, plus other splits' files as distractors."""
    lay = layout or draw(st.sampled_from(LAYOUTS))
    names = ["train", "val", "test"] if lay == "roboflow" else ["train", "val", "minival", "test-dev"]
    s = draw(_split(draw(st.sampled_from(names)), None))
    has_ann, has_images = draw(st.booleans()), draw(st.booleans())
    root = Path(tempfile.mkdtemp(prefix="ratlib-coco-tree-"))
    base = root / "coco" if lay == "detectron2" else root

    def place(split: CocoSplit, ann: bool, images: bool) -> tuple[Path, Path]:
        if lay == "roboflow":
            folder = base / _ROBOFLOW[split.name]
            ann_path, img_dir = folder / "_annotations.coco.json", folder
            if ann or images:
                folder.mkdir(parents=True, exist_ok=True)
        else:
            ann_path, img_dir = base / "annotations" / annotation_filename(split), base / split.image_folder
            if images:
                img_dir.mkdir(parents=True, exist_ok=True)
        if ann:
            ann_path.parent.mkdir(parents=True, exist_ok=True)
            ann_path.write_text('{"images": [], "annotations": [], "categories": []}')
        return ann_path, img_dir

    others = [CocoSplit(n, SPLITS[n][0]) for n in names if n != s.name]
    for other in draw(st.lists(st.sampled_from(others), max_size=2, unique=True)) if others else []:
        place(other, True, True)
    ann_path, img_dir = place(s, has_ann, has_images)
    ok = has_ann and (has_images or lay == "roboflow")
    expected = CocoPaths(img_dir, ann_path, s, lay) if ok else None
    return CocoTree(root, s, lay, expected)
