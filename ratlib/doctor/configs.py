"""Configs: find them (a folder is searched), pick the schema each is validated with (``--schema``, a study
file's runner, an example's ``train.py`` beside it), validate, run ``check_config``; ``--fix`` adds missing
sections.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ratlib.config_defaults import ConfigError, ExperimentConfig, ModelConfig, check_config, load_config
from ratlib.config_defaults.checks import Check
from ratlib.config_defaults.load import _Dumper, _key_lines
from ratlib.doctor.layout import _walk
from ratlib.doctor.report import Report, Reported
from ratlib.errors import message
from ratlib.io import write_atomic

_CONFIG_SUFFIXES = (".yaml", ".yml")

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


def _import_by_path(py: Path) -> Any:
    """Run ``py`` as a module, with its folder on ``sys.path`` (as when it is run as a script, so the helper
    file beside it imports). Doctor imports no example statically: examples sit above the library."""
    name = f"_ratlib_doctor_{py.stem}"
    spec = importlib.util.spec_from_file_location(name, py)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the module's annotations through sys.modules
    sys.path.insert(0, str(py.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(py.parent))
    return module


def _schema_name(schema: type[BaseModel]) -> str:
    return f"{schema.__module__.removeprefix('_ratlib_doctor_')}.{schema.__name__}"


_STUDY_SCHEMAS: dict[Path, type[BaseModel] | str] = {}


def _study_schema(path: Path) -> type[BaseModel] | str:
    """The schema of a study file: ``STUDY_SCHEMA`` of the Python file beside it that defines it at module
    level (found by parsing, then imported by path), or the reason there is none."""
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
        try:
            schema = _import_by_path(py).STUDY_SCHEMA
        except Exception as exc:  # the runner's own import failed: say which and why, do not crash
            found = f"a study file; importing {py} for its STUDY_SCHEMA failed ({type(exc).__name__}: {exc})"
        else:
            ok = isinstance(schema, type) and issubclass(schema, BaseModel)
            found = schema if ok else f"a study file; {py} defines STUDY_SCHEMA = {schema!r}, not a pydantic model"
        break
    _STUDY_SCHEMAS[folder] = found
    return found


_EXAMPLES: dict[Path, dict[str, Any] | str | None] = {}


def _example(path: Path) -> dict[str, Any] | str | None:
    """The ``EXAMPLE`` dict (``schema``, ``checks``, ...) of the ``train.py`` beside a config: None when there is
    no such file or it defines no ``EXAMPLE`` (found by parsing), the reason when it cannot be used."""
    py = path.resolve().parent / "train.py"
    if py.parent in _EXAMPLES:
        return _EXAMPLES[py.parent]
    found: dict[str, Any] | str | None = None
    try:
        defined = _defines(ast.parse(py.read_text(encoding="utf-8")), "EXAMPLE")
    except (SyntaxError, OSError, UnicodeDecodeError):
        defined = False
    if defined:
        try:
            example = _import_by_path(py).EXAMPLE
        except Exception as exc:  # torch missing, the example's own bug: say so, validate without it
            found = f"importing {py} for its EXAMPLE failed ({type(exc).__name__}: {str(exc)[:200]})"
        else:
            schema = example.get("schema") if isinstance(example, dict) else None
            ok = isinstance(schema, type) and issubclass(schema, BaseModel)
            found = example if ok else f"{py} defines EXAMPLE without a pydantic model class under 'schema'"
    _EXAMPLES[py.parent] = found
    return found


#: (config file, the schema to validate it with, extra rules for check_config)
Target = tuple[Path, type[BaseModel], tuple[Check, ...]]


def _find_configs(path: Path, schema: type[BaseModel], report: Report) -> list[Target]:
    """(file, schema, rules) for the configs and study files at ``path``: without ``--schema`` (``schema`` is
    ``ExperimentConfig``) a config is validated with the ``EXAMPLE`` of a ``train.py`` beside it, where there is
    one. The YAML files left out go to ``report.skipped`` with the reason."""
    if path.is_file():
        candidates = [path]
    else:
        candidates = [
            folder / name
            for folder, files in _walk(path)
            for name in files
            if name.endswith(_CONFIG_SUFFIXES) and not name.endswith(".bak")
        ]
    found: list[Target] = []
    for candidate in candidates:
        data = _read(candidate)
        if _is_ablation_study(data):
            study = _study_schema(candidate)
            if isinstance(study, str):
                report.skip(candidate, study)
            else:
                found.append((candidate, study, ()))
                report.studies[str(candidate)] = _schema_name(study)
        elif path.is_file() or _looks_like_config(data, schema):
            found.append(_with_example(candidate, schema, report))
        else:
            report.skip(candidate, f"no top-level key of {schema.__name__} ({', '.join(schema.model_fields)})")
    return found


def _with_example(config: Path, schema: type[BaseModel], report: Report) -> Target:
    example = _example(config) if schema is ExperimentConfig else None
    if isinstance(example, str):
        report.add(config, "info", "schema", f"{example}; validated with ExperimentConfig", _NO_SCHEMA_FIX)
        return config, schema, ()
    if example is None:
        return config, schema, ()
    report.examples[str(config)] = _schema_name(example["schema"])
    return config, example["schema"], tuple(example.get("checks") or ())


_NO_SCHEMA_FIX = "pass --schema MODULE:CLASS, or define EXAMPLE = {'schema': ...} in a train.py beside the config"


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


def _check_one(target: Target, report: Report, world_size: int, device: str | None, memory: float | None) -> None:
    """Validate one file with its schema; then ``check_config`` (with its rules) for experiment configs."""
    path, schema, checks = target
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
    if type(cfg.model) is ModelConfig and cfg.model.model_extra:  # passed through: no schema knows its keys
        keys = ", ".join(sorted(cfg.model.model_extra))
        report.add(path, "info", "model", f"not checked ({keys}): no schema for this config's model", _NO_SCHEMA_FIX)
    for finding in check_config(cfg, world_size, device=device, device_memory_gib=memory, checks=checks):
        report.findings.append(Reported(str(path), lines.get(tuple(finding.key.split("."))), finding))
