"""Moved: the training mechanics are ``ratlib.strategy``; ``parse_args`` and ``UsageError`` are in
``ratlib.config_defaults``. The old names here warn and forward for one release."""

from __future__ import annotations

from ratlib.config_defaults import MOVED, forward_moved
from ratlib.config_defaults.args import UsageError, parse_args

__all__ = ["UsageError", "parse_args"]


def __getattr__(name: str) -> object:
    if MOVED.get(name) != "ratlib.strategy":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return forward_moved(__name__, name)
