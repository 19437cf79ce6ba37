"""Checkpoints that survive a crash mid-save and load the same on every rank.

- :func:`save`: the main rank writes ``state`` to a temporary file beside ``path``, fsyncs it, renames
  it over ``path`` and fsyncs the folder; a process killed at any point leaves the previous checkpoint
  (and ``path`` itself, when it is overwritten) intact. The other ranks write nothing and, by default,
  wait in a barrier so that a load that follows sees the file. A state holding sharded tensors (FSDP2's
  DTensor, FSDP1's ShardedTensor) is refused on every rank with a :class:`CheckpointError` naming the keys:
  the main rank's copy holds only its own shards.
- :func:`load`: every rank reads the file onto ``map_location`` with ``weights_only=True`` (loading runs no
  code); a missing, unreadable or refused file is a :class:`CheckpointError` that names the file, lists the
  checkpoints that do exist or the refused types, and the fix.
- :func:`latest`: the newest checkpoint in a folder, by the numbers in the file names (``epoch9`` before
  ``epoch10``), temporary files ignored.
- :func:`rng_state` / :func:`set_rng_state`: the Python, NumPy and torch (CPU and CUDA) generators of
  every rank, as plain data (ints, lists, dicts, tensors), so that a resumed run draws the same random numbers
  as an uninterrupted one and the checkpoint loads with ``weights_only=True``.
- :func:`upgrade`: rewrites a checkpoint from before that change (NumPy state as an ndarray) in the plain
  form; also ``python -m ratlib.checkpoint upgrade FILE``.
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

from ratlib.checkpoint._common import (
    SYNC_TIMEOUT_ENV,
    CheckpointArgumentError,
    CheckpointError,
    CheckpointNotFoundError,
    _listing,
    _natural_key,
    _refused_types,
    _short,
    _sync_timeout,
)
from ratlib.checkpoint.ranks import _meet
from ratlib.errors import message
from ratlib.io import TMP_PREFIX, write_atomic

__all__ = [
    "CheckpointArgumentError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "latest",
    "load",
    "rank_entry",
    "rng_state",
    "save",
    "set_rng_state",
    "sharded_keys",
    "unwrap_model",
    "upgrade",
]


# Test hook: called with the temporary path after it is written and fsynced, before the rename.
_before_rename: Callable[[Path], None] | None = None


def _is_main() -> bool:
    from ratlib.launch import is_main_process

    return is_main_process()


def save(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    keep: int | None = None,
    sync: bool = True,
    sync_timeout: float | None = None,
    per_rank: Any = None,
    async_save: bool = False,
) -> Path:
    """Write ``state`` to ``path`` on the main rank, atomically; returns ``path``.

    A ``path`` without the ``.pt`` suffix is a sharded checkpoint folder (every rank writes its shards; any
    state, DTensors included; ``async_save=True`` returns once the state is staged): see
    :func:`ratlib.checkpoint.sharded.save`. The rest of this describes ``.pt`` files.

    ``keep``: after the save, delete the oldest files of the same name pattern (the name with its numbers
    replaced by a wildcard, e.g. ``epoch*.pt``) so that ``keep`` remain. ``sync``: all ranks wait for the
    write (a barrier; call ``save`` on every rank). With ``sync=False`` only the main rank need call it.
    ``sync_timeout``: how long a rank waits for the others to reach this ``save`` before it raises a
    :class:`CheckpointError` naming the ranks that did not (default ``RATLIB_SYNC_TIMEOUT`` or 60 s): a save
    that only some ranks call (inside ``if is_main:``) fails fast instead of waiting for the group's timeout.
    ``per_rank``: this rank's own plain data (its prefetched batch, a loader position, anything that differs by
    rank); every rank passes its own, the file keeps them all under ``"per_rank"`` and :func:`rank_entry`
    gives each rank its own back after ``load``. A collective then: every rank passes one, or none does.
    """
    import torch

    from ratlib.checkpoint import async_save as background

    background.wait_pending()  # the save in flight first; its error, if any, is raised here
    path = Path(path)
    if path.suffix != ".pt" and not path.is_file():  # a folder: the sharded path
        from ratlib.checkpoint import sharded as folder_save

        if not sync:
            raise CheckpointArgumentError(
                message(
                    f"checkpoint.save({str(path)!r}, sync=False): a sharded checkpoint folder is written by every "
                    "rank, so every rank calls save",
                    fix="call it on every rank without sync=False, or give a .pt path for a main-rank file",
                )
            )
        return folder_save.save(
            state, path, keep=keep, sync_timeout=sync_timeout, per_rank=per_rank, async_save=async_save
        )
    if async_save:
        raise CheckpointArgumentError(
            message(
                f"checkpoint.save({str(path)!r}, async_save=True): asynchronous saves write checkpoint folders",
                fix=f"give a folder path (without .pt), e.g. {str(path.with_suffix(''))!r}",
            )
        )
    if per_rank is not None and PER_RANK_KEY in state:
        raise CheckpointArgumentError(
            message(f"checkpoint.save: the state already has a {PER_RANK_KEY!r} key", fix="rename that key")
        )
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise CheckpointArgumentError(
            message(f"checkpoint.save: keep={keep!r}", expected="a whole number >= 1, or None (keep all)")
        )
    sharded = sharded_keys(state)
    if sharded:  # every rank holds only its shards: one rank's file would restore other weights, silently
        raise _refuse_sharded(path, sharded)
    if sync or per_rank is not None:  # every rank is here before anything is written, or none writes
        _arrive("save", path, sync_timeout, per_rank is not None)
    if per_rank is not None:
        from ratlib.comm import gather_object

        entries = gather_object(per_rank)  # the main rank's list by rank; None elsewhere
        state = {**state, PER_RANK_KEY: {"world_size": len(entries or []), "entries": entries}}
    if _is_main():
        # Looked up at call time, so that tests can set the hook on this module.
        write_atomic(path, lambda f: torch.save(dict(state), f), before_rename=_before_rename)
        if keep is not None:
            _prune(path, keep)
    if sync:
        _sync_after_save(path)
    return path


# Tensor types that hold only this rank's part of a tensor (FSDP2 and tensor parallelism: DTensor; FSDP1's
# sharded and local state dicts: ShardedTensor), matched by class name so that no torch.distributed import
# is needed to look.
_SHARDED_TYPES = frozenset({"DTensor", "ShardedTensor", "ShardedTensorBase"})


def sharded_keys(state: Any, prefix: str = "") -> list[str]:
    """The dotted keys of ``state`` (nested dicts, lists and tuples) whose values hold only this rank's shards:
    ``DTensor`` (FSDP2, tensor parallelism) or ``ShardedTensor`` (FSDP1's sharded state dicts)."""
    if any(cls.__name__ in _SHARDED_TYPES for cls in type(state).__mro__):
        return [prefix or "(the state itself)"]
    found: list[str] = []
    if isinstance(state, Mapping):
        items: Any = ((str(k), v) for k, v in state.items())
    elif isinstance(state, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(state))
    else:
        return found
    for key, value in items:
        found += sharded_keys(value, f"{prefix}.{key}" if prefix else key)
    return found


def _refuse_sharded(path: Path, keys: list[str]) -> CheckpointError:
    shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
    return CheckpointError(
        message(
            f"checkpoint.save({str(path)!r}): the state holds sharded tensors (DTensor, ShardedTensor); the main "
            "rank's file would hold only its shards, so nothing was written",
            got=f"sharded: {shown}",
            fix=f"use a folder path (without .pt, e.g. {str(path.with_suffix(''))!r}): every rank writes its "
            "shards; or gather a full state dict: torch.distributed.checkpoint.state_dict.get_state_dict(model, "
            "optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) on every rank, then "
            "save that",
        )
    )


_ARRIVALS: dict[str, int] = {}  # how many saves (and rng_state calls) this process made: the same on every rank


def _arrive(what: str, path: Path | None, timeout: float | None, per_rank: bool = False) -> None:
    """Every rank marks its arrival at this checkpoint call in the rendezvous store and waits for the others,
    at most ``timeout`` seconds. Through the store, not the process group: a peer that never comes is busy in
    another collective (its next step's all-reduce), which a barrier here would meet and corrupt or hang on."""
    from ratlib.comm import StoreChannel
    from ratlib.dist_init import get_world_size

    if get_world_size() == 1:
        return
    seq = _ARRIVALS[what] = _ARRIVALS.get(what, 0) + 1
    call = f"checkpoint.{what}({str(path)!r})" if path is not None else f"checkpoint.{what}()"
    seen = _meet(
        StoreChannel("ratlib-checkpoint", wait_s=_sync_timeout(timeout)),
        "it",
        f"{what}/{seq}",
        [str(path), per_rank],
        call,
        outcome=f", and every rank must call {what}; nothing was written",
        got=f"call #{seq} of {what} in this process",
        fix=f"call {what} on every rank (only the main rank writes; a call inside `if is_main:` leaves the "
        "others in their next collective)"
        + (", or pass sync=False when the main rank alone calls save" if what == "save" else "")
        + f"; raise {SYNC_TIMEOUT_ENV} if a rank is legitimately late",
    )
    if len({p for p, _ in seen}) > 1:
        raise CheckpointError(
            message(
                f"{call}: the ranks' call #{seq} names different files, so they are not at the same save",
                got=", ".join(f"rank {r}: {p}" for r, (p, _) in enumerate(seen)),
                fix="call save with the same path on every rank, the same number of times",
            )
        )
    if len({given for _, given in seen}) > 1:
        raise CheckpointError(
            message(
                f"{call}: some ranks pass per_rank and some do not",
                got="per_rank from rank(s) " + str([r for r, (_, given) in enumerate(seen) if given]),
                fix="pass per_rank on every rank (each its own entry), or on none",
            )
        )


def _sync_after_save(path: Path) -> None:
    """The barrier after a save; a failure there is almost always a ``save`` called on some ranks only."""
    from ratlib.dist_init import barrier, get_rank, get_world_size

    try:
        barrier()
    except Exception as exc:  # noqa: BLE001 - gloo and NCCL raise RuntimeError, DistBackendError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            message(
                f"checkpoint.save({str(path)!r}): the barrier after the save failed on rank "
                f"{get_rank()}/{get_world_size()}; every rank must call save (with sync=True it is a collective)",
                got=f"{type(exc).__name__}: {first}",
                fix="call it on every rank (only the main rank writes), or pass sync=False from the main rank alone",
            )
        ) from exc


