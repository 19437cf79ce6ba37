"""Loading configs: YAML with line numbers, ``key=value`` overrides, messages, ``load_config`` and ``dump_config``.

``load_config("exp.yaml", overrides=["training.optimizer.lr=3e-4"])`` merges the file over complete
defaults, reads ``1e-4`` as a float (YAML 1.1 would hand over the string "1e-4"), and rejects wrong
types, out-of-range values and unknown keys in known sections, all of them in one ``ConfigError`` that
names each key path, where it came from (file line or override), the value, what was expected and the
closest known key (what the schema says about a key is read in ``describe``). ``dump_config`` writes a config
that loads back to the same values: every string the loader would read as something else (``"1e5"``, ``"yes"``,
``"null"``, ``"2024-01-01"``) is quoted.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

import yaml
from pydantic import BaseModel, ValidationError

from ratlib.config_defaults.describe import (
    _ALIASES,
    _clean_loc,
    _expected_at,
    _field_at,
    _model_of,
    _suggest,
)
from ratlib.config_defaults.schema import SMOKE_DEFAULTS, ConfigError, ExperimentConfig
from ratlib.errors import message
from ratlib.io import write_atomic

__all__ = ["dump_config", "load_config"]

C = TypeVar("C", bound=BaseModel)


# ----------------------------------------------------------------------------------------------
# YAML


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes: ``1e-4``, ``1E-4`` and ``5e3`` are floats (as in YAML 1.2;
    YAML 1.1 makes them strings), and a key given twice in one mapping is an error (PyYAML keeps
    the last one silently)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if key_node.value in seen:
                    raise _DuplicateKeyError(
                        None,
                        None,
                        f"key {key_node.value!r} is given twice (first on line {seen[key_node.value]}); "
                        "keep one of them",
                        key_node.start_mark,
                    )
                seen[key_node.value] = key_node.start_mark.line + 1
        # Other nodes too: PyYAML's own check raises "expected a mapping node" for them.
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]  # stubs: MappingNode only


_FLOAT = r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
|[-+]?\.(?:inf|Inf|INF)
|\.(?:nan|NaN|NAN))$"""
_Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT, re.X), list("-+0123456789."))


# Strings that some YAML reader (1.1 or 1.2, any case) takes for a bool or null, beyond what _Loader resolves.
_KEYWORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "nan", "inf", "infinity"}


