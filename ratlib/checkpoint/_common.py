"""What every part of ``ratlib.checkpoint`` shares: its errors, the order of checkpoint names, the listing of a
folder's checkpoints in messages, the synchronisation timeout, and the wording of torch's load errors. The
other modules import these from here (``files`` re-exports them), so that none imports another in a circle."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ratlib.errors import RatlibError, message
from ratlib.io import TMP_PREFIX

__all__ = [
    "SYNC_TIMEOUT_ENV",
    "CheckpointArgumentError",
    "CheckpointError",
    "CheckpointNotFoundError",
]


class CheckpointError(RatlibError, OSError):
    """A checkpoint that cannot be used: missing, damaged, refused by ``weights_only=True``, or a ``save`` whose
    synchronisation failed. The message names the file and the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``); the message lists those that do."""


class CheckpointArgumentError(RatlibError, ValueError):
    """A checkpoint function was given an argument it cannot use (``keep=0``, a state that is not ``rng_state``'s)."""


def _natural_key(path: Path) -> tuple[Any, ...]:
    parts = re.split(r"(\d+)", path.name)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p)


def _listing(folder: Path, pattern: str) -> str:
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    found = [p.name for p in sorted(folder.glob(pattern), key=_natural_key) if not p.name.startswith(TMP_PREFIX)]
    if not found:
        return f"no {pattern} files in {folder}"
    shown = ", ".join(found[-8:])
    return f"{len(found)} {pattern} file(s) in {folder}: {'..., ' if len(found) > 8 else ''}{shown}"


SYNC_TIMEOUT_ENV = "RATLIB_SYNC_TIMEOUT"
_DEFAULT_SYNC_TIMEOUT = 60.0


def _sync_timeout(given: float | None) -> float:
    if given is not None:
        return float(given)
    text = os.environ.get(SYNC_TIMEOUT_ENV, "")
    try:
        return float(text) if text.strip() else _DEFAULT_SYNC_TIMEOUT
    except ValueError as exc:
        raise CheckpointArgumentError(
            message(f"{SYNC_TIMEOUT_ENV}={text!r} is not a number of seconds", fix=f"e.g. {SYNC_TIMEOUT_ENV}=300")
        ) from exc


def _short(exc: BaseException) -> str:
    """One line of torch's error: the unpickler's own reason, not its paragraph about weights_only."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)[:300]


def _refused_types(path: Path | Any, exc: BaseException) -> list[str]:
    """The globals that the safe unpickler refused (read from the file, else from torch's message); none for a
    file that is damaged rather than refused."""
    import torch

    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - an old torch, or a file it cannot scan: fall back to the message
        found = []
    # torch >= 2.4 words it "Unsupported global: GLOBAL x.y", torch 2.2 and 2.3 "Unsupported class x.y"
    return found or [m.rstrip(".") for m in re.findall(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(exc))]
