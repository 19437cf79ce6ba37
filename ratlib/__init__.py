"""ratlib: rank-safe training utilities for PyTorch.

Public names are imported lazily (PEP 562), so ``import ratlib`` stays cheap and
never imports torch, torchvision, deepspeed, pycocotools, nibabel or matplotlib.
Heavy dependencies are loaded only inside the functions that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = (
    "rank_logger",
    "dist_init",
    "comm",
    "coco_paths",
    "config_defaults",
    "strategy",
    "script",
    "hang",
    "preempt",
    "numerics",
    "checkpoint",
    "memory",
    "tracking",
    "synthetic",
    "doctor",
    "cli",
    "testing",
)

# public name -> submodule that defines it
_EXPORTS = {
    # errors (the base of every error ratlib raises: `except ratlib.RatlibError`)
    "RatlibError": "errors",
    # rank_logger
    "setup_logging": "rank_logger",
    "get_logger": "rank_logger",
    "rank_zero_only": "rank_logger",
    "progress": "rank_logger",
    # dist_init
    "detect_launch_env": "dist_init",
    "init_distributed": "dist_init",
    "distributed": "dist_init",
    "DistInfo": "dist_init",
    "LaunchEnv": "dist_init",
    "DistInitError": "dist_init",
    "get_rank": "dist_init",
    "get_world_size": "dist_init",
    "is_main_process": "dist_init",
    "barrier": "dist_init",
    "main_process_first": "dist_init",
    "shutdown": "dist_init",
    # comm
    "all_reduce_mean": "comm",
    "reduce_dict": "comm",
    "gather_object": "comm",
    "all_gather_object": "comm",
    "broadcast_object": "comm",
    # coco_paths
    "parse_split": "coco_paths",
    "annotation_filename": "coco_paths",
    "resolve_coco": "coco_paths",
    "CocoSplit": "coco_paths",
    "CocoPaths": "coco_paths",
    "CocoPathError": "coco_paths",
    # config_defaults
    "load_config": "config_defaults",
    "check_config": "config_defaults",
    "to_deepspeed_config": "config_defaults",
    "dump_config": "config_defaults",
    "ExperimentConfig": "config_defaults",
    "ConfigError": "config_defaults",
    "Finding": "config_defaults",
    "ModelConfig": "config_defaults",
    "DataConfig": "config_defaults",
    "TrainingConfig": "config_defaults",
    "register_check": "config_defaults",
    # hang
    "heartbeat": "hang",
    "HangError": "hang",
    "CollectiveMismatchError": "hang",
    # checkpoint (save/load/latest stay under ratlib.checkpoint: the names are too generic here)
    "CheckpointError": "checkpoint",
    # memory
    "memory_report": "memory",
    "reset_peak_memory": "memory",
    "MemoryReport": "memory",
    "estimate_model_memory": "memory",
    "probe_memory": "memory",
    # numerics
    "Sentinel": "numerics",
    "NumericalError": "numerics",
    # tracking
    "Tracker": "tracking",
    "TrackingError": "tracking",
}

__all__ = ["__version__", *_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ratlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _install_hang(**kwargs: Any) -> None:
    """What ``init_distributed(stall_timeout=..., check_collectives=...)`` calls: ``ratlib.hang.install``,
    imported only then. dist_init sits below hang and never imports it; the package wires the two here."""
    from ratlib.hang import install

    install(**kwargs)


from ratlib import dist_init as _dist_init  # noqa: E402  (torch-free; needs the names above)

_dist_init.set_hang_install(_install_hang)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import (
        checkpoint,
        cli,
        coco_paths,
        comm,
        config_defaults,
        dist_init,
        doctor,
        hang,
        memory,
        numerics,
        preempt,
        rank_logger,
        synthetic,
        testing,
        tracking,
    )
    from .checkpoint import CheckpointError
    from .coco_paths import CocoPathError, CocoPaths, CocoSplit, annotation_filename, parse_split, resolve_coco
    from .comm import all_gather_object, all_reduce_mean, broadcast_object, gather_object, reduce_dict
    from .config_defaults import (
        ConfigError,
        DataConfig,
        ExperimentConfig,
        Finding,
        ModelConfig,
        TrainingConfig,
        check_config,
        dump_config,
        load_config,
        register_check,
        to_deepspeed_config,
    )
    from .dist_init import (
        DistInfo,
        DistInitError,
        LaunchEnv,
        barrier,
        detect_launch_env,
        distributed,
        get_rank,
        get_world_size,
        init_distributed,
        is_main_process,
        main_process_first,
        shutdown,
    )
    from .errors import RatlibError
    from .hang import CollectiveMismatchError, HangError, heartbeat
    from .memory import MemoryReport, estimate_model_memory, memory_report, probe_memory, reset_peak_memory
    from .numerics import NumericalError, Sentinel
    from .rank_logger import get_logger, progress, rank_zero_only, setup_logging
    from .tracking import Tracker, TrackingError
