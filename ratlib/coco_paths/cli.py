"""``ratlib coco ROOT SPLIT``: the resolved paths (and with ``--check`` the annotation check), or the error."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ratlib.coco_paths.annotations import _kind_of, validate_annotations
from ratlib.coco_paths.resolve import CocoPathError, resolve_coco
from ratlib.coco_paths.splits import CocoYearError
from ratlib.errors import message


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
