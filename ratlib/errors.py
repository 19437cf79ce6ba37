"""``RatlibError``, the base of every error ratlib raises, and the one helper that words their messages.

Every ratlib error also derives from the builtin it refines (``CocoPathError(RatlibError,
FileNotFoundError)``), so ``except FileNotFoundError`` in user code keeps working.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

__all__ = ["MissingDependencyError", "RatlibError", "TorchVersionError", "message", "require_torch", "torch_version"]

# The oldest torch ratlib supports (pyproject.toml: torch>=2.3, tested by .ci/run's oldest-torch step). A feature
# that needs a newer one calls require_torch() first, so an older torch gets a TorchVersionError, not an
# AttributeError from deep inside torch.
OLDEST_TORCH = "2.3"


class RatlibError(Exception):
    """Base class of every error ratlib raises."""


class MissingDependencyError(RatlibError, ImportError):
    """An optional dependency a ratlib feature needs is not installed; the message gives the pip command."""


class TorchVersionError(RatlibError, RuntimeError):
    """A feature of ratlib needs a newer torch than the one installed; the message names both versions."""


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


def torch_version() -> tuple[int, int] | None:
    """The installed torch's (major, minor), read without importing torch; None when torch is not installed."""
    text: str | None
    try:
        text = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source build without metadata: ask the module itself
        text = getattr(sys.modules.get("torch"), "__version__", None)
    if not text:
        return None
    m = re.match(r"(\d+)\.(\d+)", str(text))
    return (int(m.group(1)), int(m.group(2))) if m else None


def require_torch(minimum: str, feature: str) -> None:
    """Raise :class:`TorchVersionError` unless the installed torch is at least ``minimum`` (``"2.6"``).

    ``feature`` names what needs it, in the message: ``require_torch("2.6", "FSDP2 (fully_shard)")``.
    """
    have = torch_version()
    need = tuple(int(x) for x in minimum.split(".")[:2])
    if have is not None and have < need:
        raise TorchVersionError(
            message(
                f"{feature} needs torch >= {minimum}",
                got=f"torch {have[0]}.{have[1]}",
                fix=f"pip install 'torch>={minimum}' (the rest of ratlib works with torch >= {OLDEST_TORCH})",
            )
        )