def _prune(path: Path, keep: int) -> None:
    pattern = re.sub(r"\d+", "*", path.name)
    if pattern == path.name:  # a fixed name such as last.pt: nothing to rotate
        return
    files = [p for p in sorted(path.parent.glob(pattern), key=_natural_key) if not p.name.startswith(TMP_PREFIX)]
    for old in files[:-keep]:
        old.unlink(missing_ok=True)


def latest(directory: str | os.PathLike[str], pattern: str | None = None) -> Path | None:
    """The newest checkpoint in ``directory`` matching ``pattern``, or None when there is none.

    Checkpoints are files and committed sharded checkpoint folders; ``pattern=None`` means ``*.pt`` files and
    any committed folder. Newest means the highest numbers in the name (``step900`` < ``step1000``); equal
    numbers are ordered by name. Temporary files of an interrupted :func:`save`, and folders whose save did not
    commit, are never returned. An asynchronous save in flight is waited for first.
    """
    from ratlib.checkpoint import async_save, sharded

    async_save.wait_pending()
    folder = Path(directory)
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob(pattern or "*.pt") if p.is_file() and not p.name.startswith(TMP_PREFIX)]
    found += [p for p in folder.glob(pattern or "*") if p.is_dir() and sharded.is_committed(p)]
    return max(found, key=_natural_key) if found else None


