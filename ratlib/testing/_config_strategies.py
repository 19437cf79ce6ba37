"""Hypothesis strategy over configs of a pydantic schema (see ``ratlib.testing.strategies``)."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types as at
from hypothesis import strategies as st
from pydantic import BaseModel

from ratlib.config_defaults import ExperimentConfig


@dataclass(frozen=True)
class ConfigCase:
    """A user config (a partial dict, as a YAML file would give) and, for a corruption, the dotted
    ``key`` it must be rejected at."""

    data: dict[str, Any]
    key: str | None = None
    note: str = ""


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        for name in ("gt", "ge", "lt", "le"):
            if isinstance(m, getattr(at, name.capitalize())):
                out[name] = getattr(m, name)
    return out


def _number(kind: type, bounds: dict[str, Any]) -> st.SearchStrategy[Any]:
    lo = bounds.get("ge", bounds.get("gt"))
    hi = bounds.get("le", bounds.get("lt"))
    if kind is int:
        low = None if lo is None else (lo + 1 if "gt" in bounds else lo)
        high = None if hi is None else (hi - 1 if "lt" in bounds else hi)
        return st.integers(low if low is not None else -1000, high if high is not None else 10_000)
    low = 0.0 if lo is None else float(lo)
    high = 1e3 if hi is None else float(hi)
    values = st.floats(low, high, allow_nan=False, exclude_min="gt" in bounds, exclude_max="lt" in bounds)
    # some values the way YAML 1.1 hands them over: strings such as "1e-4"
    return values | values.map(repr)


def _value(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any] | None:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return st.sampled_from(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        options = [_value(a, metadata) for a in typing.get_args(annotation)]
        return st.one_of([o for o in options if o is not None])
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation in (int, float):
        return _number(annotation, _bounds(metadata))
    if annotation is str:
        return st.text("abcdefghij/_-", min_size=1, max_size=12)
    if origin is tuple:
        parts = [_value(a, []) for a in typing.get_args(annotation)]
        return st.tuples(*parts).map(list) if all(p is not None for p in parts) else None  # type: ignore[arg-type]
    return None  # a type this strategy does not know: leave the default


@st.composite
def _model_dict(draw: st.DrawFn, model: type[BaseModel], skip: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name in skip or not draw(st.booleans()):
            continue  # left out: the default applies
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[name] = draw(_model_dict(ann, frozenset()))
            continue
        strategy = _value(ann, list(field.metadata))
        if strategy is not None:
            out[name] = draw(strategy)
    return out


def _sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    return {n: f.annotation for n, f in model.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
            and f.annotation.model_config.get("extra") == "forbid"}


@st.composite
def _corrupt(draw: st.DrawFn, schema: type[BaseModel]) -> ConfigCase:
    data = draw(_model_dict(schema, frozenset({"output_dir", "smoke"})))
    section_name = draw(st.sampled_from(sorted(_sections(schema))))
    section = _sections(schema)[section_name]
    fields = section.model_fields
    name = draw(st.sampled_from(sorted(fields)))
    target = data.setdefault(section_name, {})
    kind = draw(st.sampled_from(["typo", "type", "range"]))
    ann = fields[name].annotation
    bounds = _bounds(list(fields[name].metadata))
    if kind == "range" and not bounds:
        kind = "type"
    if kind == "type" and (isinstance(ann, type) and issubclass(ann, BaseModel) or ann is str):
        kind = "typo"
    if kind == "typo":
        typo = draw(st.sampled_from([name + "s", name[:-1], name[0] + name + "x", "_" + name]))
        if typo in fields or difflib.get_close_matches(typo, list(fields), n=1, cutoff=0.5) != [name]:
            typo = name + "s"
        target.pop(name, None)
        target[typo] = 1
        return ConfigCase(data, f"{section_name}.{typo}", "typo")
    if kind == "type":
        target[name] = draw(st.sampled_from(["not-a-number", "abc", [1, 2, 3], {"x": 1}]))
        if typing.get_origin(ann) is tuple:
            target[name] = "abc"
        return ConfigCase(data, f"{section_name}.{name}", "type")
    if "gt" in bounds or "ge" in bounds:
        limit = bounds.get("gt", bounds.get("ge"))
        target[name] = limit - (0 if "gt" in bounds else 1)
    else:
        limit = bounds.get("lt", bounds.get("le"))
        target[name] = limit + (0 if "lt" in bounds else 1)
    return ConfigCase(data, f"{section_name}.{name}", "range")


def configs(schema: type[BaseModel] = ExperimentConfig, valid: bool = True) -> st.SearchStrategy[ConfigCase]:
    """User configs for ``schema``: partial dicts (left-out keys take defaults; floats sometimes as
    YAML-1.1 strings such as ``"1e-04"``). With ``valid=False`` one corruption each: a misspelt key,
    a wrong type, or a value out of range, in a strictly validated section, with the key path."""
    if valid:
        return _model_dict(schema, frozenset({"output_dir"})).map(lambda d: ConfigCase(d))
    return _corrupt(schema)
