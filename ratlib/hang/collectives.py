"""The collective check: before each ``ratlib.comm`` collective the ranks compare operation, call site and
heartbeat step through the store, and raise ``CollectiveMismatchError`` where they differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

from ratlib.errors import message
from ratlib.hang import watchdog
from ratlib.hang.dumps import _describe
from ratlib.hang.state import _PREFIX, _S, CollectiveMismatchError, _group, _require_store, _world
from ratlib.hang.summary import _ranks

__all__ = ["before_collective"]

# ----------------------------------------------------------------------------------------------
# Collective check


def _is_ours(module: str | None) -> bool:
    return module in ("ratlib.comm", "ratlib.hang") or (module or "").startswith("ratlib.hang.")


def _call_site() -> tuple[str, str]:
    """(display, id) of the first frame outside ratlib.comm / ratlib.hang: the user's call."""
    frame = sys._getframe(1)
    while frame.f_back is not None and _is_ours(frame.f_globals.get("__name__")):
        frame = frame.f_back
    code = frame.f_code
    func = getattr(code, "co_qualname", code.co_name)
    return _describe(frame), f"{os.path.basename(code.co_filename)}:{frame.f_lineno}:{func}"


def before_collective(op: str) -> None:
    """Called by every ``ratlib.comm`` collective; with ``check_collectives`` the ranks must agree."""
    if not _S.check:
        return
    store = _S.check_store
    if store is None:
        if _group() is None or _world() == 1:
            return
        store = _S.check_store = _require_store("check_collectives=True")
    dist = _group()
    if dist is None or dist.get_world_size() == 1:
        return
    site, site_id = _call_site()
    step = watchdog._step  # the last heartbeat's step (the watchdog module owns it)
    seq = _S.seq
    _S.seq += 1
    _agree(
        store,
        int(dist.get_rank()),
        int(dist.get_world_size()),
        seq,
        {
            "op": op,
            "site": site,
            "id": site_id,
            "step": step if isinstance(step, (int, float)) else (None if step is None else str(step)),
        },
    )


def _agree(store: Any, rank: int, world: int, seq: int, record: dict[str, Any]) -> None:
    """Publish this rank's record for collective ``seq``, read every rank's, raise where they differ."""
    key = f"{_PREFIX}coll/{seq}/"
    store.set(key + str(rank), json.dumps(record))
    keys = [key + str(r) for r in range(world)]
    try:
        values = store.multi_get(keys)  # waits (server side) for every rank, up to the store's timeout
    except Exception as exc:
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        if not missing:
            raise  # the store itself failed, not a rank
        raise CollectiveMismatchError(
            message(
                f"ratlib collective #{seq} ({record['op']} at {record['site']}, step {record['step']}): "
                f"{_ranks(missing)} never reached it within the store timeout ({exc.__class__.__name__}). "
                "They are in a collective that is not from ratlib.comm, stuck, or dead",
                fix="see their logs (install(stall_timeout=...) dumps their stacks)",
            )
        ) from None
    if seq >= 2:
        with contextlib.suppress(Exception):  # every rank has read collective seq-2's records by now
            store.delete_key(f"{_PREFIX}coll/{seq - 2}/{rank}")
    records = [json.loads(v) for v in values]
    if any((r["op"], r["id"], r["step"]) != (record["op"], record["id"], record["step"]) for r in records):
        raise CollectiveMismatchError(_mismatch_message(seq, records))


def _mismatch_message(seq: int, records: list[dict[str, Any]]) -> str:
    groups: dict[tuple[Any, ...], list[int]] = {}
    for rank, r in enumerate(records):
        groups.setdefault((r["op"], r["site"], r["step"]), []).append(rank)
    lines = [f"ratlib collective #{seq} differs across ranks (check_collectives=True):"]
    for (op, site, step), ranks in sorted(groups.items(), key=lambda kv: kv[1][0]):
        lines.append(f"  {_ranks(ranks)}: {op} at {site} (step {step})")
    return message(
        "\n".join(lines) + "\nEvery rank must call the same collectives in the same order and step",
        fix="look for a branch that differs by rank before these call sites (a data-dependent if, an uneven "
        "last batch, an exception caught on one rank)",
    )
