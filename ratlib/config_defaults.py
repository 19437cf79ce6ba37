"""Training configs with complete defaults, strict validation, overrides, risk checks and a DeepSpeed bridge.

``load_config("exp.yaml", overrides=["training.optimizer.lr=3e-4"])`` merges the file over complete
defaults, reads ``1e-4`` as a float (YAML 1.1 would hand over the string "1e-4"), and rejects wrong
types, out-of-range values and unknown keys in known sections, all of them in one ``ConfigError`` that
names each key path, its line, the value, what was expected and the closest known key. Project
sections (``model``, ``data``, ...) pass through, or are validated by a schema the project supplies::

    class SegModel(ModelConfig):
        model_config = ConfigDict(extra="forbid")
        feature_dims: int = 32

    class SegConfig(ExperimentConfig):
        model: SegModel = SegModel()

    cfg = load_config("seg.yaml", schema=SegConfig)

Imports pydantic and PyYAML only; torch is imported inside the functions that measure memory.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import annotated_types as at
import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ratlib.io import write_atomic

__all__ = [
    "SMOKE_DEFAULTS",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DistributedConfig",
    "ExperimentConfig",
    "Finding",
    "MemoryEstimate",
    "MemoryProbe",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainingConfig",
    "check_config",
    "count_parameters",
    "dump_config",
    "estimate_model_memory",
    "load_config",
    "probe_memory",
    "to_deepspeed_config",
]

#: What ``smoke: true`` fills in, for the keys the user did not set.
SMOKE_DEFAULTS: dict[str, int] = {"data.limit": 16, "training.max_steps": 10, "training.num_epochs": 1}


class ConfigError(ValueError):
    """A config is invalid. ``problems`` lists ``(key path, message)`` pairs, one per bad key; the
    message names each with its line (or override), the value, what was expected and the fix."""

    def __init__(self, message: str, problems: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = list(problems)


# ----------------------------------------------------------------------------------------------
# Schema


def _number(value: Any) -> Any:
    """Before numeric validation: read numeric strings such as "1e-4" or "48" (YAML 1.1 and
    environment variables give strings)."""
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value.strip())
            except ValueError:
                pass
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number), AllowInfNan(False)]


def _takes_bool(annotation: Any) -> bool:
    """Whether a field type accepts booleans: bool, or anything that is not a number."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_bool(a) for a in typing.get_args(annotation) if a is not type(None))
    return annotation not in (int, float)


class _Base(BaseModel):
    """Base of every config section: a boolean given for a number is an error (pydantic would take
    ``batch_size: yes`` as 1), also in the fields of project subclasses."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _takes_bool(field.annotation):
            raise PydanticCustomError("bool_not_number", "a boolean is not a number")
        return value


class _Section(_Base):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimizerConfig(_Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Float = Field(1e-4, gt=0)
    weight_decay: Float = Field(0.01, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.999)  # adam, adamw
    momentum: Float = Field(0.9, ge=0, lt=1)  # sgd


class SchedulerConfig(_Section):
    name: Literal["cosine", "step", "constant"] = "cosine"
    min_lr: Float = Field(1e-6, ge=0)  # cosine: the learning rate at the end
    warmup_epochs: Float = Field(0.0, ge=0)  # linear warmup from 0, fractions allowed
    step_size: Int = Field(30, gt=0)  # step: epochs between decays
    gamma: Float = Field(0.1, gt=0, le=1)  # step: decay factor


class DeepSpeedConfig(_Section):
    enabled: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False  # optimizer state (and parameters at stage 3) in CPU memory


class TrainingConfig(_Section):
    num_epochs: Int = Field(10, gt=0)
    batch_size: Int = Field(48, gt=0)  # per device, not global
    gradient_accumulation_steps: Int = Field(1, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    mixed_precision: bool | Literal["bf16", "fp16"] = True  # true: bf16 on CUDA
    gradient_clip: Float | None = Field(1.0, gt=0)  # max gradient norm; null: off
    seed: Int = Field(0, ge=0)
    compile: bool = False  # torch.compile the model
    channels_last: bool | None = None  # null: true on CUDA
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    max_steps: Int | None = Field(None, gt=0)  # stop after this many optimiser steps
    log_every: Int = Field(10, gt=0)  # optimiser steps between log lines
    memory_warning_fraction: Float = Field(0.9, gt=0, le=1)  # warn when a rank's peak passes it

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainingConfig:
        if self.scheduler.name == "cosine" and self.scheduler.min_lr >= self.optimizer.lr:
            raise PydanticCustomError(
                "min_lr_not_below_lr",
                "got {min_lr}; the cosine schedule needs min_lr below training.optimizer.lr={lr}: "
                "lower min_lr (e.g. lr/100) or raise lr",
                {"key": "scheduler.min_lr", "min_lr": self.scheduler.min_lr, "lr": self.optimizer.lr},
            )
        return self


class DistributedConfig(_Section):
    backend: Literal["gloo", "nccl"] | None = None  # null: nccl with CUDA, else gloo
    timeout_s: Float = Field(1800.0, gt=0)  # collectives
    connect_timeout_s: Float = Field(60.0, gt=0)  # rendezvous
    stall_timeout_s: Float | None = Field(None, gt=0)  # ratlib.hang watchdog; null: off


class DataConfig(_Base):
    """Known data keys; unknown ones pass through unless a project subclass forbids them."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    root: str | None = None  # null: the example's synthetic data
    limit: Int | None = Field(None, gt=0)  # first N samples of every split (smoke runs)
    num_workers: Int = Field(2, ge=0)


