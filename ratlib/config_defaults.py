"""Training configs with complete defaults, strict validation, overrides and risk warnings.

``load_config("exp.yaml", overrides=["training.optimizer.lr=3e-4"])`` merges the file over complete
defaults, coerces values (YAML 1.1 reads ``1e-4`` as a string: it becomes a float here), and rejects
unknown keys in known sections with the key path, the file line and the closest known key.
Project sections (``model``, ``data``) pass through, or are validated by a schema the project
supplies by subclassing::

    class SegModel(ModelConfig):
        model_config = ConfigDict(extra="forbid")
        feature_dims: int = 32

    class SegConfig(ExperimentConfig):
        model: SegModel = SegModel()

Imports pydantic and PyYAML only (no torch at import time).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

__all__ = [
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DistributedConfig",
    "ExperimentConfig",
    "Finding",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainingConfig",
    "check_config",
    "dump_config",
    "load_config",
    "to_deepspeed_config",
]

SMOKE_DEFAULTS = {("data", "limit"): 16, ("training", "max_steps"): 10, ("training", "num_epochs"): 1}


class ConfigError(ValueError):
    """A config is invalid; the message names each key path, the value, what was expected and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimizerConfig(_Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, lt=1)


class SchedulerConfig(_Section):
    name: Literal["cosine", "step", "constant"] = "cosine"
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = Field(30, gt=0)  # epochs between decays, for name="step"
    gamma: float = Field(0.1, gt=0, le=1)


class DeepSpeedConfig(_Section):
    enabled: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False  # offload optimizer state (and parameters at stage 3) to CPU memory


class TrainingConfig(_Section):
    num_epochs: int = Field(10, gt=0)
    batch_size: int = Field(48, gt=0, description="per device")
    gradient_accumulation_steps: int = Field(1, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    mixed_precision: bool | Literal["bf16", "fp16"] = True  # True: bf16 on CUDA
    gradient_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    compile: bool = False
    channels_last: bool | None = None  # None: true on CUDA
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    max_steps: int | None = Field(None, gt=0)  # stop after this many optimiser steps
    log_every: int = Field(10, gt=0)
    memory_warning_fraction: float = Field(0.9, gt=0, le=1)


class DistributedConfig(_Section):
    backend: Literal["gloo", "nccl"] | None = None  # None: nccl with CUDA, else gloo
    timeout_s: float = Field(1800.0, gt=0)
    connect_timeout_s: float = Field(60.0, gt=0)
    stall_timeout_s: float | None = Field(None, gt=0)  # ratlib.hang watchdog; None: off


class DataConfig(BaseModel):
    """Known data keys; unknown ones pass through unless a project subclass forbids them."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    root: str | None = None
    limit: int | None = Field(None, gt=0)  # first N samples of every split (smoke runs)
    num_workers: int = Field(2, ge=0)


class ModelConfig(BaseModel):
    """The model section passes through unless a project subclass validates it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class ExperimentConfig(_Section):
    """The whole experiment. Unknown top-level sections pass through (as dicts) unless their name is
    close to a known one (a typo such as ``trainig``), which is an error."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    output_dir: str = "runs/default"
    smoke: bool = False
    training: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    _defaults_applied: list[str] = PrivateAttr(default_factory=list)
    _source: str | None = PrivateAttr(default=None)

    @property
    def defaults_applied(self) -> list[str]:
        """Key paths whose values came from the defaults, not from the user (file or overrides)."""
        return list(self._defaults_applied)


C = TypeVar("C", bound=BaseModel)


# ----------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path "
                          f"(relative paths are relative to {os.getcwd()})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} holds a {type(data).__name__} at the top level; "
                          "expected a mapping such as 'training: {batch_size: 32}'")
    return data, text


def _line_of(text: str | None, path: tuple[Any, ...]) -> int | None:
    """1-based line of a dotted key path in the YAML text, when it is there."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(key):
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value, e.g. training.optimizer.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value {raw!r} is not a YAML scalar or list ({exc})") from None
    return key.split("."), value


def _set(data: dict[str, Any], keys: list[str], value: Any, origin: str) -> None:
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {origin!r}: {'.'.join(keys[: i + 1])} is {child!r}, not a section")
        node = child
    node[keys[-1]] = value


def _known_fields(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = schema
    for key in loc:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _errors(exc: ValidationError, schema: type[BaseModel], source: str, text: str | None) -> ConfigError:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        # drop union-member labels pydantic adds (e.g. 'bool', "literal['bf16','fp16']")
        clean = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("bool", "float", "int", "str",
                                                                                         "none"))))
        where = ".".join(map(str, clean))
        line = _line_of(text, clean)
        at = f" (line {line})" if line else ""
        if err["type"] == "extra_forbidden":
            known = _known_fields(schema, clean[:-1])
            close = difflib.get_close_matches(str(clean[-1]), known, n=1, cutoff=0.5)
            hint = f"did you mean {'.'.join(map(str, clean[:-1] + (close[0],)))!r}?" if close else \
                f"known keys here: {', '.join(known)}"
            lines.append(f"  {where}{at}: unknown key; {hint}")
        else:
            lines.append(f"  {where}{at}: {err['msg']} (got {err.get('input')!r})")
    lines.append("Fix the values above, or drop them to use the defaults (see docs/config_defaults.md).")
    return ConfigError("\n".join(dict.fromkeys(lines)))


