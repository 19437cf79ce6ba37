"""The config schema: one pydantic model per section, a docstring per field (``Field.description``).

Every key has a default, so a config file only says what differs. Numbers may come as strings
(``"1e-4"``, ``"48"``: YAML 1.1 and environment variables give strings) and are read as numbers; a
boolean given for a number is an error (pydantic alone would take ``batch_size: yes`` as 1). The one
cross-field rule of ratlib's own sections (cosine: ``min_lr`` below ``lr``) is a model validator of
``TrainingConfig``; ``load_config`` reports it together with the field errors (see docs/config_defaults.md).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ratlib.errors import RatlibError

__all__ = [
    "SMOKE_DEFAULTS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DistributedConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainingConfig",
]

#: What ``smoke: true`` fills in. In a file: for the keys the file does not set. On the command line
#: (``smoke=true`` as an override): for every key here that no other override sets, file values included.
SMOKE_DEFAULTS: dict[str, int] = {"data.limit": 16, "training.max_steps": 10, "training.num_epochs": 1}


class ConfigError(RatlibError, ValueError):
    """A config is invalid. ``problems`` lists ``(key path, message)`` pairs, one per bad key; the
    message names each with its line (or override), the value, what was expected and the fix."""

    def __init__(self, message: str, problems: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = list(problems)


def _number(value: Any) -> Any:
    """Before numeric validation: read numeric strings such as "1e-4" or "48"."""
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
    """Base of every config section: a boolean given for a number is an error, also in the fields of
    project subclasses. Attribute docstrings become the fields' descriptions."""

    model_config = ConfigDict(use_attribute_docstrings=True)

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
    """``training.optimizer``."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """The optimiser: AdamW (decoupled weight decay), Adam (L2 penalty) or SGD with momentum."""
    lr: Float = Field(default=1e-4, gt=0)
    """The peak learning rate (after warmup); scale it with the global batch."""
    weight_decay: Float = Field(default=0.01, ge=0)
    """Weight decay (AdamW: decoupled; Adam and SGD: an L2 penalty)."""
    betas: tuple[Float, Float] = (0.9, 0.999)
    """Adam and AdamW: the decay rates of the first and second moment."""
    momentum: Float = Field(default=0.9, ge=0, lt=1)
    """SGD: the momentum (0: plain SGD)."""


class SchedulerConfig(_Section):
    """``training.scheduler``: the learning rate over the epochs."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    """cosine (from lr down to min_lr), step (times gamma every step_size epochs) or constant."""
    min_lr: Float = Field(default=1e-6, ge=0)
    """cosine: the learning rate at the end; must be below training.optimizer.lr."""
    warmup_epochs: Float = Field(default=0.0, ge=0)
    """Linear warmup from 0 over this many epochs (fractions allowed); 0: none."""
    step_size: Int = Field(default=30, gt=0)
    """step: epochs between decays."""
    gamma: Float = Field(default=0.1, gt=0, le=1)
    """step: the decay factor."""


class DeepSpeedConfig(_Section):
    """``training.deepspeed``: ZeRO through DeepSpeed instead of plain DDP."""

    enabled: bool = False
    """Train through a DeepSpeed engine (``to_deepspeed_config`` builds its config)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also the weights."""
    offload: bool = False
    """Keep optimizer state (and at stage 3 the weights) in CPU memory; needs stage 1 or higher."""


class NumericsConfig(_Section):
    """``training.numerics``: the first non-finite loss or gradient on any rank, and weights that drift apart
    across ranks (``ratlib.numerics``)."""

    policy: Literal["raise", "skip", "stop", "off"] = "raise"
    """raise (every rank stops at the faulty step), skip (every rank skips that optimiser step), stop (checkpoint
    and exit like a preemption; needs training.preemption) or off. Not under DeepSpeed, which skips its own."""
    drift_every: Int | None = Field(default=100, gt=0)
    """Optimiser steps between the checks that every rank holds the same weights; null: never."""
    max_skips: Int = Field(default=10, gt=0)
    """skip: this many skipped steps in a row raise."""
    exclude: list[str] = []
    """Name patterns (fnmatch) of parameters and buffers that are rank-local by design: not compared."""

    @field_validator("policy", mode="before")
    @classmethod
    def _off_is_false(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` (and `policy=off` on the command line) as false
        return "off" if value is False else value


class TrainingConfig(_Section):
    """``training``: the loop's settings."""

    num_epochs: Int = Field(default=10, gt=0)
    """Epochs to train (``max_steps`` may stop earlier)."""
    batch_size: Int = Field(default=48, gt=0)
    """Samples per device per step, not global: the global batch is batch_size x accumulation x ranks."""
    gradient_accumulation_steps: Int = Field(default=1, gt=0)
    """Micro-batches per optimiser step."""
    global_batch_size: Int | None = Field(default=None, gt=0)
    """The job's samples per optimiser step, the same whatever the number of ranks (a resume on another
    number of ranks sees the same batches); ``batch_size`` is then the largest micro-batch per device and the
    accumulation follows from both. null: ``batch_size`` per device."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The optimiser."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """The learning-rate schedule."""
    mixed_precision: bool | Literal["bf16", "fp16"] = True
    """Autocast: true (bf16 on CUDA), "bf16", "fp16" (with a loss scaler) or false (fp32)."""
    gradient_clip: Float | None = Field(default=1.0, gt=0)
    """The maximum gradient norm; null: no clipping."""
    seed: Int = Field(default=0, ge=0)
    """The seed of weights, sampling and augmentation."""
    compile: bool = False
    """torch.compile the model (faster steps after a compile of tens of seconds)."""
    channels_last: bool | None = None
    """channels_last memory format for images; null: true on CUDA, false on the CPU."""
    strategy: Literal["ddp", "fsdp2", "deepspeed"] = "ddp"
    """How several ranks share the work (``ratlib.strategy``): ddp (each rank a whole copy), fsdp2 (weights,
    gradients and optimiser state sharded by ``fully_shard``; checkpoints become sharded folders) or deepspeed
    (ZeRO, ``training.deepspeed``). One process trains the bare model whichever is set."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed ZeRO (``training.deepspeed.enabled: true`` is the same as ``training.strategy: deepspeed``)."""
    max_steps: Int | None = Field(default=None, gt=0)
    """Stop after this many optimiser steps; null: train every epoch."""
    log_every: Int = Field(default=10, gt=0)
    """Optimiser steps between log lines."""
    memory_warning_fraction: Float = Field(default=0.9, gt=0, le=1)
    """Warn when a rank's peak memory passes this fraction of its device's."""
    preemption: bool = True
    """Stop every rank at one step on SIGTERM/SIGUSR1 (``ratlib.preempt``), write a mid-epoch checkpoint, exit 75."""
    numerics: NumericsConfig = NumericsConfig()
    """Non-finite values and drifting weights, checked at every step (``ratlib.numerics``)."""
    resume: bool | Literal["auto"] = False
    """Continue from the latest checkpoint: true (warn when there is none), "auto" (silently start anew when
    there is none: what a requeued Slurm job or a torchrun restart needs) or false."""

    @model_validator(mode="after")
    def _one_strategy(self) -> TrainingConfig:
        # training.deepspeed.enabled came first: it still selects DeepSpeed, and the two never disagree.
        chosen = "strategy" in self.model_fields_set and self.strategy != "deepspeed"
        if self.deepspeed.enabled and chosen:
            raise PydanticCustomError(
                "strategy_conflict",
                "got {s} with training.deepspeed.enabled=true: set training.strategy=deepspeed (enabled is then "
                "implied), or training.deepspeed.enabled=false",
                {"key": "strategy", "uses": "strategy deepspeed.enabled", "s": self.strategy},
            )
        if self.deepspeed.enabled:
            self.__dict__["strategy"] = "deepspeed"
        elif self.strategy == "deepspeed":
            self.deepspeed.__dict__["enabled"] = True
        return self

    @model_validator(mode="after")
    def _global_batch_alone(self) -> TrainingConfig:
        if self.global_batch_size is not None and self.gradient_accumulation_steps != 1:
            raise PydanticCustomError(
                "accumulation_with_global_batch",
                "got {accum}; with training.global_batch_size={g} the accumulation follows from it, the number of "
                "ranks and batch_size (the largest micro-batch): leave gradient_accumulation_steps at 1",
                {"key": "gradient_accumulation_steps", "uses": "gradient_accumulation_steps global_batch_size",
                 "accum": self.gradient_accumulation_steps, "g": self.global_batch_size},
            )  # fmt: skip
        if self.global_batch_size is not None and self.deepspeed.enabled:
            raise PydanticCustomError(
                "deepspeed_with_global_batch",
                "got {g}; DeepSpeed needs the same micro-batch on every rank (train_batch_size = micro x "
                "accumulation x ranks), which a fixed global batch over any number of ranks cannot promise: "
                "set training.global_batch_size=null, or training.deepspeed.enabled=false",
                {
                    "key": "global_batch_size",
                    "uses": "global_batch_size deepspeed.enabled",
                    "g": self.global_batch_size,
                },
            )
        return self

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainingConfig:
        if self.scheduler.name == "cosine" and self.scheduler.min_lr >= self.optimizer.lr:
            raise PydanticCustomError(
                "min_lr_not_below_lr",
                "got {min_lr}; the cosine schedule needs min_lr below training.optimizer.lr={lr}: "
                "lower min_lr (e.g. lr/100) or raise lr",
                # key: where to report it; uses: the keys it reads (relative to this section), so that
                # load_config can report it next to field errors of other keys.
                {
                    "key": "scheduler.min_lr",
                    "uses": "scheduler.min_lr scheduler.name optimizer.lr",
                    "min_lr": self.scheduler.min_lr,
                    "lr": self.optimizer.lr,
                },
            )
        return self


