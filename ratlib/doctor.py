"""Preflight checks (``ratlib doctor PATH...``): configs, their data paths, package layout, environment.

For each YAML config (a folder is searched): load and validate it, then ``check_config``. For each
folder of Python modules under a folder given: a missing ``__init__.py`` where the modules are used
as a package. Then a short environment summary. Errors make the command exit 1 (warnings too with
``--strict``). ``--fix`` appends missing config sections with their defaults (comments and key order
kept, a ``.bak`` written first) and creates missing ``__init__.py`` files.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from ratlib.config_defaults import ConfigError, ExperimentConfig, Finding, check_config, load_config
from ratlib.config_defaults.load import _Dumper, _key_lines
from ratlib.errors import message
from ratlib.io import write_atomic

__all__ = ["Report", "Reported", "cli_main", "diagnose", "missing_init_files"]

_Severity = Literal["error", "warning", "info"]  # Finding.severity
_SKIP = {
    ".git",
    ".venv",
    "venv",
    "env",
    "__pycache__",
    "node_modules",
    ".tox",
    ".nox",
    "build",
    "dist",
    "site-packages",
    ".eggs",
}
_CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Reported:
    """A finding with the file (and line, when known) it is about."""

    path: str
    line: int | None
    finding: Finding

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.finding}"


@dataclass
class Report:
    """What ``diagnose`` found, changed (with ``fix``) and saw of the environment."""

    findings: list[Reported] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    skipped_why: dict[str, str] = field(default_factory=dict)
    studies: dict[str, str] = field(default_factory=dict)  # study file -> the schema it was validated with
    changes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def count(self, severity: str) -> int:
        """How many findings have this severity (``"error"``, ``"warning"``, ``"info"``)."""
        return sum(r.finding.severity == severity for r in self.findings)

    def add(
        self, path: Path | str, severity: _Severity, key: str, message: str, advice: str, line: int | None = None
    ) -> None:
        """Record a finding about ``path`` (and its ``line``, where known)."""
        finding = Finding(severity, key, message, advice)
        self.findings.append(Reported(str(path), line, finding))

    def skip(self, path: Path | str, why: str) -> None:
        """Record a file that was not checked, and why (the report names every one)."""
        self.skipped.append(str(path))
        self.skipped_why[str(path)] = why


# ----------------------------------------------------------------------------------------------
# Package layout


def _walk(root: Path) -> list[tuple[Path, list[str]]]:
    """(folder, file names) under root, skipping hidden folders, virtual environments and build output."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _SKIP and not d.startswith(".") and not (Path(folder, d) / "pyvenv.cfg").exists()
        )
        out.append((Path(folder), sorted(files)))
    return out


