"""Hypothesis strategy over the configs of a pydantic schema (see ``ratlib.testing.strategies``).

The strategy reads the schema (field types, bounds, which sections forbid unknown keys), so it
follows a project's own ``ExperimentConfig`` subclass without being told about it.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import annotated_types as at
from hypothesis import strategies as st
from pydantic import BaseModel

from ratlib.config_defaults import ExperimentConfig, TrainingConfig

__all__ = ["ConfigCase", "configs"]


@dataclass(frozen=True)
class ConfigCase:
    """A user config (a partial dict, as a YAML file gives it) and, for a corruption, the dotted ``key``
    it must be rejected at and the ``kind`` of corruption ("unknown", "type", "range" or "cross")."""

    data: dict[str, Any]
    key: str | None = None
    kind: str = field(default="valid", compare=False)


# ----------------------------------------------------------------------------------------------
# Reading the schema


def _unwrap(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata = [*metadata, *extra]
    return annotation, metadata


def _members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    return {
        name: getattr(m, name)
        for m in metadata
        for name in ("gt", "ge", "lt", "le")
        if isinstance(m, getattr(at, name.capitalize()))
    }


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, type]]:
    """(path, FieldInfo, owning model) for every leaf field, nested sections walked."""
    out = []
    for name, info in model.model_fields.items():
        sub = _model(info.annotation)
        if sub is not None and sub.model_fields:
            out += _leaves(sub, (*prefix, name))
        else:
            out.append(((*prefix, name), info, model))
    return out


def _sections(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], type[BaseModel]]]:
    """(path, model) of every section that rejects unknown keys."""
    out = [(prefix, model)] if model.model_config.get("extra") == "forbid" and prefix else []
    for name, info in model.model_fields.items():
        sub = _model(info.annotation)
        if sub is not None:
            out += _sections(sub, (*prefix, name))
    return out


# ----------------------------------------------------------------------------------------------
# Valid values


def _number(kind: type, bounds: dict[str, Any]) -> st.SearchStrategy[Any]:
    if kind is int:
        low = bounds["gt"] + 1 if "gt" in bounds else bounds.get("ge", -1000)
        high = bounds["lt"] - 1 if "lt" in bounds else bounds.get("le", 10_000)
        values: st.SearchStrategy[Any] = st.integers(low, high)
        return values | values.map(str)  # "48", as environment variables and YAML 1.1 may give it
    low = float(bounds.get("gt", bounds.get("ge", -1e3)))
    high = float(bounds.get("lt", bounds.get("le", 1e3)))
    values = st.floats(
        low, high, allow_nan=False, allow_infinity=False, exclude_min="gt" in bounds, exclude_max="lt" in bounds
    )
    return values | values.map(repr)  # "1e-05", the string YAML 1.1 makes of 1e-5


# Strings a YAML reader may take for something else (a number in a YAML 1.1 or 1.2 spelling, a bool, null,
# a date): dump_config must quote them, so they belong in every "any string" a round-trip test draws.
_LOOKALIKES = (
    *("1e5", "1E5", ".5", "+1", "-1", "0x10", "0o17", "0b1", "1_000", "1:20", ".inf", "-.Inf", ".nan", "nan"),
    *("yes", "no", "on", "off", "y", "n", "true", "false", "null", "~", "", "=", "<<"),
    *("2001-12-14", "2001-12-14t21:59:43.10-05:00", "12:30:00"),
)
_KEYWORDS = ("yes", "no", "on", "off", "y", "n", "true", "false", "null", "inf", "nan")


def _any_case(word: str) -> st.SearchStrategy[str]:
    return st.tuples(*(st.sampled_from(sorted({c.lower(), c.upper()})) for c in word)).map("".join)


#: Any string: plain words and paths, number-like runs of digits, dots, e, signs, x, o and _, the
#: keywords in any case, and the lookalikes above.
TEXT: st.SearchStrategy[str] = st.one_of(
    st.text("abcdefghij/_-", min_size=1, max_size=12),
    st.text("0123456789.eE+-_xo:", min_size=1, max_size=8),
    st.sampled_from(_KEYWORDS).flatmap(_any_case),
    st.sampled_from(_LOOKALIKES),
)


def _value(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any] | None:
    annotation, metadata = _unwrap(annotation, metadata)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [_value(a, metadata) for a in typing.get_args(annotation)]
        known = [o for o in options if o is not None]
        return st.one_of(known) if known else None
    if origin is Literal:
        return st.sampled_from(typing.get_args(annotation))
    if origin is tuple:
        parts = [_value(a, []) for a in typing.get_args(annotation)]
        return None if any(p is None for p in parts) else st.tuples(*parts).map(list)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation in (int, float):
        return _number(annotation, _bounds(metadata))
    if annotation is str:
        return TEXT
    return None  # a type this strategy does not know: the field keeps its default


_PASS_THROUGH = st.dictionaries(
    st.sampled_from(["name", "depth", "extra_flag", "notes"]),
    st.one_of(st.integers(0, 64), TEXT, st.lists(st.integers(1, 64), max_size=3)),
    max_size=2,
)


@st.composite
def _model_dict(draw: st.DrawFn, model: type[BaseModel]) -> dict[str, Any]:
    """A partial user dict for ``model``: each field given or left to its default."""
    out: dict[str, Any] = {}
    if (
        model.model_config.get("extra") == "allow"
        and model is not ExperimentConfig
        and not issubclass(model, ExperimentConfig)
    ):
        out.update({k: v for k, v in draw(_PASS_THROUGH).items() if k not in model.model_fields})
    for name, info in model.model_fields.items():
        if not draw(st.booleans()):
            continue
        sub = _model(info.annotation)
        if sub is not None:
            out[name] = draw(_model_dict(sub))
            continue
        strategy = _value(info.annotation, list(info.metadata))
        if strategy is not None:
            out[name] = draw(strategy)
    return out


def _training_path(schema: type[BaseModel]) -> str | None:
    for name, info in schema.model_fields.items():
        sub = _model(info.annotation)
        if sub is not None and issubclass(sub, TrainingConfig):
            return name
    return None


def _effective(section: dict[str, Any], key: str, default: Any) -> Any:
    return section.get(key, default) if isinstance(section, dict) else default


def _lrs(training: dict[str, Any]) -> tuple[str, float, float]:
    """(scheduler name, lr, min_lr) a training dict resolves to, defaults included."""
    opt, sched = training.get("optimizer", {}), training.get("scheduler", {})
    defaults = TrainingConfig()
    return (
        _effective(sched, "name", defaults.scheduler.name),
        float(_effective(opt, "lr", defaults.optimizer.lr)),
        float(_effective(sched, "min_lr", defaults.scheduler.min_lr)),
    )


def _repair(data: dict[str, Any], schema: type[BaseModel]) -> dict[str, Any]:
    """Keep TrainingConfig's cross-field rules in a drawn valid dict: cosine needs min_lr < lr, and a global batch
    size leaves gradient accumulation at 1 and DeepSpeed off, and DeepSpeed on means training.strategy=deepspeed."""
    path = _training_path(schema)
    if path is not None:
        training = data.setdefault(path, {})
        name, lr, min_lr = _lrs(training)
        if name == "cosine" and min_lr >= lr:
            training.setdefault("scheduler", {})["min_lr"] = lr / 10
        if training.get("global_batch_size") is not None:
            training.pop("gradient_accumulation_steps", None)
            deepspeed = training.get("deepspeed")
            if isinstance(deepspeed, dict):
                deepspeed["enabled"] = False
            if training.get("strategy") == "deepspeed":
                training["strategy"] = "ddp"
        deepspeed = training.get("deepspeed")
        if isinstance(deepspeed, dict) and deepspeed.get("enabled") and "strategy" in training:
            training["strategy"] = "deepspeed"  # the two never disagree (training.strategy's rule)
        if not training:
            del data[path]
    return data


# ----------------------------------------------------------------------------------------------
# Corruptions


_WRONG = {
    "number": ["abc", [1, 2], {"x": 1}, True],
    "int": ["abc", 2.5, [1], True],
    "bool": ["maybe", 2.5, [1], {"x": 1}],
    "str": [123, 1.5, [1], {"x": 1}],
    "literal": ["nonsense", 7, [1]],
    "tuple": ["abc", [1], 5],
    "section": [5, "abc", [1, 2]],
}


def _wrong_kind(annotation: Any) -> str | None:
    members = [_unwrap(a, [])[0] for a in _members(_unwrap(annotation, [])[0]) if a is not type(None)]
    first = members[0]
    if _model(first) is not None:
        return "section"
    if typing.get_origin(first) is tuple:
        return "tuple"
    if first is int:
        return "int"
    if first is float:
        return "number"
    if first is bool:
        return "bool"  # bool | Literal['bf16', 'fp16'] included: none of _WRONG["bool"] is a member
    if typing.get_origin(first) is Literal:
        return "literal"
    if first is str:
        return "str"
    return None


def _out_of_range(annotation: Any, metadata: list[Any]) -> list[Any]:
    annotation, metadata = _unwrap(annotation, list(metadata))
    for member in _members(annotation):
        member, meta = _unwrap(member, metadata)
        bounds = _bounds(meta)
        if member not in (int, float) or not bounds:
            continue
        values = []
        if "gt" in bounds:
            values += [bounds["gt"], bounds["gt"] - 1]
        if "ge" in bounds:
            values.append(bounds["ge"] - 1)
        if "lt" in bounds:
            values += [bounds["lt"], bounds["lt"] + 1]
        if "le" in bounds:
            values.append(bounds["le"] + 1)
        return values + ([float("nan")] if member is float else [])
    return []


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


@st.composite
def _corrupt(draw: st.DrawFn, schema: type[BaseModel]) -> ConfigCase:
    data = _repair(draw(_model_dict(schema)), schema)
    leaves = [(p, info, owner) for p, info, owner in _leaves(schema) if _wrong_kind(info.annotation)]
    ranged = [(p, info) for p, info, _ in leaves if _out_of_range(info.annotation, info.metadata)]
    sections = _sections(schema)
    training_path = _training_path(schema)
    kinds = (
        ["type"]
        + (["range"] if ranged else [])
        + (["unknown"] if sections else [])
        + (["cross"] if training_path else [])
    )
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown":
        path, model = draw(st.sampled_from(sections))
        base = draw(st.sampled_from(sorted(model.model_fields) or ["key"]))
        typo = draw(st.sampled_from([base + "x", base + "s", "x" + base, base.upper() + "_", "unknown_" + base]))
        if typo in model.model_fields:
            typo = "unknown_" + base
        _put(data, (*path, typo), draw(st.integers(0, 9)))
        return ConfigCase(data, ".".join((*path, typo)), kind)
    if kind == "cross" and training_path:
        training = data.setdefault(training_path, {})
        training.setdefault("scheduler", {})["name"] = "cosine"
        _, lr, _ = _lrs(training)
        training["scheduler"]["min_lr"] = lr * draw(st.sampled_from([1.0, 2.0, 10.0]))
        return ConfigCase(data, f"{training_path}.scheduler.min_lr", kind)
    if kind == "range":
        path, info = draw(st.sampled_from(ranged))
        _put(data, path, draw(st.sampled_from(_out_of_range(info.annotation, info.metadata))))
        return ConfigCase(data, ".".join(path), kind)
    path, info, _ = draw(st.sampled_from(leaves))
    _put(data, path, draw(st.sampled_from(_WRONG[_wrong_kind(info.annotation) or "str"])))
    return ConfigCase(data, ".".join(path), kind)


def configs(schema: type[BaseModel] = ExperimentConfig, valid: bool = True) -> st.SearchStrategy[ConfigCase]:
    """User configs for ``schema`` as ``ConfigCase`` values.

    ``valid=True``: partial dicts from the schema's valid space (left-out keys take defaults; numbers
    sometimes as strings such as ``"1e-05"``; pass-through keys in pass-through sections), which
    ``load_config(case.data, schema=schema)`` must accept. ``valid=False``: one corruption each (a
    wrong type, a value out of range, an unknown key in a strict section, or ``min_lr >= lr``) with
    ``case.key``, the one key path the ``ConfigError`` must name.
    """
    if valid:
        return _model_dict(schema).map(lambda d: ConfigCase(_repair(d, schema)))
    return _corrupt(schema)
