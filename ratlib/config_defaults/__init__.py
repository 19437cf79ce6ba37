"""Training configs with complete defaults, strict validation, overrides, risk checks and a DeepSpeed bridge.

``load_config("exp.yaml", overrides=["training.optimizer.lr=3e-4"])`` merges the file over complete
defaults, reads ``1e-4`` as a float (YAML 1.1 would hand over the string "1e-4"), and rejects wrong
types, out-of-range values and unknown keys in known sections, all of them in one ``ConfigError`` that
names each key path, its line (or override), the value, what was expected and the closest known key.
Project sections (``model``, ``data``, ...) pass through, or are validated by a schema the project
supplies::

    class SegModel(ModelConfig):
        model_config = ConfigDict(extra="forbid")
        feature_dims: int = 32

    class SegConfig(ExperimentConfig):
        model: SegModel = SegModel()

    cfg = load_config("seg.yaml", schema=SegConfig)

The package: ``schema`` (the sections, a docstring per field), ``load`` (YAML, overrides, messages,
``load_config``, ``dump_config``), ``describe`` (what the schema says about a key, for the messages),
``checks`` (``check_config``, ``register_check``), ``deepspeed`` (``to_deepspeed_config``), ``args``
(``parse_args``, a training script's command line; ``UsageError``). Every public name is importable from here.
What the training section means at run time (``make_stepper``, ``Stepper``, the optimiser and schedule
builders) is ``ratlib.strategy``, and the memory estimate and probe live in ``ratlib.memory``: the old names
here warn and forward for one release. Imports pydantic and PyYAML only.
"""

from __future__ import annotations

from ratlib.config_defaults.args import UsageError, parse_args
from ratlib.config_defaults.checks import Check, Finding, check_config, register_check, unregister_check
from ratlib.config_defaults.deepspeed import to_deepspeed_config
from ratlib.config_defaults.load import dump_config, load_config
from ratlib.config_defaults.schema import (
    SMOKE_DEFAULTS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    DistributedConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrackingConfig,
    TrainingConfig,
)

__all__ = [
    "SMOKE_DEFAULTS",
    "Check",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DistributedConfig",
    "EvalConfig",
    "ExperimentConfig",
    "Finding",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrackingConfig",
    "TrainingConfig",
    "UsageError",
    "check_config",
    "dump_config",
    "load_config",
    "parse_args",
    "register_check",
    "to_deepspeed_config",
    "unregister_check",
]


# Names that moved out of config_defaults (issue 31), with their new module: they warn and forward for one release.
MOVED = {
    **dict.fromkeys(
        ("Stepper", "autocast_for", "loss_weight", "lr_lambda", "make_optimizer", "make_scheduler", "make_sentinel",
         "make_stepper", "memory_format_for", "report_findings", "train_sampler"),
        "ratlib.strategy",
    ),
    **dict.fromkeys(
        ("MemoryEstimate", "MemoryProbe", "count_parameters", "estimate_model_memory", "probe_memory"),
        "ratlib.memory",
    ),
}  # fmt: skip


def forward_moved(module: str, name: str) -> object:
    """``module.name`` of a name in ``MOVED``: its new home's, with a ``DeprecationWarning``; else AttributeError."""
    if name not in MOVED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(
        f"{module}.{name} moved to {MOVED[name]}.{name}; the old name goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(MOVED[name]), name)


def __getattr__(name: str) -> object:
    return forward_moved(__name__, name)