def _imports(path: Path) -> tuple[list[tuple[str, int]], bool, str | None]:
    """(absolute module names imported with their lines, uses relative imports, syntax error or None)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), filename=str(path))
    except SyntaxError as exc:
        return [], False, f"line {exc.lineno}: {exc.msg}"
    names: list[tuple[str, int]] = []
    relative = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative = True
            elif node.module:
                names.append((node.module, node.lineno))
                names += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return names, relative, None


def missing_init_files(root: Path) -> list[tuple[Path, _Severity, str]]:
    """Folders of Python modules used as a package but lacking ``__init__.py``, as
    ``(folder, severity, why)``: inside a package (the parent has one) or holding modules with
    relative imports (errors: ``setuptools.find_packages`` leaves them out, ``from . import`` fails
    when run as a script); or imported by dotted name from another file (a warning: it works only
    as an implicit namespace package, which packaging tools and type checkers skip)."""
    root = Path(root)
    tree = _walk(root)
    modules = {folder: [f for f in files if f.endswith(".py")] for folder, files in tree}
    has_init = {folder for folder, files in tree if "__init__.py" in files}
    found: dict[Path, tuple[_Severity, str]] = {}
    for folder, py in modules.items():
        if not py or folder in has_init or folder == root:
            continue
        if folder.parent in has_init:
            found[folder] = ("error", f"it sits inside the package {folder.parent.name!r}")
            continue
        relative = [f for f in py if _imports(folder / f)[1]]
        if relative:
            found[folder] = ("error", f"{relative[0]} uses a relative import ('from . import ...')")
    for folder, py in modules.items():
        for name in py:
            imported, _, _ = _imports(folder / name)
            for module, line in imported:
                parts = module.split(".")
                for base in [folder, *folder.parents]:
                    for depth in range(1, len(parts)):
                        candidate = base.joinpath(*parts[:depth])
                        if (
                            candidate in modules
                            and candidate not in has_init
                            and candidate not in found
                            and (
                                candidate.joinpath(*parts[depth : depth + 1]).with_suffix(".py").exists()
                                or candidate.joinpath(parts[depth]).is_dir()
                            )
                        ):
                            rel = (folder / name).relative_to(root)
                            found[candidate] = (
                                "warning",
                                f"{rel} line {line} imports it as {'.'.join(parts[: depth + 1])!r}",
                            )
                    if base == root:
                        break
    return sorted((folder, sev, why) for folder, (sev, why) in found.items())


def _syntax_errors(root: Path, report: Report) -> None:
    for folder, files in _walk(root):
        for name in files:
            if name.endswith(".py"):
                error = _imports(folder / name)[2]
                if error:
                    report.add(
                        folder / name,
                        "warning",
                        "python",
                        f"cannot be parsed ({error})",
                        "fix the syntax; the package checks skipped this file",
                    )


# ----------------------------------------------------------------------------------------------
# Configs


def _is_ablation_study(data: Any) -> bool:
    """A study file (examples/ablation: a ``base`` example and a ``grid`` or ``variants``) is not an
    experiment config: it is validated with the study schema of its runner (``_study_schema``)."""
    return isinstance(data, dict) and "base" in data and ("grid" in data or "variants" in data)


def _read(path: Path) -> Any:
    """The YAML data of a file, or ``_BROKEN`` when it cannot be read or parsed (load_config says why)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return _BROKEN


_BROKEN = object()


def _looks_like_config(data: Any, schema: type[BaseModel]) -> bool:
    """A YAML file whose top level has a key of the schema (or one close to it): CI files,
    docker-compose and the like are left alone when a folder is searched."""
    if data is _BROKEN:
        return True  # broken YAML: let load_config report where
    if not isinstance(data, dict):
        return False
    known = list(schema.model_fields)
    return any(str(k) in known or difflib.get_close_matches(str(k), known, n=1, cutoff=0.75) for k in data)


def _defines(tree: ast.Module, name: str) -> bool:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


_STUDY_SCHEMAS: dict[Path, type[BaseModel] | str] = {}


def _study_schema(path: Path) -> type[BaseModel] | str:
    """The schema of a study file: ``STUDY_SCHEMA`` of the Python file beside it that defines it at module
    level (found by parsing, then imported by path with its folder on ``sys.path``, as the runner runs),
    or the reason there is none. Doctor imports no example statically: examples sit above the library."""
    folder = path.resolve().parent
    if folder in _STUDY_SCHEMAS:
        return _STUDY_SCHEMAS[folder]
    found: type[BaseModel] | str = (
        "a study file (top-level 'base' and 'grid' or 'variants'), and no Python file beside it defines "
        "STUDY_SCHEMA; validate it with its runner's --dry-run, or define STUDY_SCHEMA in the runner"
    )
    for py in sorted(folder.glob("*.py")):
        try:
            if not _defines(ast.parse(py.read_text(encoding="utf-8")), "STUDY_SCHEMA"):
                continue
        except (SyntaxError, OSError, UnicodeDecodeError):
            continue
        name = f"_ratlib_doctor_{py.stem}"
        spec = importlib.util.spec_from_file_location(name, py)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pydantic resolves the module's annotations through sys.modules
        sys.path.insert(0, str(folder))
        try:
            spec.loader.exec_module(module)
            schema = module.STUDY_SCHEMA
        except Exception as exc:  # the runner's own import failed: say which and why, do not crash
            found = f"a study file; importing {py} for its STUDY_SCHEMA failed ({type(exc).__name__}: {exc})"
        else:
            ok = isinstance(schema, type) and issubclass(schema, BaseModel)
            found = schema if ok else f"a study file; {py} defines STUDY_SCHEMA = {schema!r}, not a pydantic model"
        finally:
            sys.path.remove(str(folder))
        break
    _STUDY_SCHEMAS[folder] = found
    return found