def _check_sections(data: dict[str, Any], schema: type[BaseModel], source: str, text: str | None) -> None:
    known = list(schema.model_fields)
    for key, value in data.items():
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        line = _line_of(text, (key,))
        at = f" (line {line})" if line else ""
        if close:
            raise ConfigError(f"invalid config ({source}):\n  {key}{at}: unknown section; did you mean {close[0]!r}?")
        if not isinstance(value, dict):
            raise ConfigError(f"invalid config ({source}):\n  {key}{at}: unknown top-level key with value {value!r}; "
                              f"top-level keys are {', '.join(known)} or project sections (mappings)")


def _leaf_defaults(model: BaseModel, given: Mapping[str, Any] | None, prefix: str = "") -> list[str]:
    out: list[str] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        sub = given.get(name) if isinstance(given, Mapping) else None
        if isinstance(value, BaseModel) and type(value).model_fields:
            out += _leaf_defaults(value, sub if isinstance(sub, Mapping) else {}, path + ".")
        elif not isinstance(given, Mapping) or name not in given:
            out.append(path)
    return out


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None,
    *,
    overrides: Iterable[str] = (),
    schema: type[C] = ExperimentConfig,  # type: ignore[assignment]
) -> C:
    """Load, merge over defaults, override, coerce and validate a config; returns a ``schema`` instance.

    ``source``: a YAML path, a mapping, or None (all defaults). ``overrides``: ``dotted.key=value``
    strings, values parsed as YAML. ``smoke: true`` fills ``data.limit``, ``training.max_steps`` and
    ``training.num_epochs`` with small values unless they are set. Raises ``ConfigError``.
    """
    text: str | None = None
    if source is None:
        data, name = {}, "defaults"
    elif isinstance(source, Mapping):
        import copy

        data, name = copy.deepcopy(dict(source)), "dict"
    else:
        path = Path(source)
        data, text = _read_yaml(path)
        name = str(path)
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r} is one string; pass a list such as [{overrides!r}]")
    for item in overrides:
        keys, value = _parse_override(item)
        _set(data, keys, value, item)
    _check_sections(data, schema, name, text)
    smoke_applied: list[str] = []
    if str(data.get("smoke", "")).lower() in ("true", "1", "yes", "on") or data.get("smoke") is True:
        for (section, key), value in SMOKE_DEFAULTS.items():
            sec = data.setdefault(section, {})
            if isinstance(sec, dict) and sec.get(key) is None:
                sec[key] = value
                smoke_applied.append(f"{section}.{key}={value} (smoke)")
    given = _strip_smoke(data, smoke_applied)
    try:
        cfg = schema.model_validate(data)
    except ValidationError as exc:
        raise _errors(exc, schema, name, text) from None
    defaults = _leaf_defaults(cfg, given) + smoke_applied
    if isinstance(cfg, ExperimentConfig):
        cfg._defaults_applied = defaults
        cfg._source = name
    _log_defaults(name, defaults)
    return cfg