class ModelConfig(_Base):
    """The model section passes through unless a project subclass validates it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class ExperimentConfig(_Section):
    """The whole experiment. Unknown top-level sections pass through (as dicts) unless their name is
    close to a known key (a typo such as ``trainig``), which is an error."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    output_dir: str = "runs/default"
    smoke: bool = False  # fill data.limit, training.max_steps and num_epochs with small values
    training: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    _defaults_applied: list[str] = PrivateAttr(default_factory=list)
    _smoke_applied: list[str] = PrivateAttr(default_factory=list)

    @property
    def defaults_applied(self) -> list[str]:
        """Key paths whose values came from the defaults (or from ``smoke``), not from the user."""
        return list(self._defaults_applied)

    @property
    def smoke_applied(self) -> list[str]:
        """Key paths that ``smoke: true`` filled in (a subset of ``defaults_applied``)."""
        return list(self._smoke_applied)

    def __eq__(self, other: object) -> bool:
        """Equal values are equal configs; where they came from (``defaults_applied``) does not count."""
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self.model_dump() == other.model_dump()


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
        return super().construct_mapping(node, deep=deep)


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


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes lists in flow style (``betas: [0.9, 0.999]``), as people write them."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
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
            f"{path}: config file not found (relative paths start at {os.getcwd()}); check the path"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc}); pass a UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=_Loader)
        lines = _key_lines(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        fix = (
            ""
            if isinstance(exc, _DuplicateKeyError)
            else "; fix the syntax there (indentation, a ':' after each key, closing brackets and quotes)"
        )
        raise ConfigError(f"{where}: invalid YAML: {what}{fix}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}, lines
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level is a {type(data).__name__} ({str(data)[:40]!r}); expected a "
            "mapping of sections such as 'training: {batch_size: 32}'"
        )
    return data, lines


def _parse_override(item: Any) -> tuple[tuple[str, ...], Any]:
    """``"training.optimizer.lr=3e-4"`` -> (("training", "optimizer", "lr"), 0.0003); values are YAML."""
    if not isinstance(item, str):
        raise ConfigError(f"override {item!r}: expected a 'dotted.key=value' string")
    key, sep, raw = item.partition("=")
    keys = tuple(part.strip() for part in key.strip().split("."))
    if not sep or not all(keys):
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. training.optimizer.lr=3e-4")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(
            f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); quote it, e.g. {key}='\"{raw}\"'"
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
                f"override {item!r}: {path} is {child!r}, not a section; set it whole instead ({path}=...)"
            )
        node = child
    node[keys[-1]] = value


