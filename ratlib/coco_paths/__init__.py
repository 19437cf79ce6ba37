"""COCO split parsing and path resolution that cannot double a year.

``parse_split("train2017")``, ``parse_split("2017_train")``, ``parse_split("instances_train2017.json")``
and ``parse_split("train", year=2017)`` are all ``CocoSplit("train", 2017)``; file names are built from
that parsed form, never by pasting a year onto user input. ``resolve_coco`` finds the annotation file
and image folder in the layouts people really have (COCO's own, Roboflow exports, detectron2 dataset
roots) and, when they are not there, says what is. Standard library only.

The package: ``splits`` (``parse_split``, ``annotation_filename``), ``resolve`` (``resolve_coco``),
``annotations`` (``validate_annotations``), ``cli`` (``ratlib coco``). Every public name is importable from here.
"""

from __future__ import annotations

from ratlib.coco_paths.annotations import CocoValidationError, ValidationReport, validate_annotations
from ratlib.coco_paths.resolve import CocoPathError, CocoPaths, resolve_coco
from ratlib.coco_paths.splits import (
    KINDS,
    LAYOUTS,
    SPLITS,
    CocoSplit,
    CocoSplitError,
    CocoSplitTypeError,
    CocoYearError,
    annotation_filename,
    parse_split,
)

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