def _strip_smoke(data: dict[str, Any], applied: list[str]) -> dict[str, Any]:
    """The user's own keys, without the values smoke mode filled in."""
    import copy

    given = copy.deepcopy(data)
    for item in applied:
        section, key = item.split("=")[0].split(".")
        given.get(section, {}).pop(key, None)
    return given


def _log_defaults(source: str, defaults: list[str]) -> None:
    from ratlib.rank_logger import get_logger

    shown = ", ".join(defaults[:12]) + (f", ... ({len(defaults) - 12} more)" if len(defaults) > 12 else "")
    get_logger("ratlib.config").info("config %s: %d value(s) from defaults: %s", source, len(defaults), shown or "none")


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
        return f"{self.severity.upper()} {self.key}: {self.message.rstrip('.')}. {self.advice}"


def _get(section: BaseModel, key: str) -> Any:
    value = getattr(section, key, None)
    if value is None and section.model_extra:
        value = section.model_extra.get(key)
    return value


def _cuda_memory_gib() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: F811
        except ImportError:
            return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def check_config(cfg: ExperimentConfig, *, device: str | None = None, device_memory_gib: float | None = None
                 ) -> list[Finding]:
    """Risky settings, before GPU hours burn: per-device batches likely to run out of memory, model
    sizes that call for DeepSpeed, missing data paths, mixed precision or compile on CPU, DeepSpeed
    asked for but not installed. ``device`` ("cuda"/"cpu") and ``device_memory_gib`` default to what
    this machine has."""
    findings: list[Finding] = []
    t = cfg.training
    if device is None:
        memory = device_memory_gib if device_memory_gib is not None else _cuda_memory_gib()
        device = "cuda" if memory is not None else "cpu"
    else:
        memory = device_memory_gib
    model, data = cfg.model, cfg.data
    width, depth = _get(model, "feature_dims"), _get(model, "num_blocks")
    size = _get(data, "image_size") or _get(data, "patch_size")
    # activation memory of a conv net, fp32/bf16, forward + backward kept: a rough but useful estimate
    if isinstance(width, int) and isinstance(size, int):
        bytes_per = 2 if t.mixed_precision else 4
        levels = depth if isinstance(depth, int) else 4
        act = t.batch_size * size * size * width * bytes_per * 12 * min(levels, 6) / 2**30
        budget = memory if memory is not None else 80.0
        if act > 0.8 * budget:
            findings.append(Finding(
                "warning", "training.batch_size",
                f"per-device batch {t.batch_size} at {size}x{size} with feature_dims={width} needs about "
                f"{act:.0f} GiB of activations, over 80% of {budget:.0f} GiB"
                + ("" if memory is not None else " (assumed: no GPU seen here)"),
                f"lower training.batch_size (e.g. {max(1, int(t.batch_size * 0.8 * budget / act))}) and raise "
                "training.gradient_accumulation_steps to keep the effective batch"))
    elif t.batch_size >= 64:
        findings.append(Finding("warning", "training.batch_size",
                                f"per-device batch {t.batch_size} is large; batch_size is per device, not global",
                                "check it fits: run with smoke=true and watch peak memory, or lower it and raise "
                                "gradient_accumulation_steps"))
    if isinstance(width, int) and isinstance(depth, int):
        params = 12 * width * width * depth  # transformer-style estimate
        state_gib = params * 16 / 2**30  # fp32 weights + grads + Adam moments
        if (params >= 100e6 or state_gib > 0.25 * (memory or 80.0)) and not t.deepspeed.enabled:
            findings.append(Finding(
                "warning", "model", f"feature_dims={width} with num_blocks={depth} is about {params / 1e6:.0f}M "
                f"parameters ({state_gib:.1f} GiB of weights, gradients and optimizer state per GPU)",
                "enable training.deepspeed.enabled=true with zero_stage 2 (or 3 with offload) to shard it"))
    for key, value in (data.model_extra or {}).items():
        if isinstance(value, str) and (key.endswith(("_path", "_dir", "_root", "_file")) or key == "root"):
            if not Path(os.path.expandvars(value)).expanduser().exists():
                findings.append(Finding("error", f"data.{key}", f"{value!r} does not exist",
                                        "fix the path, or drop it to use the synthetic default"))
    if data.root is not None and not Path(os.path.expandvars(data.root)).expanduser().exists():
        findings.append(Finding("error", "data.root", f"{data.root!r} does not exist",
                                "fix the path, or drop data.root to train on the synthetic default"))
    if device == "cpu":
        if t.mixed_precision:
            findings.append(Finding("info", "training.mixed_precision",
                                    f"mixed_precision={t.mixed_precision!r} on CPU: autocast is slow or a no-op there",
                                    "set training.mixed_precision=false for CPU runs"))
        if t.compile:
            findings.append(Finding("info", "training.compile", "torch.compile on CPU takes long to compile",
                                    "keep training.compile=false for short CPU runs"))
    if t.deepspeed.enabled:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            findings.append(Finding("error", "training.deepspeed.enabled", "DeepSpeed is enabled but not installed",
                                    "pip install 'ratlib[deepspeed]', or set training.deepspeed.enabled=false"))
        if t.deepspeed.offload and t.deepspeed.zero_stage == 0:
            findings.append(Finding("warning", "training.deepspeed.offload", "offload needs ZeRO stage 1 or higher",
                                    "set training.deepspeed.zero_stage=2 (or 3)"))
    if t.scheduler.name == "cosine" and t.scheduler.min_lr >= t.optimizer.lr:
        findings.append(Finding("warning", "training.scheduler.min_lr",
                                f"min_lr={t.scheduler.min_lr} is not below lr={t.optimizer.lr}: the schedule never decays",
                                "set min_lr well below lr"))
    if t.scheduler.warmup_epochs >= t.num_epochs:
        findings.append(Finding("warning", "training.scheduler.warmup_epochs",
                                f"warmup_epochs={t.scheduler.warmup_epochs} >= num_epochs={t.num_epochs}",
                                "shorten the warmup"))
    return findings


