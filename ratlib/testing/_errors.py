"""The errors of ``ratlib.testing``: its strategies' and ``run_on_ranks``' arguments, and a failed run."""

from __future__ import annotations

from ratlib.errors import RatlibError

__all__ = ["RankRunError", "RankRunFailedError", "RankScriptNotFoundError", "StrategyArgumentError"]


class StrategyArgumentError(RatlibError, ValueError):
    """A hypothesis strategy of ``ratlib.testing.strategies`` was given arguments no draw can satisfy."""


class RankRunError(RatlibError, ValueError):
    """``run_on_ranks`` was given a target, launcher or world size it cannot run."""


class RankScriptNotFoundError(RankRunError, FileNotFoundError):
    """``run_on_ranks``: the script path does not exist."""


class RankRunFailedError(RatlibError, AssertionError):
    """``RankRun.check()``: a rank exited non-zero or hung. An ``AssertionError``, so pytest reports a failure."""