class TrackingConfig(_Section):
    """``tracking``: where metrics go (``ratlib.tracking.Tracker``, main rank only)."""

    backends: list[str] = ["jsonl", "tensorboard"]
    """Backends: jsonl (metrics.jsonl), tensorboard, wandb, mlflow; a missing package is left out with one line."""


class DistributedConfig(_Section):
    """``distributed``: process-group settings (``ratlib.dist_init.init_distributed``)."""

    backend: Literal["gloo", "nccl"] | None = None
    """The backend; null: nccl with CUDA, else gloo."""
    timeout_s: Float = Field(default=1800.0, gt=0)
    """Seconds a collective may wait before it fails."""
    connect_timeout_s: Float | None = Field(default=None, gt=0)
    """Seconds the rendezvous may take before the set-up fails naming the master; null: the environment's
    ``RATLIB_CONNECT_TIMEOUT``, else 120."""
    stall_timeout_s: Float | None = Field(default=None, gt=0)
    """The ``ratlib.hang`` watchdog: seconds without a heartbeat before stacks are dumped; null: off."""


class EvalConfig(_Section):
    """``eval``: when and how the loop evaluates (``ratlib.strategy.eval_loader``)."""

    batch_size: Int | None = Field(default=None, gt=0)
    """Evaluation batch per rank; null: training.batch_size."""
    every_epochs: Int = Field(default=1, gt=0)
    """Evaluate after every N-th epoch; the last epoch is always evaluated."""


