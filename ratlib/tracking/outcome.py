"""How a run ended, for whoever launched it: ``run_dir/outcome.json`` ("finished" with the final metrics, or
"stopped" at a preemption step), written atomically from the main rank."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ratlib.errors import message
from ratlib.tracking.values import TrackingError, _is_main, _value

OUTCOME_FILE = "outcome.json"  # how the run ended, for whoever launched it (the ablation driver)


def write_outcome(run_dir: str | os.PathLike[str], status: str, **fields: Any) -> Path | None:
    """Write ``run_dir/outcome.json`` (main rank only, atomically): ``{"status": status, **fields}``.

    The run's last word to whoever launched it: ``"finished"`` with the final ``metrics``, or ``"stopped"``
    (preempted, its checkpoint written) with the ``step``. A launcher reads it with :func:`read_outcome` next to
    the exit code; a crash leaves no outcome (or an older one: delete it before each launch).
    """
    if status not in ("finished", "stopped"):
        raise TrackingError(message("write_outcome: unknown status", got=repr(status), expected="finished or stopped"))
    if not _is_main():
        return None
    from ratlib.io import write_atomic

    path = Path(run_dir) / OUTCOME_FILE
    plain = {
        k: {m: _value(x) for m, x in v.items()} if isinstance(v, Mapping) else _value(v) for k, v in fields.items()
    }
    record = {"status": status, **plain, "written_at": time.time()}
    write_atomic(path, (json.dumps(record, default=str) + "\n").encode())
    return path


@contextlib.contextmanager
def run_outcome(run_dir: str | os.PathLike[str]) -> Iterator[Callable[..., Path | None]]:
    """Around a run's training call: yields ``finished(**fields)``, to call with the final metrics (it writes
    ``outcome.json`` "finished"); a preemption stop inside (``SystemExit`` with ``ratlib.preempt``'s exit code)
    writes "stopped" with the stop step, and the exit goes on. Anything else writes nothing."""
    try:
        yield functools.partial(write_outcome, run_dir, "finished")
    except SystemExit as stop:
        from ratlib import preempt

        pre = preempt.current()
        if stop.code == preempt.PREEMPT_EXIT_CODE:
            fields = {"step": pre.stop_step, "progressed": pre.progressed} if pre is not None else {}
            write_outcome(run_dir, "stopped", **fields)
        raise


def read_outcome(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run_dir/outcome.json`` as a dict, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads((Path(run_dir) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
