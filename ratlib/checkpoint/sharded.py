"""Sharded checkpoints: a folder written through ``torch.distributed.checkpoint`` (DCP) by every rank at once.

``checkpoint.save(state, "ckpt/step100")`` (a path without ``.pt``) lands here. The folder holds

- DCP's files: every rank's shards of every tensor (``__<rank>_0.distcp``; a replicated plain tensor is written
  once) and ``.metadata``, which says where each piece is;
- ``plain.pt``: everything that is not a tensor (epoch, config, sampler position, tracker state, the RNG states)
  as plain data, with the tensors' places in the structure; written by the main rank, read with
  ``weights_only=True``;
- ``rank<r>.pt``: each rank's own ``per_rank`` entry, written by that rank (no collective);
- ``COMMITTED``: written last, by the main rank, once every rank's files are durable.

Commit protocol: every rank writes into ``<parent>/.tmp-<name>.<token>`` and fsyncs its files; the ranks meet
through the rendezvous store (never the loop's process group), bounded by ``sync_timeout`` and naming the ranks
that did not come; the main rank writes ``COMMITTED`` (fsynced), renames the folder to its name and fsyncs the
parent. ``latest()`` lists only committed folders, so a process killed at any moment leaves the previous
checkpoint as the latest; ``keep=N`` prunes committed checkpoints only, after the new one is committed, and
removes the leftovers of killed saves.

DCP's own collectives (planning, gathering the write results) run on a separate gloo group created once, so an
asynchronous save (``ratlib.checkpoint.async_save``) never interleaves with the loop's collectives.
Loading runs no code: ``.metadata`` is read by ``ratlib.checkpoint.safe_metadata``, the rest with
``weights_only=True``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratlib.checkpoint._common import (
    CheckpointArgumentError,
    CheckpointError,
    CheckpointNotFoundError,
    _natural_key,
    _short,
)
from ratlib.checkpoint.ranks import _meet, _next, _Ranks, _ranks
from ratlib.checkpoint.split import _plain_bytes, join_state, split_state
from ratlib.errors import message, require_torch
from ratlib.io import TMP_PREFIX, fsync_dir, write_atomic

__all__ = ["MARKER", "PLAIN", "consolidate", "is_committed", "load", "save"]

MARKER = "COMMITTED"
PLAIN = "plain.pt"
FORMAT = "ratlib-sharded"
VERSION = 1
_NEEDS = "2.6"
_FEATURE = "sharded checkpoints (checkpoint.save/load with a folder path, through torch.distributed.checkpoint)"

# Test hook: called with the name of each phase of a save ("staged", "written", "arrived", "marker",
# "renamed", "pruning", "pruned") and the checkpoint's path, in the thread that runs it. The crash tests kill
# the process there.
_phase_hook: Callable[[str, Path], None] | None = None


def _phase(name: str, path: Path) -> None:
    hook = _phase_hook
    if hook is not None:
        hook(name, path)


def is_folder_path(path: str | os.PathLike[str]) -> bool:
    """A path that names a sharded checkpoint folder: an existing folder, or any name without ``.pt``."""
    path = Path(path)
    return path.is_dir() or (path.suffix != ".pt" and not path.is_file())


def is_committed(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a complete sharded checkpoint (its commit marker exists, its name is final)."""
    folder = Path(folder)
    return not folder.name.startswith(TMP_PREFIX) and (folder / MARKER).is_file()


# ---------------------------------------------------------------------------------------------------------
# Save


@dataclass
class SaveJob:
    """One save, staged: what the write (in the foreground or in a thread) needs, nothing of the caller's."""

    path: Path
    tmp: Path
    ranks: _Ranks
    seq: int
    tensors: dict[str, Any] | None
    plain: bytes | None  # the main rank's plain.pt
    mine: bytes | None  # this rank's per_rank entry
    marker: dict[str, Any]
    keep: int | None
    call: str
    phases: list[str] = field(default_factory=list)


