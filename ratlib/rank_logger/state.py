"""The logger's process-wide state and the rank it logs as: ``ratlib.launch.rank_state()``'s, cached, and read
again when the process group appears or goes away.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from ratlib.launch import process_group, rank_state

__all__ = ["current_rank", "log_file_path", "rank_tag"]

# ----------------------------------------------------------------------------------------------
# Rank discovery


class _State:
    """Process-wide logging state; one instance, read on the hot path."""

    def __init__(self) -> None:
        self.rank = 0
        self.world = 1
        self.known = False  # False: not resolved yet, or the launcher variables were invalid
        self.resolved = False
        self.tag = ""  # "[rank R/W] " when world > 1, cached for the formatter
        self.from_dist = False
        self.level = logging.INFO
        self.other_ranks = logging.WARNING
        self.drop_below = 0  # a call below this level with main_process_only=True returns at once
        self.log_dir: Path | None = None
        self.handlers: list[logging.Handler] = []
        self.file_handler: logging.FileHandler | None = None  # streams._RankFileHandler (streams imports this module)
        self.hooks_installed = False
        self.configured = False


_STATE = _State()
_LOCK = threading.Lock()


_dist_module = process_group  # the one definition is ratlib.launch's


def _resolve() -> None:
    state = rank_state()  # warns once (logger ratlib.launch) when the launcher variables are invalid
    _STATE.rank, _STATE.world, _STATE.known, _STATE.from_dist = state.rank, state.world_size, state.known, state.group
    _STATE.resolved = True
    if _STATE.world == 1:
        _STATE.tag = ""
    else:
        _STATE.tag = f"[rank {_STATE.rank}/{_STATE.world}] " if _STATE.rank >= 0 else "[rank ?/?] "
    _update_drop()


def _refresh() -> None:
    """Re-resolve when the process group appeared or went away since the last look."""
    if not _STATE.resolved:
        _resolve()
    elif "torch.distributed" in sys.modules or _STATE.from_dist:
        if (_dist_module() is not None) != _STATE.from_dist:
            _resolve()


def _update_drop() -> None:
    non_main = _STATE.known and _STATE.rank != 0
    files = _STATE.log_dir is not None
    _STATE.drop_below = _STATE.other_ranks if non_main and not files else 0


def current_rank() -> tuple[int, int]:
    """``(rank, world_size)`` as the logger sees them; ``(-1, -1)`` when the launcher variables are invalid."""
    _refresh()
    return _STATE.rank, _STATE.world


def rank_tag() -> str:
    """``"[rank R/W]"``; ``"[rank ?/?]"`` when unknown."""
    rank, world = current_rank()
    return f"[rank {rank}/{world}]" if rank >= 0 else "[rank ?/?]"


def log_file_path() -> Path | None:
    """This rank's log file when ``setup_logging(log_dir=...)`` is active, else None."""
    if _STATE.log_dir is None:
        return None
    if _STATE.file_handler is not None and _STATE.file_handler.stream is not None:
        return Path(_STATE.file_handler.baseFilename)
    rank, _ = current_rank()
    return _STATE.log_dir / f"rank{rank if rank >= 0 else 'unknown'}.log"