def _find_configs(path: Path, schema: type[BaseModel], report: Report) -> list[tuple[Path, type[BaseModel]]]:
    """(file, schema to validate it with) for the configs and study files at ``path``; the YAML files
    left out go to ``report.skipped`` with the reason."""
    if path.is_file():
        candidates = [path]
    else:
        candidates = [
            folder / name
            for folder, files in _walk(path)
            for name in files
            if name.endswith(_CONFIG_SUFFIXES) and not name.endswith(".bak")
        ]
    found = []
    for candidate in candidates:
        data = _read(candidate)
        if _is_ablation_study(data):
            study = _study_schema(candidate)
            if isinstance(study, str):
                report.skip(candidate, study)
            else:
                found.append((candidate, study))
                report.studies[str(candidate)] = f"{study.__module__.removeprefix('_ratlib_doctor_')}.{study.__name__}"
        elif path.is_file() or _looks_like_config(data, schema):
            found.append((candidate, schema))
        else:
            report.skip(candidate, f"no top-level key of {schema.__name__} ({', '.join(schema.model_fields)})")
    return found


def _indent(text: str) -> int:
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if stripped and not stripped.startswith("#") and line != stripped:
            return len(line) - len(stripped)
    return 2


def _section_model(annotation_default: Any) -> type[BaseModel] | None:
    """The model of a schema field whose default is a section with keys (training, optimizer, ...)."""
    if isinstance(annotation_default, BaseModel) and type(annotation_default).model_fields:
        return type(annotation_default)
    return None


def _last_line(node: yaml.Node) -> int:
    """The 0-based index of the last text line that belongs to ``node`` (comments after it excluded)."""
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        return _last_line(last[1] if isinstance(node, yaml.MappingNode) else last)
    end = node.end_mark
    return end.line - 1 if end.column == 0 and end.line > node.start_mark.line else end.line


def _nested_missing(
    node: yaml.MappingNode, data: dict[str, Any], model: BaseModel, prefix: str
) -> list[tuple[int, int, str, dict[str, Any]]]:
    """Sections missing inside the block mappings the user wrote (``training:`` without ``optimizer:``):
    (insert after this line, at this column, dotted name, defaults), deepest first per section."""
    found = []
    for key_node, value_node in node.value:
        name = key_node.value
        field = type(model).model_fields.get(name)
        sub = _section_model(field.default) if field is not None else None
        if field is None or sub is None or not isinstance(value_node, yaml.MappingNode) or value_node.flow_style:
            continue  # not a section, or `training: {...}` in flow style: left alone
        value = data.get(name)
        given: dict[str, Any] = value if isinstance(value, dict) else {}
        found += _nested_missing(value_node, given, field.default, f"{prefix}{name}.")
        column = value_node.value[0][0].start_mark.column
        for sub_name, sub_field in sub.model_fields.items():
            if sub_name not in given and _section_model(sub_field.default) is not None:
                found.append(
                    (
                        _last_line(value_node),
                        column,
                        f"{prefix}{name}.{sub_name}",
                        {sub_name: sub_field.default.model_dump(mode="json")},
                    )
                )
    return found