def save(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    keep: int | None = None,
    sync_timeout: float | None = None,
    per_rank: Any = None,
    async_save: bool = False,
) -> Path:
    """Write ``state`` as a sharded checkpoint folder ``path`` (every rank calls it); see the module's doc.

    With ``async_save=True`` it returns once the state is staged (tensors copied to CPU memory, the plain data
    serialised); the write, the commit and the pruning run in a thread. See ``ratlib.checkpoint.async_save``.
    """
    from ratlib.checkpoint import async_save as background

    require_torch(_NEEDS, _FEATURE)
    background.wait_pending()
    path = Path(path)
    call = f"checkpoint.save({str(path)!r})"
    if path.suffix == ".pt":
        raise CheckpointArgumentError(message(f"{call}: a sharded checkpoint is a folder", fix="drop the .pt"))
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise CheckpointArgumentError(message(f"{call}: keep={keep!r}", expected="a whole number >= 1, or None"))
    if per_rank is not None and "per_rank" in state:
        raise CheckpointArgumentError(message(f"{call}: the state already has a 'per_rank' key", fix="rename it"))
    ranks = _ranks("save", sync_timeout)
    seq = _next("save")
    token = uuid.uuid4().hex[:12]
    plain = mine = None
    tensors: dict[str, Any] = {}
    try:  # everything that can refuse this state, before anything is written, on every rank
        skeleton, tensors = split_state(state)
        if ranks.rank == 0:
            body = {"format": FORMAT, "version": VERSION, "state": skeleton, "tensors": sorted(tensors)}
            plain = _plain_bytes(body, path, "state's non-tensor part")
        if per_rank is not None:
            mine = _plain_bytes({"entry": per_rank}, path, "per_rank entry")
        if async_save:
            tensors = background.stage(tensors, path)
        refusal = _refuse_target(path) if ranks.rank == 0 else None
    except (CheckpointError, CheckpointArgumentError) as exc:
        refusal = str(exc)
    if ranks.rank == 0 and refusal is None:  # the main rank makes the fresh temporary folder before any write
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f"{TMP_PREFIX}{path.name}.{token}").mkdir()
    arrival = [str(path), per_rank is not None, token, refusal]
    seen = _meet(ranks.channel, "this save", f"save/{seq}/start", arrival, call)
    if len({p for p, *_ in seen}) > 1:
        raise CheckpointError(
            message(
                f"{call}: the ranks' save #{seq} names different folders, so they are not at the same save",
                got=", ".join(f"rank {r}: {p}" for r, (p, *_) in enumerate(seen)),
                fix="call save with the same path on every rank, the same number of times",
            )
        )
    if len({given for _, given, *_ in seen}) > 1:
        raise CheckpointError(message(f"{call}: some ranks pass per_rank and some do not", fix="all or none"))
    token = seen[0][2]
    refused = [(r, text) for r, (*_, text) in enumerate(seen) if text]
    if refused:
        if ranks.rank == 0 and refusal is None:
            shutil.rmtree(path.parent / f"{TMP_PREFIX}{path.name}.{token}", ignore_errors=True)
        rank, text = refused[0]
        raise CheckpointError(text if rank == ranks.rank or ranks.world_size == 1 else f"on rank {rank}: {text}")
    job = SaveJob(
        path=path,
        tmp=path.parent / f"{TMP_PREFIX}{path.name}.{token}",
        ranks=ranks,
        seq=seq,
        tensors=tensors,
        plain=plain,
        mine=mine,
        marker={
            "format": FORMAT,
            "version": VERSION,
            "world_size": ranks.world_size,
            "tensors": len(tensors),
            "per_rank": per_rank is not None,
            "saved_at": time.time(),
        },
        keep=keep,
        call=call,
    )
    _phase("staged", path)
    if async_save:
        background.start(job, write)
    else:
        write(job)
    return path


def _refuse_target(path: Path) -> str | None:
    """Why ``path`` cannot become this checkpoint (worded for every rank), or None."""
    if path.is_file():
        return message(
            f"checkpoint.save({str(path)!r}): a file of that name exists; a sharded checkpoint is a folder",
            fix="choose another name, or remove the file",
        )
    if path.is_dir() and not is_committed(path) and any(path.iterdir()):
        return message(
            f"checkpoint.save({str(path)!r}): that folder exists and is not a ratlib checkpoint (no {MARKER} "
            "marker), so it is not replaced",
            got=f"{sum(1 for _ in path.iterdir())} entries, e.g. {sorted(p.name for p in path.iterdir())[:5]}",
            fix="choose another name, or remove the folder",
        )
    return None