# ----------------------------------------------------------------------------------------------
# Schema introspection (for messages, suggestions and defaults_applied)


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
        if data[name] is None and sub is field.annotation:  # not for ``Section | None``
            data[name] = {}
        if isinstance(data[name], dict):
            _fill_empty_sections(data[name], sub)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"))


def _apply_smoke(data: dict[str, Any]) -> list[str]:
    """``smoke: true``: fill the ``SMOKE_DEFAULTS`` keys the user left out; returns their paths."""
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
    problems = []
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


def _validation_problems(
    exc: ValidationError, schema: type[BaseModel], data: dict[str, Any]
) -> list[tuple[tuple[str, ...], str]]:
    grouped: dict[tuple[str, ...], list[Any]] = {}
    for err in exc.errors(include_url=False):
        loc = _clean_loc(schema, tuple(err["loc"]))
        if err["type"] == "min_lr_not_below_lr":
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
        custom = [e["msg"] for e in errs if e["type"] == "min_lr_not_below_lr"]
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
        for n in range(len(loc), 0, -1):
            if loc[:n] in overrides:
                return math.inf, f" (override {overrides[loc[:n]]!r})"
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


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    overrides: Iterable[str] = (),
    schema: type[C] = ExperimentConfig,  # type: ignore[assignment]
) -> C:
    """Load, merge over defaults, override, coerce and validate a config; returns a ``schema`` instance.

    ``source``: a YAML path, a mapping, or None (all defaults). ``overrides``: ``dotted.key=value``
    strings whose values are YAML (``training.optimizer.lr=3e-4``, ``model.dims=[16,32]``, ``x=null``).
    ``smoke: true`` fills ``SMOKE_DEFAULTS`` for the keys not set. Every problem is reported in one
    ``ConfigError``. ``cfg.defaults_applied`` lists the key paths that came from defaults; the main
    rank logs them once (logger ``ratlib.config``).
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
        raise ConfigError(f"overrides={overrides!r} is one string; pass a list such as [{overrides!r}]")
    override_at: dict[tuple[str, ...], str] = {}
    for item in overrides:
        keys, value = _parse_override(item)
        _set(data, keys, value, item)
        override_at[keys] = item
    _fill_empty_sections(data, schema)
    given = copy.deepcopy(data)
    smoke = _apply_smoke(data)
    problems = _section_problems(data, schema)
    cfg = None
    try:
        cfg = schema.model_validate(data)
    except ValidationError as exc:
        problems += _validation_problems(exc, schema, data)
    if problems or cfg is None:
        raise _error(name, problems, lines, override_at)
    defaults = _leaf_defaults(cfg, given)
    if isinstance(cfg, ExperimentConfig):
        cfg._defaults_applied = defaults
        cfg._smoke_applied = smoke
    _log_defaults(name, defaults, smoke, data)
    return cfg


def _log_defaults(name: str, defaults: list[str], smoke: list[str], data: dict[str, Any]) -> None:
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


# ----------------------------------------------------------------------------------------------
# Memory: an estimate of model states from a parameter count, and a measured probe on a GPU


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of model states per GPU (parameters, gradients, optimizer state; no activations) and
    what ZeRO offload moves to CPU memory, per rank. See ``estimate_model_memory`` for the rules."""

    num_params: int
    largest_layer_params: int
    world_size: int
    zero_stage: int
    precision: str
    optimizer: str
    offload: bool
    params_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    cpu_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.gradients_bytes + self.optimizer_bytes

    def __str__(self) -> str:
        gib = 2**30
        return (
            f"{self.total_bytes / gib:.2f} GiB per GPU (params {self.params_bytes / gib:.2f}, gradients "
            f"{self.gradients_bytes / gib:.2f}, optimizer {self.optimizer_bytes / gib:.2f}) for "
            f"{self.num_params / 1e6:.1f}M parameters, {self.precision}, {self.optimizer}, ZeRO stage "
            f"{self.zero_stage}{' + offload' if self.offload else ''}, {self.world_size} rank(s)"
        )