_UPGRADE = "python -m ratlib.checkpoint upgrade"


def load(
    path: str | os.PathLike[str],
    map_location: Any = "cpu",
    *,
    weights_only: bool = True,
    into: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint on this rank (call it on every rank). ``map_location`` as in ``torch.load``.

    A folder (or a path without ``.pt``) is a sharded checkpoint: ``into`` is a state holding the target
    tensors (an FSDP2 model's DTensors at any world size, or plain tensors), loaded in place; without it every
    tensor comes back whole. See :func:`ratlib.checkpoint.sharded.load` (``strict`` too).

    ``weights_only=True`` (torch's safe unpickler): loading runs no code, and everything ratlib stores is plain
    data. A file holding other types is refused with a :class:`CheckpointError` naming them.
    ``weights_only=False`` unpickles anything, which can run code from the file: only for files you trust; it
    logs a warning naming the file.
    """
    import torch

    from ratlib.checkpoint import async_save, sharded

    async_save.wait_pending()
    path = Path(path)
    if path.is_dir() or (path.suffix != ".pt" and not path.exists()):
        if not weights_only:
            raise CheckpointArgumentError(
                message(f"checkpoint.load({str(path)!r}, weights_only=False): sharded checkpoints hold plain data")
            )
        return sharded.load(path, into=into, map_location=map_location, strict=strict)
    if into is not None:
        raise CheckpointArgumentError(
            message(
                f"checkpoint.load({str(path)!r}, into=...): `into` is for sharded checkpoint folders",
                fix="load the file, then model.load_state_dict(state['model']); into a sharded (FSDP2) model: "
                "torch.distributed.checkpoint.state_dict.set_model_state_dict(model, state['model'], "
                "options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))",
            )
        )
    if not path.is_file():
        raise CheckpointNotFoundError(
            message(
                f"checkpoint.load: {path} does not exist",
                got=_listing(path.parent, "*.pt"),
                fix="give an existing file, or find one with ratlib.checkpoint.latest(folder)",
            )
        )
    if not weights_only:
        from ratlib.rank_logger import get_logger

        get_logger(__name__).warning(
            "loading checkpoint %s with weights_only=False: unpickling can run code from the file; "
            "do this only with files you trust",
            path,
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        types = _refused_types(path, exc) if weights_only and "weights only load" in str(exc).lower() else []
        if types:  # a readable pickle holding something other than plain data
            raise _refused(path, types) from exc
        raise CheckpointError(
            message(
                f"checkpoint.load: {path} cannot be read; it may be truncated or not a torch checkpoint",
                got=f"{type(exc).__name__}: {_short(exc)}",
                fix=f"load an earlier one ({_listing(path.parent, '*.pt')})",
            )
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            message(
                f"checkpoint.load: {path} holds a {type(state).__name__}",
                expected="the dict that ratlib.checkpoint.save writes",
            )
        )
    return state


def _refused(path: Path, types: list[str]) -> CheckpointError:
    opt_in = f"ratlib.checkpoint.load({str(path)!r}, weights_only=False)"
    if all(t.startswith("numpy") for t in types):
        return CheckpointError(
            message(
                f"checkpoint.load: {path} holds NumPy objects, which weights_only=True refuses (an older ratlib "
                "stored NumPy's RNG state so)",
                got=f"refused: {', '.join(types)}",
                fix=f"if you trust the file, convert it once: `{_UPGRADE} {path}`, or load it with {opt_in}",
            )
        )
    return CheckpointError(
        message(
            f"checkpoint.load: {path} holds types that weights_only=True refuses, as unpickling them could run code",
            got=f"refused: {', '.join(types)}",
            fix=f"store plain data; if you trust the file, load it with {opt_in}, or allowlist the types with "
            "torch.serialization.add_safe_globals",
        )
    )


PER_RANK_KEY = "per_rank"


def rank_entry(state: Mapping[str, Any], *, strict: bool = True) -> Any:
    """This rank's own entry of a checkpoint saved with ``save(..., per_rank=...)``: rank r gets what rank r saved.

    Saved by another number of ranks, entries cannot follow the ranks one to one: a :class:`CheckpointError`
    names both sizes, or with ``strict=False`` the result is None (re-create what the entry held, e.g. draw a
    new batch).
    """
    from ratlib.launch import get_rank, get_world_size

    saved = state.get(PER_RANK_KEY) if isinstance(state, Mapping) else None
    if not isinstance(saved, Mapping) or not isinstance(saved.get("entries"), list):
        raise CheckpointError(
            message(
                "checkpoint.rank_entry: this checkpoint has no per-rank entries",
                got=f"keys {sorted(state)[:12] if isinstance(state, Mapping) else type(state).__name__}",
                fix="save it with checkpoint.save(state, path, per_rank=...) on every rank",
            )
        )
    entries, world = saved["entries"], get_world_size()
    if len(entries) != world:
        if not strict:
            return None
        raise CheckpointError(
            message(
                f"checkpoint.rank_entry: the checkpoint's per-rank entries are from {len(entries)} rank(s), this job "
                f"has {world}: rank {get_rank()} has no entry of its own",
                fix="resume with the same number of ranks, or pass strict=False and re-create what the entry held",
            )
        )
    return entries[get_rank()]


def rng_state() -> dict[str, Any]:
    """The random generators of every rank: ``{"world_size": W, "ranks": [state of rank 0, ...]}``.

    A collective when a process group exists: call it on every rank. Put the result in the checkpoint; it is
    plain data (NumPy's state as a dict of ints, a list and a float), so it loads with ``weights_only=True``.
    """
    import torch

    from ratlib.comm import all_gather_object

    _arrive("rng_state", None, None)  # a collective: fail fast, naming who is missing, if some ranks skip it
    mine: dict[str, Any] = {"python": random.getstate(), "numpy": _numpy_plain(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state_all()
    ranks = all_gather_object(mine)
    return {"world_size": len(ranks), "ranks": ranks}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore this rank's generators from :func:`rng_state`'s result.

    With another world size than the one saved, the ranks cannot be matched one to one: each rank then
    takes saved rank ``rank % saved_world_size`` and a warning says so.
    """
    import torch

    from ratlib.launch import get_rank, get_world_size

    ranks = state.get("ranks") if isinstance(state, Mapping) else None
    if not ranks:
        raise CheckpointArgumentError(
            message(
                "checkpoint.set_rng_state: not an RNG state",
                got=type(state).__name__,
                expected="the dict that ratlib.checkpoint.rng_state() returns ({'world_size': W, 'ranks': [...]})",
            )
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
    _numpy_restore(mine["numpy"])
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        cuda = mine["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _numpy_plain() -> dict[str, Any]:
    """NumPy's legacy global generator as plain values (its key as a list of ints, not an ndarray)."""
    import numpy as np

    state = np.random.get_state(legacy=False)
    inner = state["state"]
    return {
        "bit_generator": str(state["bit_generator"]),
        "key": [int(k) for k in inner["key"].tolist()],
        "pos": int(inner["pos"]),
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def _numpy_restore(saved: Any) -> None:
    import numpy as np

    if isinstance(saved, Mapping):
        key = np.asarray(saved["key"].tolist() if hasattr(saved["key"], "tolist") else saved["key"], dtype=np.uint32)
        np.random.set_state(
            {
                "bit_generator": saved["bit_generator"],
                "state": {"key": key, "pos": int(saved["pos"])},
                "has_gauss": int(saved["has_gauss"]),
                "gauss": float(saved["gauss"]),
            }
        )
    else:  # the tuple np.random.get_state() returns, as written by ratlib before the plain form
        np.random.set_state(saved)


def _plain_rng(rng: Any) -> Any:
    """A saved ``rng_state()`` with any old-style NumPy tuple replaced by the plain dict."""
    if not isinstance(rng, Mapping) or not isinstance(rng.get("ranks"), list):
        return rng
    ranks = []
    for entry in rng["ranks"]:
        entry = dict(entry)
        old = entry.get("numpy")
        if isinstance(old, tuple) and len(old) == 5:
            name, key, pos, has_gauss, gauss = old
            entry["numpy"] = {
                "bit_generator": str(name),
                "key": [int(k) for k in key],
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            }
        ranks.append(entry)
    return {**rng, "ranks": ranks}


def upgrade(path: str | os.PathLike[str]) -> Path:
    """Rewrite a trusted checkpoint written before the plain RNG form so that it loads with ``weights_only=True``.

    It is unpickled with ``weights_only=False`` (run this only on files you trust), every ``rng_state()`` found
    at the top level gets NumPy's state as plain values, and the file is replaced atomically. A file that still
    holds other NumPy or custom objects afterwards is left unchanged and a :class:`CheckpointError` names them.
    """
    import io

    import torch

    path = Path(path)
    state = load(path, weights_only=False)
    new = {key: _plain_rng(value) for key, value in state.items()}
    buffer = io.BytesIO()
    torch.save(new, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        buffer.seek(0)
        scanned = _refused_types(buffer, exc)  # get_unsafe_globals_in_checkpoint needs torch >= 2.5
        raise CheckpointError(
            message(
                f"checkpoint {path}: after converting the RNG state it still holds types that weights_only=True "
                "refuses; the file was left unchanged",
                got=f"refused: {', '.join(scanned) or type(exc).__name__}",
                fix="convert those values to tensors, numbers, strings, lists or dicts yourself, or keep loading "
                "the file with weights_only=False",
            )
        ) from exc
    data = buffer.getvalue()
    write_atomic(path, lambda f: f.write(data))
    return path


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
