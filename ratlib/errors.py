"""``RatlibError``, the base of every error ratlib raises, and the one helper that words their messages.

Every ratlib error also derives from the builtin it refines (``CocoPathError(RatlibError,
FileNotFoundError)``), so ``except FileNotFoundError`` in user code keeps working.
"""

from __future__ import annotations

__all__ = ["MissingDependencyError", "RatlibError", "message"]


class RatlibError(Exception):
    """Base class of every error ratlib raises."""


class MissingDependencyError(RatlibError, ImportError):
    """An optional dependency a ratlib feature needs is not installed; the message gives the pip command."""


def message(problem: str, *, got: str | None = None, expected: str | None = None, fix: str | None = None) -> str:
    """One error message, worded the same everywhere: the problem, what was read, what was expected, the fix.

    >>> message("MASTER_PORT is not a TCP port", got="MASTER_PORT='99999'", fix="choose a port below 65536")
    "MASTER_PORT is not a TCP port. Got: MASTER_PORT='99999'. Fix: choose a port below 65536."
    """
    parts = [problem.rstrip(".")]
    if got is not None:
        parts.append(f"Got: {got}")
    if expected is not None:
        parts.append(f"Expected: {expected}")
    if fix is not None:
        parts.append(f"Fix: {fix}")
    return ". ".join(parts) + "."