def count_parameters(model: Any) -> tuple[int, int]:
    """(total parameters, parameters of the largest single module) of a ``torch.nn.Module``.
    Shared parameters count once; works on the meta device (nothing is allocated)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def estimate_model_memory(
    model: Any,
    *,
    world_size: int = 1,
    precision: Literal["fp32", "mixed"] = "fp32",
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
    momentum: float = 0.9,
    zero_stage: int = 0,
    offload: bool = False,
    largest_layer_params: int | None = None,
) -> MemoryEstimate:
    """Model-state memory per GPU for a ``torch.nn.Module`` (build it under ``torch.device("meta")``
    to count without allocating) or a parameter count, the way DeepSpeed's estimators count.

    Bytes per parameter (P parameters, N = ``world_size``): ``precision="fp32"`` (plain PyTorch,
    autocast included, keeps fp32 weights): weights 4, gradients 4, optimizer 4 per moment (Adam 2
    moments, SGD 1 with momentum). ``"mixed"`` (DeepSpeed bf16/fp16): weights 2, gradients 2,
    optimizer 4 (fp32 master weights) + 4 (fp32 gradients) + 4 per moment. ZeRO stage 1 divides the
    optimizer bytes by N, stage 2 also the gradients, stage 3 also the weights, plus the largest
    layer gathered in full (weights + gradients). ``offload`` moves optimizer state (stage >= 1; at
    stage 3 the weight partition too) to CPU memory. Activations are not included: ``probe_memory``
    measures them.
    """
    if isinstance(model, int):
        total, largest = model, largest_layer_params or 0
    else:
        total, largest = count_parameters(model)
        largest = largest_layer_params if largest_layer_params is not None else largest
    if world_size < 1 or zero_stage not in (0, 1, 2, 3) or precision not in ("fp32", "mixed"):
        raise ValueError(
            f"estimate_model_memory: world_size={world_size!r}, zero_stage={zero_stage!r}, "
            f"precision={precision!r}; expected world_size >= 1, zero_stage 0-3, 'fp32' or 'mixed'"
        )
    moments = {"adamw": 2, "adam": 2, "sgd": 1 if momentum > 0 else 0}[optimizer]
    weight = grad = 2 if precision == "mixed" else 4
    opt = 4 * moments + (8 if precision == "mixed" else 0)
    n = world_size
    params = weight * total / n + (weight + grad) * largest if zero_stage == 3 else weight * total
    grads = grad * total / n if zero_stage >= 2 else grad * total
    optim = opt * total / n if zero_stage >= 1 else opt * total
    cpu = 0.0
    if offload and zero_stage >= 1:
        cpu, optim = optim, 0.0
        if zero_stage == 3:
            cpu += weight * total / n
            params = (weight + grad) * largest
    return MemoryEstimate(
        total,
        largest,
        n,
        zero_stage,
        precision,
        optimizer,
        offload and zero_stage >= 1,
        int(params),
        int(grads),
        int(optim),
        int(cpu),
    )


@dataclass(frozen=True)
class MemoryProbe:
    """Peak CUDA memory of one training step at two batch sizes, and the straight line through them."""

    batch_sizes: tuple[int, int]
    peak_bytes: tuple[int, int]
    capacity_bytes: int
    fraction: float

    @property
    def bytes_per_sample(self) -> float:
        (b1, b2), (p1, p2) = self.batch_sizes, self.peak_bytes
        return (p2 - p1) / (b2 - b1)

    @property
    def fixed_bytes(self) -> float:
        return self.peak_bytes[0] - self.batch_sizes[0] * self.bytes_per_sample

    def predict(self, batch_size: int) -> int:
        """Extrapolated peak bytes of one step at ``batch_size``."""
        return int(self.fixed_bytes + batch_size * self.bytes_per_sample)

    @property
    def max_batch_size(self) -> int:
        """The largest batch whose predicted peak stays under ``fraction`` of the device's memory."""
        return max(0, int((self.fraction * self.capacity_bytes - self.fixed_bytes) // self.bytes_per_sample))


def _to_device(batch: Any, device: Any) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def probe_memory(
    model: Any,
    make_batch: Callable[[int], Any],
    *,
    batch_sizes: tuple[int, int] = (2, 4),
    loss_fn: Callable[[Any, Any], Any] | None = None,
    optimizer: Any = None,
    mixed_precision: bool | str = True,
    channels_last: bool = False,
    fraction: float = 0.9,
    device: Any = "cuda",
) -> MemoryProbe:
    """Measure one forward/backward/optimizer step at two batch sizes on a GPU and extrapolate.

    ``make_batch(b)`` returns the model input, or a tuple whose first item is the input;
    ``loss_fn(output, batch)`` defaults to ``output.float().mean()``. The default optimizer is AdamW
    with lr 0 (its state is allocated, the weights do not move). A warm-up step comes first, so the
    optimizer state and workspaces exist before measuring. The model is moved to ``device``.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"probe_memory measures CUDA memory; got device={str(device)!r} with CUDA "
            f"{'available' if torch.cuda.is_available() else 'unavailable'}. Without a GPU use "
            "estimate_model_memory (model states only)"
        )
    b1, b2 = batch_sizes
    if not 0 < b1 < b2:
        raise ValueError(f"probe_memory: batch_sizes={batch_sizes!r}; expected two increasing sizes >= 1")
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    model.train()
    opt = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=0.0)
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16

    def step(size: int) -> None:
        batch = _to_device(make_batch(size), device)
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        if channels_last and getattr(inputs, "dim", lambda: 0)() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype, enabled=bool(mixed_precision)):
            output = model(inputs)
            loss = loss_fn(output, batch) if loss_fn is not None else output.float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(b1)
    peaks = []
    for size in (b1, b2):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(size)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    if peaks[1] <= peaks[0]:
        raise ValueError(
            f"probe_memory: peak memory did not grow from batch {b1} to {b2} ({peaks}); probe larger batch sizes"
        )
    capacity = torch.cuda.get_device_properties(device).total_memory
    return MemoryProbe((b1, b2), (peaks[0], peaks[1]), capacity, fraction)


# ----------------------------------------------------------------------------------------------
# Checks


@dataclass(frozen=True)
class Finding:
    """A risky setting: ``severity`` ("error", "warning" or "info"), the ``key`` path, what is wrong
    (``message``) and what to do (``advice``)."""

    severity: Literal["error", "warning", "info"]
    key: str
    message: str
    advice: str

    def __str__(self) -> str:
        stop = "" if self.message.endswith((".", "?", "!")) else "."
        return f"{self.severity.upper()} {self.key}: {self.message}{stop} {self.advice}"


def _extra(section: BaseModel, key: str) -> Any:
    value = getattr(section, key, None)
    if value is None and section.model_extra:
        value = section.model_extra.get(key)
    return value


def _cuda_memory_gib() -> float | None:
    """Memory of GPU 0 in GiB, or None without CUDA (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def _split_batch(batch: int, accumulation: int, target: int) -> tuple[int, int]:
    """A smaller per-device batch and a larger accumulation with the same product (or just above)."""
    for k in range(2, batch + 1):
        if batch % k == 0 and batch // k <= target:
            return batch // k, accumulation * k
    k = math.ceil(batch / target)
    return math.ceil(batch / k), accumulation * k


def _stage_that_fits(model: Any, cfg: ExperimentConfig, world_size: int, budget: float) -> str:
    t = cfg.training
    for stage, offload in ((1, False), (2, False), (3, False), (2, True), (3, True)):
        est = estimate_model_memory(
            model,
            world_size=world_size,
            precision="mixed" if t.mixed_precision else "fp32",
            optimizer=t.optimizer.name,
            momentum=t.optimizer.momentum,
            zero_stage=stage,
            offload=offload,
        )
        if est.total_bytes <= budget:
            return (
                f"enable DeepSpeed ZeRO stage {stage}{' with offload' if offload else ''} "
                f"(training.deepspeed.enabled=true, zero_stage={stage}{', offload=true' if offload else ''}): "
                f"{est.total_bytes / 2**30:.1f} GiB per GPU at {world_size} rank(s)"
            )
    return "no ZeRO stage fits at this world size: use more GPUs, or a smaller model"


def _data_findings(data: DataConfig) -> list[Finding]:
    findings = []
    paths = {"root": data.root} if data.root is not None else {}
    paths.update(
        {
            k: v
            for k, v in (data.model_extra or {}).items()
            if isinstance(v, str) and k.endswith(("_path", "_dir", "_root", "_file"))
        }
    )
    for key, value in paths.items():
        resolved = Path(os.path.expandvars(value)).expanduser()
        if not resolved.exists():
            findings.append(
                Finding(
                    "error",
                    f"data.{key}",
                    f"{value!r} does not exist (resolved to {resolved.absolute()})",
                    "fix the path" + (", or drop data.root to use the synthetic default" if key == "root" else ""),
                )
            )
    extra = data.model_extra or {}
    splits = {k: v for k, v in extra.items() if k in ("split", "train_split", "val_split", "test_split")}
    if data.root is not None and splits and Path(os.path.expandvars(data.root)).expanduser().is_dir():
        from ratlib.coco_paths import CocoPathError, resolve_coco

        for key, split in splits.items():
            try:
                resolve_coco(os.path.expandvars(data.root), str(split))
            except (CocoPathError, ValueError) as exc:
                findings.append(
                    Finding(
                        "error",
                        f"data.{key}",
                        f"COCO split {split!r} under {data.root!r}: " + str(exc).splitlines()[0].rstrip("."),
                        f"run `ratlib coco {data.root} {split}` for the paths tried and found",
                    )
                )
    return findings


def check_config(
    cfg: ExperimentConfig,
    world_size: int = 1,
    *,
    model: Any = None,
    probe: MemoryProbe | None = None,
    device: Literal["cpu", "cuda"] | None = None,
    device_memory_gib: float | None = None,
    max_batch_size: int = 64,
) -> list[Finding]:
    """Risky settings, before GPU hours burn; an empty list when none.

    - the global batch (per-device batch x accumulation x ``world_size``), as info;
    - a per-device batch that may not fit: above ``probe.max_batch_size`` when a ``probe_memory``
      result is given, else above ``max_batch_size`` (the rule of thumb: 80 ran out of memory,
      32 to 48 fit the examples' models on one 80 GiB GPU);
    - a model too large for plain data parallelism: model states over half the device memory by
      ``estimate_model_memory`` when ``model`` (a module or parameter count) is given, else the old
      rule ``model.feature_dims > 512`` or ``model.num_blocks > 8``; the advice names the ZeRO stage;
    - data paths that do not exist (``data.root`` and ``data.*_path/_dir/_root/_file``), and COCO
      splits (``data.split``, ``train_split``, ...) that ``ratlib.coco_paths`` cannot resolve;
    - mixed precision or compile on CPU, DeepSpeed asked for but not installed, offload at stage 0,
      warmup as long as training, more loader workers than CPUs.

    ``device`` and ``device_memory_gib`` default to this machine's (80 GiB assumed without a GPU).
    """
    t = cfg.training
    findings: list[Finding] = []
    if device is None:
        memory = device_memory_gib if device_memory_gib is not None else _cuda_memory_gib()
        device = "cuda" if memory is not None else "cpu"
    else:
        memory = (
            device_memory_gib if device_memory_gib is not None else (_cuda_memory_gib() if device == "cuda" else None)
        )
    budget_gib = memory if memory is not None else 80.0
    assumed = "" if memory is not None else " (80 GiB assumed: no GPU seen here; pass device_memory_gib)"

    global_batch = t.batch_size * t.gradient_accumulation_steps * world_size
    findings.append(
        Finding(
            "info",
            "training.batch_size",
            f"global batch {global_batch} = {t.batch_size} per device x "
            f"{t.gradient_accumulation_steps} accumulation x {world_size} rank(s)",
            "batch_size is per device; scale the learning rate with the global batch",
        )
    )
    small, accum = _split_batch(
        t.batch_size,
        t.gradient_accumulation_steps,
        probe.max_batch_size if probe is not None else max(1, max_batch_size * 3 // 4),
    )
    keep = (
        f"set training.batch_size={small} and training.gradient_accumulation_steps={accum} "
        f"(global batch {small * accum * world_size})"
    )
    if probe is not None and t.batch_size > probe.max_batch_size:
        need = probe.predict(t.batch_size) / 2**30
        findings.append(
            Finding(
                "error" if probe.predict(t.batch_size) > probe.capacity_bytes else "warning",
                "training.batch_size",
                f"per-device batch {t.batch_size} needs about {need:.1f} GiB by the measured probe; "
                f"{probe.max_batch_size} fits in {probe.fraction:.0%} of {probe.capacity_bytes / 2**30:.0f} GiB",
                keep,
            )
        )
    elif probe is None and t.batch_size > max_batch_size:
        findings.append(
            Finding(
                "warning",
                "training.batch_size",
                f"per-device batch {t.batch_size} is above max_batch_size={max_batch_size}, "
                "likely to run out of memory (batch_size is per device, not global)",
                keep + "; or measure with probe_memory and a smoke run",
            )
        )

    budget = 0.5 * budget_gib * 2**30  # half for model states, half for activations
    if model is not None:
        stage = t.deepspeed.zero_stage if t.deepspeed.enabled else 0
        est = estimate_model_memory(
            model,
            world_size=world_size,
            precision="mixed" if t.deepspeed.enabled and t.mixed_precision else "fp32",
            optimizer=t.optimizer.name,
            momentum=t.optimizer.momentum,
            zero_stage=stage,
            offload=t.deepspeed.enabled and t.deepspeed.offload,
        )
        if est.total_bytes > budget:
            findings.append(
                Finding(
                    "error" if est.total_bytes > budget_gib * 2**30 else "warning",
                    "model",
                    f"model states need {est}, over half of {budget_gib:.0f} GiB{assumed}",
                    _stage_that_fits(model, cfg, world_size, budget),
                )
            )
    else:
        dims, blocks = _extra(cfg.model, "feature_dims"), _extra(cfg.model, "num_blocks")
        width = max(dims) if isinstance(dims, list) and all(isinstance(d, int) for d in dims) and dims else dims
        too_wide = isinstance(width, int) and width > 512
        too_deep = isinstance(blocks, int) and blocks > 8
        if (too_wide or too_deep) and not t.deepspeed.enabled:
            findings.append(
                Finding(
                    "warning",
                    "model",
                    f"feature_dims={dims} and num_blocks={blocks} are past the size plain data "
                    "parallelism handles (feature_dims > 512 or num_blocks > 8)",
                    "enable DeepSpeed ZeRO stage 2 (training.deepspeed.enabled=true, zero_stage=2), "
                    "or 3 with offload=true if that is not enough; pass model= to check_config "
                    "for a per-stage estimate",
                )
            )
    findings += _data_findings(cfg.data)
    if device == "cpu":
        if t.mixed_precision:
            findings.append(
                Finding(
                    "info",
                    "training.mixed_precision",
                    f"mixed_precision={t.mixed_precision!r} on CPU: autocast there is slow or unsupported",
                    "set training.mixed_precision=false for CPU runs",
                )
            )
        if t.compile:
            findings.append(
                Finding(
                    "info",
                    "training.compile",
                    "torch.compile on CPU takes long to compile",
                    "keep training.compile=false for short CPU runs",
                )
            )
    if t.deepspeed.enabled:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            findings.append(
                Finding(
                    "error",
                    "training.deepspeed.enabled",
                    "DeepSpeed is enabled but not installed",
                    "pip install 'ratlib[deepspeed]', or set training.deepspeed.enabled=false",
                )
            )
        if t.deepspeed.offload and t.deepspeed.zero_stage == 0:
            findings.append(
                Finding(
                    "warning",
                    "training.deepspeed.offload",
                    "offload needs ZeRO stage 1 or higher",
                    "set training.deepspeed.zero_stage=2 (or 3)",
                )
            )
    if t.scheduler.name != "constant" and t.scheduler.warmup_epochs >= t.num_epochs:
        findings.append(
            Finding(
                "warning",
                "training.scheduler.warmup_epochs",
                f"warmup_epochs={t.scheduler.warmup_epochs} is not below num_epochs={t.num_epochs}: "
                "the schedule never gets past warmup",
                "shorten the warmup",
            )
        )
    cpus = os.cpu_count() or 1
    if cfg.data.num_workers > cpus:
        findings.append(
            Finding(
                "warning",
                "data.num_workers",
                f"num_workers={cfg.data.num_workers} per rank is more than the {cpus} CPUs here",
                f"set data.num_workers to at most {cpus}",
            )
        )
    return findings


# ----------------------------------------------------------------------------------------------
# DeepSpeed bridge and dumping


def to_deepspeed_config(
    cfg: ExperimentConfig, world_size: int, *, steps_per_epoch: int | None = None, device: str = "cuda"
) -> dict[str, Any]:
    """A config dict for ``deepspeed.initialize(config=...)``.

    Batch: ``train_batch_size = micro batch x gradient_accumulation_steps x world_size`` (DeepSpeed's
    invariant). Precision: ``bf16`` for true/"bf16", ``fp16`` (dynamic loss scale) for "fp16".
    Optimizer: AdamW, Adam (``adam_w_mode: false``, DeepSpeed's "Adam" is AdamW otherwise) or torch's
    SGD. Scheduler, given the optimiser ``steps_per_epoch``: cosine -> WarmupCosineLR, constant with
    warmup -> WarmupLR; ``step`` has no DeepSpeed equivalent: pass a torch scheduler as
    ``lr_scheduler=`` instead. ``device="cpu"`` uses torch's Adam kernels (DeepSpeed's fused ones need CUDA).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"to_deepspeed_config: world_size={world_size!r}; expected a positive int")
    if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
        raise ValueError(
            f"to_deepspeed_config: steps_per_epoch={steps_per_epoch!r}; expected a positive int "
            "(optimiser steps per epoch: batches per rank // gradient_accumulation_steps)"
        )
    t, o, s = cfg.training, cfg.training.optimizer, cfg.training.scheduler
    zero: dict[str, Any] = {"stage": t.deepspeed.zero_stage}
    if t.deepspeed.offload and t.deepspeed.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device != "cpu"}
        if t.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device != "cpu"}
    ds: dict[str, Any] = {
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": float(t.gradient_clip or 0.0),  # 0.0: off
        "steps_per_print": t.log_every,
        "bf16": {"enabled": t.mixed_precision in (True, "bf16")},
        "fp16": {"enabled": t.mixed_precision == "fp16"},
        "zero_optimization": zero,
        "wall_clock_breakdown": False,
    }
    if t.mixed_precision == "fp16":
        ds["fp16"].update(
            {
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        )
    if o.name in ("adamw", "adam"):
        params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": 1e-8, "weight_decay": o.weight_decay}
        if o.name == "adam":
            params["adam_w_mode"] = False
        if device == "cpu":
            params["torch_adam"] = True
        ds["optimizer"] = {"type": "AdamW" if o.name == "adamw" else "Adam", "params": params}
    else:
        ds["optimizer"] = {
            "type": "SGD",
            "params": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay},
        }
        if t.deepspeed.zero_stage >= 1:
            ds["zero_allow_untested_optimizer"] = True  # torch.optim.SGD is outside DeepSpeed's tested list
    if steps_per_epoch is not None:
        total = steps_per_epoch * t.num_epochs
        total = min(total, t.max_steps) if t.max_steps is not None else total
        warmup = min(total, round(s.warmup_epochs * steps_per_epoch))
        if s.name == "cosine":
            # DeepSpeed refuses warmup_num_steps=0: no warmup is one step that starts at the full rate.
            ds["scheduler"] = {
                "type": "WarmupCosineLR",
                "params": {
                    "total_num_steps": total,
                    "warmup_num_steps": max(1, warmup),
                    "warmup_min_ratio": 0.0 if warmup else 1.0,
                    "cos_min_ratio": s.min_lr / o.lr,
                    "warmup_type": "linear",
                },
            }
        elif s.name == "constant" and warmup > 0:
            ds["scheduler"] = {
                "type": "WarmupLR",
                "params": {
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": o.lr,
                    "warmup_num_steps": warmup,
                    "warmup_type": "linear",
                },
            }
    return ds


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