def _ambiguous(text: str) -> bool:
    """Whether a plain (unquoted) ``text`` could be read back as anything but this string: by ``_Loader``
    (bools, null, ints, floats, timestamps, ...), or by a YAML 1.2 reader or Python (``0o17``, ``1_000``,
    ``+.5``, ``.NaN``, ``Y``, ``tRuE``)."""
    table = _Loader.yaml_implicit_resolvers
    if any(regexp.match(text) for _, regexp in [*table.get(text[:1], []), *table.get(None, [])]):
        return True  # what BaseResolver.resolve does for a plain scalar
    stripped = text.strip()
    if stripped.lower().lstrip("+-.") in _KEYWORDS or stripped.lower() in _KEYWORDS:
        return True
    for parse in (float, lambda v: int(v, 0)):
        try:
            parse(stripped)
            return True
        except ValueError:
            pass
    return False


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes lists in flow style (``betas: [0.9, 0.999]``), as people write them, and
    quotes every string that would not load back as the same string (``"1e5"``, ``"yes"``, ``"null"``)."""


# The emitter decides "plain or quoted" by the dumper's resolvers: give it the loader's.
_Dumper.yaml_implicit_resolvers = copy.deepcopy(_Loader.yaml_implicit_resolvers)
_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)
_Dumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="'" if _ambiguous(value) else None
    ),
)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every key path in a YAML document (block or flow style)."""
    out: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    path = (*prefix, key.value)
                    out.setdefault(path, key.start_mark.line + 1)
                    walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out.setdefault((*prefix, str(i)), item.start_mark.line + 1)
                walk(item, (*prefix, str(i)))

    root = yaml.compose(text, Loader=_Loader)
    if root is not None:
        walk(root, ())
    return out


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            message(
                f"{path}: config file not found", got=f"relative paths start at {os.getcwd()}", fix="check the path"
            )
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            message(f"{path}: cannot read the config", got=str(exc), fix="pass a UTF-8 YAML file")
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)
        lines = _key_lines(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        fix = (
            None
            if isinstance(exc, _DuplicateKeyError)
            else "fix the syntax there (indentation, a ':' after each key, closing brackets and quotes)"
        )
        raise ConfigError(message(f"{where}: invalid YAML: {what}", fix=fix)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(message(f"{path}: invalid YAML", got=str(exc))) from None
    if data is None:
        return {}, lines
    if not isinstance(data, dict):
        raise ConfigError(
            message(
                f"{path}: the top level is a {type(data).__name__}",
                got=repr(str(data)[:40]),
                expected="a mapping of sections such as 'training: {batch_size: 32}'",
            )
        )
    return data, lines


def _parse_override(item: Any) -> tuple[tuple[str, ...], Any]:
    """``"training.optimizer.lr=3e-4"`` -> (("training", "optimizer", "lr"), 0.0003); values are YAML."""
    if not isinstance(item, str):
        raise ConfigError(message(f"override {item!r} is not a string", expected="a 'dotted.key=value' string"))
    key, sep, raw = item.partition("=")
    keys = tuple(part.strip() for part in key.strip().split("."))
    if not sep or not all(keys):
        raise ConfigError(
            message(f"override {item!r}: expected dotted.key=value", fix="write it as e.g. training.optimizer.lr=3e-4")
        )
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(
            message(
                f"override {item!r}: the value {raw!r} is not valid YAML",
                got=str(problem),
                fix=f"quote it, e.g. {key}='\"{raw}\"'",
            )
        ) from None
    return keys, value


def _set(data: dict[str, Any], keys: tuple[str, ...], value: Any, item: str) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            path = ".".join(keys[: i + 1])
            raise ConfigError(
                message(
                    f"override {item!r}: {path} is {child!r}, not a section", fix=f"set it whole instead ({path}=...)"
                )
            )
        node = child
    node[keys[-1]] = value


# ----------------------------------------------------------------------------------------------
# Loading


_MISSING = object()


def _value_at(data: Any, loc: tuple[str, ...]) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, (list, tuple)) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return _MISSING
    return data


def _fill_empty_sections(data: dict[str, Any], model: type[BaseModel]) -> None:
    """``training:`` with nothing under it (YAML null) means an empty section: all defaults."""
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is None or name not in data:
            continue
        plain = sub is field.annotation  # ``Section``, not ``Section | None`` (a variable: no narrowing of sub)
        if data[name] is None and plain:
            data[name] = {}
        if isinstance(data[name], dict):
            _fill_empty_sections(data[name], sub)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"))


def _smoke_over_file(data: dict[str, Any], override_at: Mapping[tuple[str, ...], str]) -> dict[str, Any]:
    """``smoke=true`` given as an override wins over the file (or dict) for the keys it fills: those keys
    are removed here unless an override sets them too; returns the file values removed, by path."""
    if ("smoke",) not in override_at or not _truthy(data.get("smoke")):
        return {}
    removed = {}
    for path in SMOKE_DEFAULTS:
        keys = tuple(path.split("."))
        section = data.get(keys[0])
        if keys not in override_at and isinstance(section, dict) and keys[1] in section:
            removed[path] = section.pop(keys[1])
    return removed


def _apply_smoke(data: dict[str, Any]) -> list[str]:
    """``smoke: true``: fill the ``SMOKE_DEFAULTS`` keys not set; returns their paths."""
    if not _truthy(data.get("smoke")):
        return []
    filled = []
    for path, value in SMOKE_DEFAULTS.items():
        section_name, key = path.split(".")
        section = data.get(section_name)
        if section is None:
            section = data[section_name] = {}
        if isinstance(section, dict) and key not in section:
            section[key] = value
            filled.append(path)
    return filled


def _section_problems(data: dict[str, Any], schema: type[BaseModel]) -> list[tuple[tuple[str, ...], str]]:
    """Top-level keys the schema does not know: a typo of a known key, or a non-mapping, is a problem;
    other mappings are project sections and pass through."""
    if schema.model_config.get("extra") == "forbid":
        return []  # pydantic reports them itself
    known = list(schema.model_fields)
    problems: list[tuple[tuple[str, ...], str]] = []
    for key, value in data.items():
        if key in known:
            continue
        alias = _ALIASES.get(str(key).lower())
        close = [alias] if alias in known else difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        if close:
            problems.append(((str(key),), f"unknown section; did you mean {close[0]!r}?"))
        elif not isinstance(value, dict):
            hint = _suggest(schema, (str(key),))
            problems.append(
                (
                    (str(key),),
                    f"unknown top-level key with value {value!r}; "
                    + (
                        hint
                        if hint.startswith("did you")
                        else f"top-level keys are {', '.join(known)}, or project sections (mappings)"
                    ),
                )
            )
    return problems


def _validator_message(msg: str) -> str:
    """A validator's own words, without pydantic's "Value error, " / "Assertion failed, " prefix."""
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


# the error types of ratlib's own cross-field rules (schema.py)
_CROSS = frozenset(
    {"min_lr_not_below_lr", "accumulation_with_global_batch", "deepspeed_with_global_batch", "strategy_conflict"}
)


def _feeds(bad: tuple[str, ...], key: tuple[str, ...]) -> bool:
    """Whether a bad key is ``key``, a section above it or an item below it."""
    n = min(len(bad), len(key))
    return bad[:n] == key[:n]


def _cross_field(err: Any, loc: tuple[str, ...], schema: type[BaseModel], bad: set[tuple[str, ...]]) -> bool:
    """A model validator's error (a rule over several keys) that no bad key of the first round feeds:
    ratlib's rules name the keys they read; a project's model validator reads its whole section."""
    if err["type"] in _CROSS:
        used = [(*loc, *key.split(".")) for key in err["ctx"]["uses"].split()]
        return not any(_feeds(b, key) for b in bad for key in used)
    if err["type"] not in ("value_error", "assertion_error"):
        return False
    field = _field_at(schema, loc)
    section = not loc or (field is not None and _model_of(field.annotation) is not None)
    return section and not any(b[: len(loc)] == loc for b in bad)


def _without(data: dict[str, Any], locs: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """A copy of ``data`` with the keys at ``locs`` removed (so they take their defaults)."""
    out = copy.deepcopy(data)
    for loc in locs:
        node: Any = out
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and loc:
            node.pop(loc[-1], None)
    return out


def _second_round(
    schema: type[BaseModel], data: dict[str, Any], first: list[tuple[tuple[str, ...], str]]
) -> list[tuple[tuple[str, ...], str]]:
    """Cross-field errors that pydantic did not reach because a field failed (a model validator runs only
    when every field of its model is valid): validate again with the bad keys at their defaults, and keep
    the cross-field errors that none of the bad keys feeds."""
    bad = {loc for loc, _ in first}
    fields = {loc[: next((i for i, p in enumerate(loc) if p.isdigit()), len(loc))] for loc in bad}  # betas.1 -> betas
    trimmed = _without(data, sorted(fields, key=len, reverse=True))
    try:
        schema.model_validate(trimmed)
    except ValidationError as exc:
        return [(loc, msg) for loc, msg in _validation_problems(exc, schema, trimmed, bad=bad) if loc not in bad]
    return []


def _validation_problems(
    exc: ValidationError,
    schema: type[BaseModel],
    data: dict[str, Any],
    *,
    bad: set[tuple[str, ...]] | None = None,
) -> list[tuple[tuple[str, ...], str]]:
    """One message per key path. With ``bad`` (a second round), only the cross-field errors that none
    of the ``bad`` keys feeds."""
    grouped: dict[tuple[str, ...], list[Any]] = {}
    for err in exc.errors(include_url=False):
        loc = _clean_loc(schema, tuple(err["loc"]))
        if bad is not None and not _cross_field(err, loc, schema, bad):
            continue
        if err["type"] in _CROSS:
            loc = (*loc, *err["ctx"]["key"].split("."))
        elif err["type"] == "missing" and loc and loc[-1].isdigit():
            loc = loc[:-1]  # a list too short for a tuple field: the field is wrong, not an item
        grouped.setdefault(loc, []).append(err)
    problems = []
    for loc, errs in grouped.items():
        types_ = {e["type"] for e in errs}
        value = _value_at(data, loc)
        if "extra_forbidden" in types_:
            problems.append((loc, f"unknown key; {_suggest(schema, loc)}"))
            continue
        expected = _expected_at(schema, loc)
        custom = [e["msg"] for e in errs if e["type"] in _CROSS]
        # A project's own validators (ValueError / assert in a field or model validator) say what is wrong
        # in their own words: show those, never replace them with the field's type.
        own = list(
            dict.fromkeys(_validator_message(e["msg"]) for e in errs if e["type"] in ("value_error", "assertion_error"))
        )
        if custom:
            message = custom[0]
        elif own:
            message = "; ".join(own) + ("" if value is _MISSING else f" (got {value!r})")
        elif "missing" in types_ and value is _MISSING:
            message = "required key is missing; add it" + (f" ({expected})" if expected else "")
        elif expected is not None:
            message = f"got {value!r}; expected {expected}"
            if isinstance(value, bool) and "true" not in expected:
                message += (
                    " (YAML reads yes/no/on/off/true/false as booleans: quote the value if you meant text)"
                    if "a string" in expected
                    else " (a boolean is not a number)"
                )
        else:
            message = "; ".join(dict.fromkeys(e["msg"] for e in errs)) + (
                "" if value is _MISSING else f" (got {value!r})"
            )
        problems.append((loc, message))
    return problems


def _error(
    name: str,
    problems: list[tuple[tuple[str, ...], str]],
    lines: Mapping[tuple[str, ...], int],
    overrides: Mapping[tuple[str, ...], str],
) -> ConfigError:
    def where(loc: tuple[str, ...]) -> tuple[float, str]:
        # The value came from an override that set this key or a section above it; a key the file has
        # comes from the file; a key only an override wrote (a typo such as training.optimzer.lr=1 is
        # reported at training.optimzer) comes from that override; else the nearest section in the file.
        for n in range(len(loc), 0, -1):
            if loc[:n] in overrides:
                return math.inf, f" (override {overrides[loc[:n]]!r})"
        if loc in lines:
            return lines[loc], f" (line {lines[loc]})"
        below = [item for keys, item in overrides.items() if keys[: len(loc)] == loc]
        if below:
            return math.inf, f" (override {below[0]!r})"
        for n in range(len(loc) - 1, 0, -1):
            if loc[:n] in lines:
                return lines[loc[:n]], f" (line {lines[loc[:n]]})"
        return math.inf, ""

    rows = sorted(((where(loc), ".".join(loc), msg) for loc, msg in problems), key=lambda r: (r[0][0], r[1]))
    text = [f"invalid config {name}: {len(rows)} problem{'s' if len(rows) > 1 else ''}"]
    text += [f"  {path}{at}: {msg}" for (_, at), path, msg in rows]
    text.append("Fix these keys, or delete them to take the defaults (every key and default: docs/config_defaults.md).")
    return ConfigError("\n".join(text), [(path, msg) for _, path, msg in rows])


def _leaf_defaults(model: BaseModel, given: Any, prefix: str = "") -> list[str]:
    """Key paths of ``model`` that ``given`` (the user's dict) did not set."""
    out: list[str] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        sub = given.get(name, _MISSING) if isinstance(given, Mapping) else _MISSING
        if isinstance(value, BaseModel) and type(value).model_fields:
            out += _leaf_defaults(value, sub if isinstance(sub, Mapping) else {}, f"{prefix}{name}.")
        elif sub is _MISSING:
            out.append(f"{prefix}{name}")
    return out


# Two signatures for type checkers: without ``schema`` the result is an ExperimentConfig, with it that class.
@overload
def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None, *, overrides: Iterable[str] = ()
) -> ExperimentConfig: ...
@overload
def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None, *, overrides: Iterable[str] = (), schema: type[C]
) -> C: ...
def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    overrides: Iterable[str] = (),
    schema: type[BaseModel] = ExperimentConfig,
) -> BaseModel:
    """Load, merge over defaults, override, coerce and validate a config; returns a ``schema`` instance.

    ``source``: a YAML path, a mapping, or None (all defaults). ``overrides``: ``dotted.key=value``
    strings whose values are YAML (``training.optimizer.lr=3e-4``, ``model.dims=[16,32]``, ``x=null``).
    ``smoke: true`` in the file fills ``SMOKE_DEFAULTS`` for the keys the file does not set;
    ``smoke=true`` as an override also replaces the file's values of those keys (other overrides of
    them still win), and says so in one INFO line. Every problem is reported in one ``ConfigError``:
    field errors and cross-field errors together (a project model validator whose own section has a
    field error comes after that is fixed). ``cfg.defaults_applied`` lists the key paths that came from
    defaults; the main rank logs them once (logger ``ratlib.config``).
    """
    lines: dict[tuple[str, ...], int] = {}
    if source is None:
        data, name = {}, "(defaults)"
    elif isinstance(source, Mapping):
        data, name = copy.deepcopy(dict(source)), "(dict)"
    else:
        data, lines = _read_yaml(Path(source))
        name = str(source)
    if isinstance(overrides, str):
        raise ConfigError(message(f"overrides={overrides!r} is one string", fix=f"pass a list such as [{overrides!r}]"))
    override_at: dict[tuple[str, ...], str] = {}
    for item in overrides:
        keys, value = _parse_override(item)
        _set(data, keys, value, item)
        override_at[keys] = item
    _fill_empty_sections(data, schema)
    replaced = _smoke_over_file(data, override_at)
    given = copy.deepcopy(data)
    smoke = _apply_smoke(data)
    problems = _section_problems(data, schema)
    cfg = None
    try:
        cfg = schema.model_validate(data)
    except ValidationError as exc:
        first = _validation_problems(exc, schema, data)
        problems += first + _second_round(schema, data, first)
    if problems or cfg is None:
        raise _error(name, problems, lines, override_at)
    defaults = _leaf_defaults(cfg, given)
    if isinstance(cfg, ExperimentConfig):
        cfg._defaults_applied = defaults
        cfg._smoke_applied = smoke
    _log_defaults(name, defaults, smoke, data, replaced)
    return cfg


