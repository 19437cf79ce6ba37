"""Moved: the training mechanics are ``ratlib.strategy``; ``parse_args`` and ``UsageError`` are in
``ratlib.config_defaults``. The old names here warn and forward for one release."""

from __future__ import annotations

import warnings
from typing import Any

_MOVED_TO_STRATEGY = {
    "Stepper",
    "autocast_for",
    "loss_weight",
    "lr_lambda",
    "make_optimizer",
    "make_scheduler",
    "make_sentinel",
    "make_stepper",
    "memory_format_for",
    "report_findings",
    "train_sampler",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_STRATEGY:
        import ratlib.strategy

        warnings.warn(
            f"ratlib.config_defaults.training.{name} moved to ratlib.strategy.{name}; the old name goes in the "
            "next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(ratlib.strategy, name)
    if name in {"UsageError", "parse_args"}:
        from ratlib.config_defaults import args

        warnings.warn(
            f"ratlib.config_defaults.training.{name} moved to ratlib.config_defaults.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(args, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