# ----------------------------------------------------------------------------------------------
# DeepSpeed bridge and dumping


def to_deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """A config dict for ``deepspeed.initialize(config=...)``, with DeepSpeed's batch invariant
    ``train_batch_size = micro_batch * gradient_accumulation_steps * world_size`` satisfied."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"to_deepspeed_config: world_size={world_size!r}; expected a positive int")
    t = cfg.training
    ds: dict[str, Any] = {
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": float(t.gradient_clip or 0.0),
        "steps_per_print": t.log_every,
        "bf16": {"enabled": t.mixed_precision in (True, "bf16")},
        "fp16": {"enabled": t.mixed_precision == "fp16"},
        "zero_optimization": {"stage": t.deepspeed.zero_stage},
        "wall_clock_breakdown": False,
    }
    if t.mixed_precision == "fp16":
        ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16})
    if t.deepspeed.offload and t.deepspeed.zero_stage >= 1:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if t.deepspeed.zero_stage == 3:
            ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    o = t.optimizer
    if o.name in ("adamw", "adam"):
        ds["optimizer"] = {"type": "AdamW" if o.name == "adamw" else "Adam",
                           "params": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": list(o.betas)}}
    # sgd: no "optimizer" key; pass the torch optimizer to deepspeed.initialize(optimizer=...)
    return ds


def _is_main() -> bool:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    from ratlib.dist_init import detect_launch_env

    return detect_launch_env().rank == 0


def dump_config(cfg: BaseModel, path: str | os.PathLike[str]) -> Path | None:
    """Write the fully resolved config as YAML, atomically, on the main rank only (None elsewhere)."""
    if not _is_main():
        return None
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target
