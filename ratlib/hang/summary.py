"""Stall reports and the one summary table of every rank's last step, age and innermost frame, with the odd
rank marked.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["StallReport", "format_summary"]


def _ranks_text(ranks: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for r in sorted(ranks):
        if out and out[-1].split("-")[-1] == str(r - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out) or "none"


def _ranks(ranks: Iterable[int]) -> str:
    """'rank 2' or 'ranks 0-2, 5'."""
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_ranks_text(ranks)}" if ranks else "no rank"


# ----------------------------------------------------------------------------------------------
# Stall reports and the summary


@dataclass(frozen=True)
class StallReport:
    """What a stalled rank publishes: its last step, when it beat last, where its main thread is."""

    rank: int
    step: Any
    beat_time: float  # wall-clock time of the last heartbeat
    frame: str  # innermost frame of the main thread
    site: str  # innermost frame in the user's code
    host: str
    pid: int

    def to_json(self) -> str:
        """The report as the JSON a rank publishes to the store."""
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> StallReport:
        """A report read back from the store (``to_json``'s output)."""
        return cls(**json.loads(text))


def _odd_ranks(reports: dict[int, StallReport], world_size: int) -> tuple[dict[int, str], str]:
    """{rank: why it is odd}, and a one-line verdict. Odd: not in the majority's (step, place), or silent."""
    odd = {r: "no report" for r in range(world_size) if r not in reports}
    if not reports:
        return odd, "no rank reported"
    places = {r: (rep.step, rep.frame, rep.site) for r, rep in reports.items()}
    counts = Counter(places.values()).most_common()
    if len(counts) == 1:
        verdict = "every reporting rank is at the same step and place"
        return odd, verdict + (f"; silent: {_ranks(odd)}" if odd else "")
    if counts[0][1] == counts[1][1]:
        return odd, "no majority: the ranks are at different steps or places, see the table"
    step, frame, site = counts[0][0]
    for r, (s, f, w) in places.items():
        if (s, f, w) != (step, frame, site):
            why = [f"step {s} (others {step})"] if s != step else []
            odd[r] = ", ".join(why + (["elsewhere"] if (f, w) != (frame, site) else []))
    return odd, f"odd one out: {_ranks(odd)}"


def format_summary(
    reports: Iterable[StallReport], world_size: int, stall_timeout: float, now: float | None = None
) -> tuple[str, list[int]]:
    """The hang summary table, and the odd ranks (those not at the majority's step and place)."""
    by_rank = {r.rank: r for r in reports}
    now = time.time() if now is None else now
    odd, verdict = _odd_ranks(by_rank, world_size)
    head = ["", "rank", "last step", "age", "innermost frame", "in user code", "host:pid", ""]
    rows = []
    for rank in range(world_size):
        rep = by_rank.get(rank)
        mark = ">>" if rank in odd else ""
        note = f"<- {odd[rank]}" if rank in odd else ""
        if rep is None:
            rows.append(
                [
                    mark,
                    str(rank),
                    "?",
                    "?",
                    "(no report: still running, dead, or blocked holding the GIL)",
                    "",
                    "",
                    note,
                ]
            )
            continue
        site = "same" if rep.site == rep.frame else rep.site
        rows.append(
            [
                mark,
                str(rank),
                str(rep.step),
                f"{max(now - rep.beat_time, 0):.1f}s",
                rep.frame,
                site,
                f"{rep.host}:{rep.pid}",
                note,
            ]
        )
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    text = (
        f"hang summary: {len(by_rank)} of {world_size} rank(s) stalled (no heartbeat for {stall_timeout:g} s); "
        f"{verdict}.\n" + "\n".join(table) + "\nEvery stalled rank's log has the stacks of all its threads. "
        "Ranks blocked in a collective are usually waiting for the odd one: look at its innermost frame."
    )
    return text, sorted(odd)
