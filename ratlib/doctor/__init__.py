"""Preflight checks (``ratlib doctor PATH...``): configs, their data paths, package layout, environment.

For each YAML config (a folder is searched): load and validate it, then ``check_config``; without ``--schema``,
with the schema and rules of the example whose ``train.py`` sits beside the config (its ``EXAMPLE``). For each
folder of Python modules under a folder given: a missing ``__init__.py`` where the modules are used
as a package. Then a short environment summary. Errors make the command exit 1 (warnings too with
``--strict``). ``--fix`` appends missing config sections with their defaults (comments and key order
kept, a ``.bak`` written first) and creates missing ``__init__.py`` files.

The package: ``configs``, ``layout`` (``__init__.py`` files), ``report``; the entry points and the environment
summary are here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ratlib.config_defaults import ConfigError, ExperimentConfig
from ratlib.doctor.configs import _check_one, _find_configs, fix_config
from ratlib.doctor.layout import _syntax_errors, missing_init_files
from ratlib.doctor.report import Report, Reported
from ratlib.errors import message

__all__ = ["Report", "Reported", "cli_main", "diagnose", "fix_config", "missing_init_files"]

# ----------------------------------------------------------------------------------------------
# Environment


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _environment(report: Report, device: str | None) -> None:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            n: _version(n) for n in ("torch", "torchvision", "deepspeed", "pycocotools", "pydantic", "PyYAML")
        },
    }
    torch = sys.modules.get("torch")  # imported by device detection; never imported just for this
    if torch is not None:
        env["cuda_available"] = torch.cuda.is_available()
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    from ratlib.launch import DistInitError, detect_launch_env

    try:
        launch = detect_launch_env()
        env["launcher"] = {"name": launch.launcher, "rank": launch.rank, "world_size": launch.world_size}
    except DistInitError as exc:
        env["launcher"] = {"error": str(exc).splitlines()[0]}
        report.add(
            "environment",
            "error",
            "launcher",
            str(exc).splitlines()[0],
            "fix or unset the launcher variables it names (see `ratlib env`)",
        )
    if env["packages"]["torch"] is None:
        report.add("environment", "error", "torch", "torch is not installed", "install PyTorch for your CUDA version")
    env["device"] = device or "auto"
    report.environment = env


# ----------------------------------------------------------------------------------------------
# Entry points


def _load_schema(spec: str | None) -> type[BaseModel]:
    if not spec:
        return ExperimentConfig
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        schema = getattr(importlib.import_module(module_name), attr or "")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            message(
                f"--schema {spec!r}: cannot load it",
                got=f"{type(exc).__name__}: {exc}",
                expected="MODULE:CLASS with MODULE importable from the current folder, e.g. myproj.config:SegConfig",
            )
        ) from None
    finally:
        sys.path.remove(os.getcwd())
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise ConfigError(
            message(
                f"--schema {spec!r} is not a pydantic model class",
                got=repr(schema),
                expected="an ExperimentConfig subclass",
            )
        )
    return schema


def diagnose(
    paths: list[str],
    *,
    world_size: int = 1,
    device: str | None = None,
    device_memory_gib: float | None = None,
    schema: type[BaseModel] = ExperimentConfig,
    fix: bool = False,
) -> Report:
    """Check every config file and folder in ``paths``; with ``fix``, repair what can be repaired
    first (missing sections, missing ``__init__.py``) and report the state after it."""
    report = Report()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            report.add(raw, "error", "path", "does not exist", "check the path (relative to the current folder)")
            continue
        configs = _find_configs(path, schema, report)
        if fix:
            for config, _, _ in configs:
                if str(config) in report.studies:
                    continue  # a study file: --fix adds experiment sections only
                try:
                    report.changes += fix_config(config, schema)
                except (ConfigError, yaml.YAMLError) as exc:  # nothing was written; the check below says more
                    report.add(
                        config,
                        "info",
                        "--fix",
                        f"not fixed: {str(exc).splitlines()[0]}",
                        "fix the errors reported for this file, then run --fix again",
                    )
        if path.is_dir():
            for folder, severity, why in missing_init_files(path):
                if fix:
                    (folder / "__init__.py").touch()
                    report.changes.append(f"{folder}: created __init__.py ({why})")
                    continue
                report.add(
                    folder,
                    severity,
                    "__init__.py",
                    f"Python modules used as a package ({why}) but no __init__.py",
                    f"create {folder / '__init__.py'} (empty is enough), or run with --fix",
                )
            _syntax_errors(path, report)
        for target in configs:
            _check_one(target, report, world_size, device, device_memory_gib)
    if not report.configs:
        report.add(
            ", ".join(paths) or "(no paths)",
            "warning",
            "configs",
            "nothing checked: no config or study file found"
            + (f" (skipped {len(report.skipped)} YAML file(s), each named with the reason)" if report.skipped else ""),
            "give a config file, or a folder that holds one",
        )
    _environment(report, device)
    return report


def _print(report: Report) -> None:
    for change in report.changes:
        print(f"fixed: {change}")
    for reported in report.findings:
        print(reported)
    for path, schema in report.studies.items():
        print(f"study file {path}: validated with the runner's STUDY_SCHEMA ({schema})")
    for path, schema in report.examples.items():
        print(f"config {path}: validated with the EXAMPLE of the train.py beside it ({schema})")
    for path in report.skipped:
        print(f"skipped {path}: {report.skipped_why.get(path, 'not a config')}")
    env = report.environment
    packages = ", ".join(f"{k} {v or 'not installed'}" for k, v in env["packages"].items())
    gpus = f", GPUs: {', '.join(env['gpus']) or 'none'}" if "gpus" in env else ""
    launcher = env["launcher"]
    where = launcher.get("error") or f"{launcher['name']} (rank {launcher['rank']} of {launcher['world_size']})"
    print(f"environment: python {env['python']}, {packages}{gpus}; launcher: {where}")
    print(
        f"checked {len(report.configs)} config(s)"
        + (f", skipped {len(report.skipped)} other YAML file(s)" if report.skipped else "")
        + f": {report.count('error')} error(s), {report.count('warning')} warning(s), {report.count('info')} info"
    )


def cli_main(args: argparse.Namespace) -> int:
    """``ratlib doctor``: print findings; exit 1 on errors (and on warnings with ``--strict``), 2 on bad arguments."""
    device = None if getattr(args, "device", "auto") == "auto" else args.device
    try:
        schema = _load_schema(getattr(args, "schema", None))
    except ConfigError as exc:
        print(f"ratlib doctor: {exc}", file=sys.stderr)
        return 2
    report = diagnose(
        list(args.paths),
        world_size=getattr(args, "world_size", 1),
        device=device,
        device_memory_gib=getattr(args, "gpu_memory", None),
        schema=schema,
        fix=getattr(args, "fix", False),
    )
    errors, warnings = report.count("error"), report.count("warning")
    if args.json:
        print(
            json.dumps(
                {
                    "errors": errors,
                    "warnings": warnings,
                    "findings": [{"path": r.path, "line": r.line, **asdict(r.finding)} for r in report.findings],
                    "configs": report.configs,
                    "skipped": report.skipped,
                    "skipped_why": report.skipped_why,
                    "studies": report.studies,
                    "examples": report.examples,
                    "changes": report.changes,
                    "environment": report.environment,
                },
                indent=2,
            )
        )
    else:
        _print(report)
    return 1 if errors or (args.strict and warnings) else 0
