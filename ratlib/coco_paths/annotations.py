"""``validate_annotations``: what is wrong inside a COCO annotation file (boxes, segmentations, ids, missing
image files), every problem listed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratlib.coco_paths.splits import KINDS, _check_kind
from ratlib.errors import RatlibError

__all__ = ["CocoValidationError", "ValidationReport", "validate_annotations"]


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

    __module__ = "ratlib.coco_paths"  # tracebacks name it as users import it

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