def write(job: SaveJob) -> None:
    """Write this rank's files, meet, and (main rank) commit and prune; raises on every rank if any failed."""

    import torch.distributed.checkpoint as dcp

    from ratlib.checkpoint.planner import planner

    ranks, tmp = job.ranks, job.tmp
    error = None
    try:  # first, on every rank whatever else fails: DCP's collectives must meet on every rank
        _quiet_single_process_warning()
        dcp.save(
            job.tensors or {},
            storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
            planner=planner(),
            process_group=ranks.group,
            no_dist=ranks.group is None,
        )
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = f"{type(exc).__name__}: {_short(exc)}"
    finally:
        job.tensors = None  # the staged copy goes now, not at the next save
    try:
        if job.plain is not None:
            _write_durable(tmp / PLAIN, job.plain)
        if job.mine is not None:
            _write_durable(tmp / f"rank{ranks.rank}.pt", job.mine)
        fsync_dir(tmp)
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = error or f"{type(exc).__name__}: {_short(exc)}"
    _phase("written", job.path)
    written = _meet(ranks.channel, "the end of the write", f"save/{job.seq}/written", error, job.call)
    failed = [(r, e) for r, e in enumerate(written) if e]
    _phase("arrived", job.path)
    outcome = None
    if ranks.rank == 0:
        if failed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                _commit(job)
                _phase("pruning", job.path)
                _prune(job.path, job.keep, tmp)
                _phase("pruned", job.path)
            except Exception as exc:  # noqa: BLE001
                outcome = f"{type(exc).__name__}: {_short(exc)}"
    committed = _meet(ranks.channel, "the commit", f"save/{job.seq}/committed", outcome, job.call)
    if failed:
        raise CheckpointError(
            message(
                f"{job.call}: the write failed on rank(s) {[r for r, _ in failed]}; nothing was committed and "
                "the previous checkpoint is still the latest",
                got="; ".join(f"rank {r}: {e}" for r, e in failed[:4]),
                fix="see the rank's error (disk full? permissions?)",
            )
        )
    if committed[0]:
        raise CheckpointError(
            message(
                f"{job.call}: the main rank could not commit the checkpoint",
                got=committed[0],
                fix="check the folder's permissions and free space; the previous checkpoint is still the latest",
            )
        )


_QUIET = r"torch\.distributed is disabled"