def _log_defaults(
    name: str, defaults: list[str], smoke: list[str], data: dict[str, Any], replaced: Mapping[str, Any]
) -> None:
    from ratlib.rank_logger import get_logger

    shown = ", ".join(defaults[:10]) + (
        f", ... ({len(defaults) - 10} more in cfg.defaults_applied)" if len(defaults) > 10 else ""
    )
    log = get_logger("ratlib.config")
    log.info("config %s: %d key(s) from defaults: %s", name, len(defaults), shown or "none")
    if smoke:
        log.info(
            "config %s: smoke mode set %s",
            name,
            ", ".join(f"{p}={_value_at(data, tuple(p.split('.')))}" for p in smoke),
        )
    if replaced:
        log.info(
            "config %s: smoke=true on the command line wins over the config's %s",
            name,
            ", ".join(f"{p}={json.dumps(v, default=str)}" for p, v in replaced.items()),
        )


def _is_main() -> bool:
    from ratlib.launch import is_main_process  # the one definition (an unknown rank is not the main rank)

    return is_main_process()


def dump_config(cfg: BaseModel, path: str | os.PathLike[str]) -> Path | None:
    """Write the fully resolved config as YAML on the main rank only (None elsewhere), atomically: a
    temporary file in the same folder, fsync, rename. ``load_config(path, schema=type(cfg)) == cfg``."""
    if not _is_main():
        return None
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved config (every key, defaults included), written by ratlib.dump_config.\n" + yaml.dump(
        cfg.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False
    )
    write_atomic(target, text)
    return target
