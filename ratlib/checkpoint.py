"""Checkpoints that survive a crash mid-save and load the same on every rank.

- :func:`save`: the main rank writes ``state`` to a temporary file beside ``path``, fsyncs it, renames
  it over ``path`` and fsyncs the folder; a process killed at any point leaves the previous checkpoint
  (and ``path`` itself, when it is overwritten) intact. The other ranks write nothing and, by default,
  wait in a barrier so that a load that follows sees the file.
- :func:`load`: every rank reads the file onto ``map_location``; a missing or unreadable file is a
  :class:`CheckpointError` that lists the checkpoints that do exist.
- :func:`latest`: the newest checkpoint in a folder, by the numbers in the file names (``epoch9`` before
  ``epoch10``), temporary files ignored.
- :func:`rng_state` / :func:`set_rng_state`: the Python, NumPy and torch (CPU and CUDA) generators of
  every rank, so that a resumed run draws the same random numbers as an uninterrupted one.
- :func:`unwrap_model`: the module inside DDP, DeepSpeed or ``torch.compile`` wrappers, whose
  ``state_dict()`` keys have no ``module.`` or ``_orig_mod.`` prefix.

torch is imported inside the functions, so ``import ratlib.checkpoint`` stays cheap.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ratlib.io import TMP_PREFIX, write_atomic

__all__ = ["CheckpointError", "latest", "load", "rng_state", "save", "set_rng_state", "unwrap_model"]


# Test hook: called with the temporary path after it is written and fsynced, before the rename.
_before_rename: Callable[[Path], None] | None = None


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing or cannot be read; the message lists the checkpoints that exist."""


def _is_main() -> bool:
    from ratlib.launch import is_main_process

    return is_main_process()


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


def save(state: Mapping[str, Any], path: str | os.PathLike[str], *, keep: int | None = None, sync: bool = True) -> Path:
    """Write ``state`` to ``path`` on the main rank, atomically; returns ``path``.

    ``keep``: after the save, delete the oldest files of the same name pattern (the name with its numbers
    replaced by a wildcard, e.g. ``epoch*.pt``) so that ``keep`` remain. ``sync``: all ranks wait for the
    write (a barrier; call ``save`` on every rank). With ``sync=False`` only the main rank need call it.
    """
    import torch

    path = Path(path)
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"checkpoint.save: keep={keep!r}; expected a whole number >= 1 or None (keep all)")
    if _is_main():
        # Looked up at call time, so that tests can set the hook on this module.
        write_atomic(path, lambda f: torch.save(dict(state), f), before_rename=_before_rename)
        if keep is not None:
            _prune(path, keep)
    if sync:
        from ratlib.dist_init import barrier

        barrier()
    return path


def _prune(path: Path, keep: int) -> None:
    pattern = re.sub(r"\d+", "*", path.name)
    if pattern == path.name:  # a fixed name such as last.pt: nothing to rotate
        return
    files = [p for p in sorted(path.parent.glob(pattern), key=_natural_key) if not p.name.startswith(TMP_PREFIX)]
    for old in files[:-keep]:
        old.unlink(missing_ok=True)


def latest(directory: str | os.PathLike[str], pattern: str = "*.pt") -> Path | None:
    """The newest checkpoint in ``directory`` matching ``pattern``, or None when there is none.

    Newest means the highest numbers in the name (``step900`` < ``step1000``); files with equal numbers
    are ordered by name. Temporary files of an interrupted :func:`save` are never returned.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return None
    files = [p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(TMP_PREFIX)]
    return max(files, key=_natural_key) if files else None


def load(path: str | os.PathLike[str], map_location: Any = "cpu", *, weights_only: bool = False) -> dict[str, Any]:
    """Read a checkpoint on this rank (call it on every rank). ``map_location`` as in ``torch.load``.

    ``weights_only=False`` by default because a training checkpoint holds RNG states and a config;
    load only files you wrote yourself.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist ({_listing(path.parent, '*.pt')}). "
            "Give an existing file, or use ratlib.checkpoint.latest(folder) to find one."
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
            f"it may be truncated or not a torch checkpoint. {_listing(path.parent, '*.pt')}; "
            "load an earlier one."
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, expected the dict that ratlib.checkpoint.save writes"
        )
    return state


def rng_state() -> dict[str, Any]:
    """The random generators of every rank: ``{"world_size": W, "ranks": [state of rank 0, ...]}``.

    A collective when a process group exists: call it on every rank. Put the result in the checkpoint.
    """
    import numpy as np
    import torch

    from ratlib.comm import all_gather_object

    mine: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state_all()
    ranks = all_gather_object(mine)
    return {"world_size": len(ranks), "ranks": ranks}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore this rank's generators from :func:`rng_state`'s result.

    With another world size than the one saved, the ranks cannot be matched one to one: each rank then
    takes saved rank ``rank % saved_world_size`` and a warning says so.
    """
    import numpy as np
    import torch

    from ratlib.launch import get_rank, get_world_size

    ranks = state.get("ranks") if isinstance(state, Mapping) else None
    if not ranks:
        raise ValueError(
            "set_rng_state: expected the dict that ratlib.checkpoint.rng_state() returns "
            f"({{'world_size': W, 'ranks': [...]}}), got {type(state).__name__}"
        )
    rank, world = get_rank(), get_world_size()
    if len(ranks) != world:
        from ratlib.rank_logger import get_logger

        get_logger(__name__).warning(
            "RNG states were saved by %d rank(s), this job has %d: rank %d takes "
            "saved rank %d's; random draws will differ from an uninterrupted run",
            len(ranks),
            world,
            rank,
            rank % len(ranks),
        )
    mine = ranks[rank % len(ranks)]
    random.setstate(mine["python"])
    np.random.set_state(mine["numpy"])
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        cuda = mine["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def unwrap_model(model: Any) -> Any:
    """The plain module inside DDP / FSDP-style ``.module`` wrappers, DeepSpeed engines and
    ``torch.compile``'s ``_orig_mod``, so that saved keys load into an unwrapped model."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"}:
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
    return model
