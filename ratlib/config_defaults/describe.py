"""What a schema says about a key, for ``load_config``'s messages: the field at a path, what it expects (type,
range, choices), and the closest known key to a misspelt one.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``Section`` or ``Section | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _field_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The FieldInfo at a key path, or None (pass-through keys, list items)."""
    model: type[BaseModel] | None = schema
    field = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = _model_of(field.annotation)
    return field


def _clean_loc(schema: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, ...]:
    """Pydantic's error location as a key path: union-member labels such as ``'bool'`` dropped."""
    out: list[str] = []
    model: type[BaseModel] | None = schema
    leaf = False
    for part in loc:
        if isinstance(part, int):
            out.append(str(part))
        elif not leaf:
            out.append(part)
            field = model.model_fields.get(part) if model is not None else None
            model = _model_of(field.annotation) if field is not None else None
            leaf = model is None
        # else: a union-member label under a leaf value
    return tuple(out)


_ALIASES = {
    "learning_rate": "lr",
    "base_lr": "lr",
    "wd": "weight_decay",
    "epochs": "num_epochs",
    "n_epochs": "num_epochs",
    "max_epochs": "num_epochs",
    "batch": "batch_size",
    "bs": "batch_size",
    "per_device_batch_size": "batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "accumulate_grad_batches": "gradient_accumulation_steps",
    "accumulation_steps": "gradient_accumulation_steps",
    "grad_clip": "gradient_clip",
    "clip_grad_norm": "gradient_clip",
    "max_grad_norm": "gradient_clip",
    "gradient_clipping": "gradient_clip",
    "amp": "mixed_precision",
    "precision": "mixed_precision",
    "fp16": "mixed_precision",
    "bf16": "mixed_precision",
    "warmup": "warmup_epochs",
    "warmup_steps": "warmup_epochs",
    "eta_min": "min_lr",
    "stage": "zero_stage",
    "zero": "zero_stage",
    "type": "name",
    "optim": "optimizer",
    "lr_scheduler": "scheduler",
    "sched": "scheduler",
    "workers": "num_workers",
    "timeout": "timeout_s",
    "output": "output_dir",
    "out_dir": "output_dir",
    "run_dir": "output_dir",
    "dist": "distributed",
    "ds": "deepspeed",
    "torch_compile": "compile",
    "max_iters": "max_steps",
    "num_steps": "max_steps",
    "data_root": "root",
    "path": "root",
}


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        out += _leaf_paths(sub, (*prefix, name)) if sub is not None else [(*prefix, name)]
    return out


def _suggest(schema: type[BaseModel], loc: tuple[str, ...]) -> str:
    """'did you mean ...?' for an unknown key: same section first (aliases, then spelling), then anywhere."""
    key, parent = loc[-1], loc[:-1]
    model: type[BaseModel] | None = schema
    for part in parent:
        model = _model_of(model.model_fields[part].annotation) if model and part in model.model_fields else None
    known = list(model.model_fields) if model is not None else []
    alias = _ALIASES.get(key.lower())
    close = [alias] if alias in known else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {'.'.join((*parent, close[0]))!r}?"
    names = {key.lower(), alias}
    elsewhere = [p for p in _leaf_paths(schema) if p[-1] in names and p[:-1] != parent]
    if elsewhere:
        return f"did you mean {'.'.join(elsewhere[0])!r}? (it belongs in the {'.'.join(elsewhere[0][:-1])} section)"
    return f"known keys here: {', '.join(known)}" if known else "remove it"


def _bounds_text(metadata: Iterable[Any]) -> str:
    ops = {at.Gt: ">", at.Ge: ">=", at.Lt: "<", at.Le: "<="}
    parts = [f"{ops[type(m)]} {getattr(m, type(m).__name__.lower())}" for m in metadata if type(m) in ops]
    return (" " + " and ".join(parts)) if parts else ""


def _choices(annotation: Any, metadata: list[Any]) -> list[str]:
    """The alternatives a type accepts, in words: ["true", "false", "'bf16'", "'fp16'"], ["an integer > 0"]."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extra = typing.get_args(annotation)
        return _choices(base, [*metadata, *extra])
    if origin in (typing.Union, types.UnionType):
        return [w for a in typing.get_args(annotation) for w in _choices(a, metadata)]
    if origin is Literal:
        return [repr(v) if isinstance(v, str) else str(v) for v in typing.get_args(annotation)]
    if origin is tuple:
        args = typing.get_args(annotation)
        numbers = all(_choices(a, []) == ["a number"] for a in args)
        return [f"a list of {len(args)} {'numbers' if numbers else 'values'}"]
    simple = {type(None): ["null"], bool: ["true", "false"], str: ["a string"]}
    if annotation in simple:
        return simple[annotation]
    if annotation in (int, float):
        return [("an integer" if annotation is int else "a number") + _bounds_text(metadata)]
    if _model_of(annotation) is not None:
        return ["a mapping (section)"]
    return [getattr(annotation, "__name__", str(annotation))]


def _describe(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    """What a type accepts, in words: ``an integer > 0``, ``true, false, 'bf16' or 'fp16'``."""
    words = _choices(annotation, list(metadata))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _expected_at(schema: type[BaseModel], loc: tuple[str, ...]) -> str | None:
    """What the schema accepts at a key path (a field, or an item of a tuple field), if it knows."""
    field = _field_at(schema, loc)
    if field is not None:
        return _describe(field.annotation, field.metadata)
    parent = _field_at(schema, loc[:-1]) if loc and loc[-1].isdigit() else None
    if parent is not None and typing.get_origin(parent.annotation) is tuple:
        items = typing.get_args(parent.annotation)
        if int(loc[-1]) < len(items):
            return _describe(items[int(loc[-1])])
    return None