class CheckpointConfig(_Section):
    """``checkpoint``: the run folder's checkpoints (``ratlib.checkpoint.RunCheckpoints``)."""

    keep: Int | None = Field(default=3, gt=0)
    """The newest N checkpoints are kept, older ones deleted after a new one is committed; null: all."""


class DataConfig(_Base):
    """``data``: known data keys; unknown ones pass through unless a project subclass forbids them."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    root: str | None = None
    """The dataset folder; null: the example's synthetic data."""
    limit: Int | None = Field(default=None, gt=0)
    """Use only the first N samples of every split (smoke runs); null: all."""
    num_workers: Int = Field(default=2, ge=0)
    """DataLoader worker processes per rank."""


class ModelConfig(_Base):
    """``model``: passes through unless a project subclass validates it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class ExperimentConfig(_Section):
    """The whole experiment. Unknown top-level sections pass through (as dicts) unless their name is
    close to a known key (a typo such as ``trainig``), which is an error."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    output_dir: str = "runs/default"
    """The run folder: resolved config, logs, metrics, checkpoints."""
    smoke: bool = False
    """Fill data.limit, training.max_steps and training.num_epochs with small values (SMOKE_DEFAULTS):
    in a file, for the keys the file leaves out; on the command line, over the file's values too."""
    training: TrainingConfig = TrainingConfig()
    """The loop."""
    distributed: DistributedConfig = DistributedConfig()
    """The process group."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment tracking."""
    eval: EvalConfig = EvalConfig()
    """Evaluation during training."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoints in the run folder."""
    data: DataConfig = DataConfig()
    """The data (project keys pass through)."""
    model: ModelConfig = ModelConfig()
    """The model (project keys pass through)."""
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