def _quiet_single_process_warning() -> None:
    """DCP warns "assuming the intent is to save in a single process" on every call without a group: it is.
    A filter for that message alone, added once (warnings.catch_warnings is not safe in a thread)."""
    import warnings

    if not any(getattr(f[1], "pattern", None) == _QUIET for f in warnings.filters):
        warnings.filterwarnings("ignore", message=_QUIET, category=UserWarning)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _commit(job: SaveJob) -> None:
    """The main rank: the marker last (fsynced), then the folder under its name, the parent fsynced."""
    tmp, path = job.tmp, job.path
    _phase("marker", path)
    write_atomic(tmp / MARKER, json.dumps(job.marker, indent=1))
    old = None
    if path.is_dir():  # a fixed name (e.g. "last") saved again: the old one steps aside, then goes
        old = path.parent / f"{TMP_PREFIX}{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    _phase("renamed", path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(path: Path, keep: int | None, current_tmp: Path) -> None:
    """After the commit: the oldest committed checkpoints of the same name pattern beyond ``keep`` (never the
    new one), then the leftovers of killed saves of that pattern. A checkpoint is renamed to a temporary name
    before it is deleted, so a kill mid-delete never leaves a partial folder under a checkpoint's name."""
    parent = path.parent
    pattern = re.sub(r"\d+", "*", path.name)
    if keep is not None and pattern != path.name:
        committed = [p for p in parent.glob(pattern) if p.is_dir() and p != path and is_committed(p)]
        committed.sort(key=_natural_key)
        for old in committed[: max(len(committed) + 1 - keep, 0)]:
            gone = parent / f"{TMP_PREFIX}{old.name}.del-{uuid.uuid4().hex[:8]}"
            os.replace(old, gone)
            fsync_dir(parent)
            shutil.rmtree(gone, ignore_errors=True)
    for left in parent.glob(f"{TMP_PREFIX}{pattern}.*"):
        if left.is_dir() and left != current_tmp:
            shutil.rmtree(left, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Load


def _check_folder(path: Path) -> None:
    from ratlib.checkpoint.safe_metadata import METADATA

    if not path.exists():
        raise CheckpointNotFoundError(
            message(
                f"checkpoint.load: {path} does not exist",
                got=_listing(path.parent),
                fix="give an existing checkpoint, or find one with ratlib.checkpoint.latest(folder)",
            )
        )
    if not path.is_dir():
        return
    if is_committed(path):
        return
    if path.name.startswith(TMP_PREFIX) or (path / METADATA).exists() or (path / PLAIN).exists():
        raise CheckpointError(
            message(
                f"checkpoint.load: {path} is not a committed checkpoint: its save did not finish (killed, or still "
                f"writing), so it may be incomplete; it has no {MARKER} marker",
                fix=f"load a complete one: ratlib.checkpoint.latest({str(path.parent)!r}) returns only those "
                f"({_listing(path.parent)})",
            )
        )
    names = sorted(p.name for p in path.iterdir())
    pts = [n for n in names if n.endswith(".pt")]
    raise CheckpointError(
        message(
            f"checkpoint.load: {path} is a folder but not a checkpoint",
            got=f"{len(names)} entries" + (f": {', '.join(names[:6])}" if names else " (empty)"),
            expected=f"a folder written by ratlib.checkpoint.save(state, folder) ({MARKER}, .metadata, {PLAIN})",
            fix=(f"load a file in it, e.g. {path / pts[-1]}" if pts else "pass the checkpoint folder itself")
            + f", or ratlib.checkpoint.latest({str(path)!r})",
        )
    )


def _listing(folder: Path) -> str:
    from ratlib.checkpoint._common import _listing as files_listing

    if not folder.is_dir():
        return f"folder {folder} does not exist"
    done = [p.name for p in sorted(folder.iterdir(), key=_natural_key) if p.is_dir() and is_committed(p)]
    files = files_listing(folder, "*.pt")
    if not done:
        return f"no committed checkpoint folders; {files}"
    shown = ("..., " if len(done) > 8 else "") + ", ".join(done[-8:])
    return f"{len(done)} committed checkpoint folder(s): {shown}; {files}"


def _read_plain(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            message(
                f"checkpoint.load: {path} cannot be read with weights_only=True",
                got=f"{type(exc).__name__}: {_short(exc)}",
                fix="load an earlier checkpoint (ratlib.checkpoint.latest(folder))",
            )
        ) from exc


def load(
    path: str | os.PathLike[str],
    *,
    into: Mapping[str, Any] | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
    sync_timeout: float | None = None,
) -> dict[str, Any]:
    """Read the sharded checkpoint folder ``path`` (every rank calls it when there is a process group).

    ``into``: a state holding the target tensors (an FSDP2 model's ``state_dict()`` of DTensors at any world
    size, or plain tensors), filled in place (DCP reshards); the result holds those tensors and the
    non-tensor items from the checkpoint. Without ``into`` (and for the checkpoint's top-level items that
    ``into`` has no key for, e.g. ``"rng"``), tensors come back whole, as plain tensors on ``map_location``.
    ``strict``: within the items of ``into``, keys of the checkpoint that ``into`` lacks, or the reverse, are
    an error naming them and the closest names; with ``strict=False`` the first come back whole and the second
    are left as they are.
    """

    import torch
    import torch.distributed.checkpoint as dcp

    from ratlib.checkpoint import async_save as background
    from ratlib.checkpoint.safe_metadata import read_metadata, reader

    require_torch(_NEEDS, _FEATURE)
    background.wait_pending()
    path = Path(path)
    _check_folder(path)
    call = f"checkpoint.load({str(path)!r})"
    ranks = _ranks("load", sync_timeout)
    _meet(ranks.channel, "this load", f"load/{_next('load')}", str(path), call)
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(message(f"{call}: its {MARKER} marker cannot be read", got=str(exc))) from exc
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(message(f"{call}: {path / MARKER} is not ratlib's", got=repr(marker)[:200]))
    body = _read_plain(path / PLAIN)
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(message(f"{call}: {path / PLAIN} is not ratlib's", got=type(body).__name__))
    metadata = read_metadata(path)
    stored = metadata.state_dict_metadata
    saved = list(body["tensors"])
    if set(saved) - set(stored):
        raise CheckpointError(
            message(
                f"{call}: the checkpoint is damaged: {PLAIN} names tensors that .metadata does not hold",
                got=str(sorted(set(saved) - set(stored))[:6]),
                fix="load an earlier checkpoint",
            )
        )
    targets: dict[str, Any] = {}
    if into is not None:  # its top-level items are loaded in place; the others come back whole
        _, targets = split_state(into, "target (into)")
        scope = [k for k in saved if k.split(".", 1)[0] in {str(name) for name in into}]
        _check_keys(call, scope, targets, strict)
    request: dict[str, Any] = {}
    shapes = []
    for key in saved:
        meta = stored[key]
        if type(meta).__name__ != "TensorStorageMetadata":  # a pickled item: DCP would run its code
            raise CheckpointError(message(f"{call}: item {key!r} is not stored as a tensor", got=type(meta).__name__))
        if key in targets:
            if tuple(targets[key].shape) != tuple(meta.size):
                shapes.append(f"{key}: {tuple(meta.size)} saved, {tuple(targets[key].shape)} in the target")
            request[key] = targets[key]
        else:
            request[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    if shapes:
        raise CheckpointError(
            message(
                f"{call}: {len(shapes)} tensor(s) of the checkpoint have other shapes than the target's",
                got="; ".join(shapes[:6]) + ("; ..." if len(shapes) > 6 else ""),
                fix="build the model with the sizes it was saved with (its config is in the checkpoint)",
            )
        )
    try:
        _quiet_single_process_warning()
        dcp.load(request, storage_reader=reader(path), process_group=ranks.group, no_dist=ranks.group is None)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        refused = _refused_cause(exc)
        if refused is not None:
            raise refused from exc
        raise CheckpointError(
            message(
                f"{call}: reading the tensors failed on rank {ranks.rank}",
                got=f"{type(exc).__name__}: {_short(exc)}",
                fix="the folder may be damaged; load an earlier checkpoint (ratlib.checkpoint.latest(folder))",
            )
        ) from exc
    if into is None and str(map_location) != "cpu":
        request = {k: v.to(map_location) for k, v in request.items()}
    state = join_state(body["state"], request)
    if marker.get("per_rank"):
        entries = [_read_plain(path / f"rank{r}.pt")["entry"] for r in range(int(marker["world_size"]))]
        state["per_rank"] = {"world_size": len(entries), "entries": entries}
    return state


def _refused_cause(exc: BaseException) -> CheckpointError | None:
    """A CheckpointError raised inside DCP (the safe reader's refusal), which DCP wraps in its own exception."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, CheckpointError):
            return e
        seen += [c for c in (e.__cause__, e.__context__) if c is not None]
        for failure in getattr(e, "failures", {}).values():  # DCP's CheckpointException: rank -> exception
            if isinstance(failure, BaseException):
                seen.append(failure)
            elif isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
                seen.append(failure[0])
    return None


def _check_keys(call: str, saved: list[str], targets: Mapping[str, Any], strict: bool) -> None:
    unexpected = [k for k in saved if k not in targets]  # in the checkpoint, with no place in the target
    missing = [k for k in targets if k not in set(saved)]  # in the target, not in the checkpoint
    if not strict or not (missing or unexpected):
        return

    def show(keys: list[str], among: list[str]) -> str:
        parts = []
        for k in keys[:8]:
            close = difflib.get_close_matches(k, among, n=1, cutoff=0.5)
            parts.append(f"{k} (closest: {close[0]})" if close else k)
        return ", ".join(parts) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    got = []
    if missing:
        got.append(f"missing from the checkpoint: {show(missing, saved)}")
    if unexpected:
        got.append(f"in the checkpoint but not in the target: {show(unexpected, list(targets))}")
    raise CheckpointError(
        message(
            f"{call}: the checkpoint does not fit the target state: it was saved from another model or another "
            "state layout",
            got="; ".join(got),
            expected=f"the {len(targets)} tensor keys of `into` = the {len(saved)} of the checkpoint",
            fix="build the model (and optimizer) the checkpoint was saved from; an optimizer's state exists only "
            "after its first step (take one step, or use torch.distributed.checkpoint.state_dict.get_state_dict); "
            "or pass strict=False to load what matches",
        )
    )


# ---------------------------------------------------------------------------------------------------------
# Consolidate


def consolidate(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the sharded checkpoint ``folder`` as one full-state ``.pt`` file ``out`` (atomically), which loads
    with ``torch.load(weights_only=True)`` / :func:`ratlib.checkpoint.load`. One process, no group needed."""
    import torch

    out = Path(out)
    if out.suffix != ".pt":
        raise CheckpointArgumentError(message(f"consolidate: {out}", expected="an output file name ending in .pt"))
    state = load(folder)
    write_atomic(out, lambda f: torch.save(state, f))
    return out
