"""Preflight checks (``ratlib doctor PATH...``): configs, their data paths, package layout, environment.

Each finding has a severity; errors make the command exit 1 (warnings too with ``--strict``).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from ratlib.config_defaults import ConfigError, ExperimentConfig, Finding, check_config, load_config

__all__ = ["cli_main", "diagnose", "missing_init_files"]

_SKIP = {".git", ".venv", "venv", "__pycache__", "node_modules", ".tox", "build", "dist", ".tools", "site-packages"}
_CONFIG_SUFFIXES = (".yaml", ".yml")


def missing_init_files(root: Path) -> list[Path]:
    """Folders of Python files that look like packages but lack ``__init__.py``: inside a package
    (the parent has one), or using relative imports (``from . import x``)."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP and not d.startswith("."))
        here = Path(folder)
        py = [f for f in files if f.endswith(".py")]
        if not py or "__init__.py" in files or here == root and not (here.parent / "__init__.py").exists():
            continue
        in_package = (here.parent / "__init__.py").exists()
        relative = any(_has_relative_import(here / f) for f in py)
        if in_package or relative:
            found.append(here)
    return found


def _has_relative_import(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.lstrip().startswith("from .") for line in text.splitlines())


def _check_coco(cfg: ExperimentConfig) -> list[Finding]:
    data = cfg.data
    extra = data.model_extra or {}
    if data.root is None or not any(k in extra for k in ("train_split", "val_split")):
        return []
    from ratlib.coco_paths import CocoPathError, resolve_coco

    out = []
    for key in ("train_split", "val_split"):
        if key in extra:
            try:
                resolve_coco(data.root, str(extra[key]))
            except (CocoPathError, ValueError) as exc:
                out.append(Finding("error", f"data.{key}", str(exc).splitlines()[0], "see `ratlib coco ROOT SPLIT`"))
    return out


def diagnose(paths: list[str]) -> list[tuple[str, Finding]]:
    """Findings for every config file and folder in ``paths``, each with the file it is about."""
    results: list[tuple[str, Finding]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            results.append((raw, Finding("error", "path", f"{raw!r} does not exist", "check the path")))
            continue
        configs = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.suffix in _CONFIG_SUFFIXES and not (set(p.parts) & _SKIP))
        if path.is_dir():
            for folder in missing_init_files(path):
                results.append((str(folder), Finding("error", "__init__.py", f"{folder} holds Python modules of a "
                                                     "package but no __init__.py",
                                                     f"create {folder / '__init__.py'} (an empty file is enough)")))
        for config in configs:
            if config.suffix not in _CONFIG_SUFFIXES:
                results.append((str(config), Finding("warning", "path", "not a YAML config", "pass .yaml files")))
                continue
            try:
                cfg = load_config(config)
            except ConfigError as exc:
                results.append((str(config), Finding("error", "config", str(exc), "fix the keys named above")))
                continue
            results += [(str(config), f) for f in check_config(cfg) + _check_coco(cfg)]
    return results


def cli_main(args: argparse.Namespace) -> int:
    """``ratlib doctor``: print findings; exit 1 on errors (and on warnings with ``--strict``)."""
    results = diagnose(list(args.paths))
    errors = sum(f.severity == "error" for _, f in results)
    warnings = sum(f.severity == "warning" for _, f in results)
    if args.json:
        print(json.dumps({"errors": errors, "warnings": warnings,
                          "findings": [{"path": p, **asdict(f)} for p, f in results]}, indent=2))
    else:
        for path, finding in results:
            print(f"{path}: {finding}")
        print(f"{errors} error(s), {warnings} warning(s)")
    return 1 if errors or (args.strict and warnings) else 0