def fix_config(path: Path, schema: type[BaseModel] = ExperimentConfig) -> list[str]:
    """Add the schema's missing sections (those with keys) with their defaults to a YAML config: top-level
    ones appended at the end, nested ones (``training.optimizer``) at the end of the section the user
    wrote. Everything already there stays, comments and key order included; ``PATH.bak`` first. The
    result must load to the same config as before, or the file is restored. Returns what changed."""
    text = path.read_text(encoding="utf-8")
    root = yaml.compose(text)
    if root is not None and (not isinstance(root, yaml.MappingNode) or root.flow_style):
        raise ConfigError(
            message(
                f"{path}: the top level is not a block mapping; --fix only appends sections to block-style configs",
                fix="write the config in block style ('training:' on its own line)",
            )
        )
    data = yaml.safe_load(text) or {}
    missing = [
        name
        for name, info in schema.model_fields.items()
        if name not in data and _section_model(info.default) is not None
    ]
    nested = _nested_missing(root, data, schema.model_construct(), "") if root is not None else []
    if not missing and not nested:
        return []
    before = load_config(path, schema=schema)
    indent = _indent(text)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    # bottom up, so earlier line numbers stay valid; at one line in reverse, so they end up in schema order
    for after, column, dotted, defaults in [
        nested[i] for i in sorted(range(len(nested)), key=lambda i: (nested[i][0], i), reverse=True)
    ]:
        pad = " " * column
        block = yaml.dump(defaults, Dumper=_Dumper, sort_keys=False, indent=indent)
        lines[after + 1 : after + 1] = [
            f"{pad}# Added by `ratlib doctor --fix`: the defaults of {dotted}.\n",
            *(f"{pad}{line}\n" for line in block.splitlines()),
        ]
    new = "".join(lines)
    if missing:
        block = yaml.dump(
            {name: schema.model_fields[name].default.model_dump(mode="json") for name in missing},
            Dumper=_Dumper,
            sort_keys=False,
            indent=indent,
        )
        new += f"\n# Added by `ratlib doctor --fix`: the defaults of {', '.join(missing)}.\n" + block
    backup = path.with_name(path.name + ".bak")
    shutil.copy2(path, backup)
    write_atomic(path, new)
    try:
        reloaded = load_config(path, schema=schema)
    except ConfigError:
        shutil.copy2(backup, path)
        raise
    if reloaded != before:
        shutil.copy2(backup, path)
        raise ConfigError(
            message(f"{path}: --fix would change the loaded config, so the file was restored from {backup}")
        )
    added = [*missing, *sorted(dotted for _, _, dotted, _ in nested)]
    return [f"{path}: added section(s) {', '.join(added)} with their defaults (backup: {backup})"]


def _check_one(
    path: Path, report: Report, schema: type[BaseModel], world_size: int, device: str | None, memory: float | None
) -> None:
    """Validate one file with ``schema``; then ``check_config`` for experiment configs (not study files)."""
    report.configs.append(str(path))
    try:
        lines = _key_lines(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        lines = {}
    try:
        cfg = load_config(path, schema=schema)
    except ConfigError as exc:
        if not exc.problems:  # the file itself: missing, unreadable, not YAML
            report.add(path, "error", "config", str(exc), "fix the file; see the position above")
        for key, message in exc.problems:
            report.add(
                path,
                "error",
                key,
                message,
                "fix or delete the key (deleted keys take their defaults)",
                lines.get(tuple(key.split("."))),
            )
        return
    if not isinstance(cfg, ExperimentConfig):
        return
    for finding in check_config(cfg, world_size, device=device, device_memory_gib=memory):
        report.findings.append(Reported(str(path), lines.get(tuple(finding.key.split("."))), finding))


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
            for config, own in configs:
                if own is not schema:
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
        for config, own in configs:
            _check_one(config, report, own, world_size, device, device_memory_gib)
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
                    "changes": report.changes,
                    "environment": report.environment,
                },
                indent=2,
            )
        )
    else:
        _print(report)
    return 1 if errors or (args.strict and warnings) else 0
