"""ratlib.hang: stack dumps on a signal, the stall watchdog and summary, the collective check.

Multi-rank behaviour runs on real gloo ranks (tests/hang_targets.py); the store protocols are also
driven in-process with threads over a TCPStore, and the pure parts (summary, messages) directly.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import hang_targets
import pytest

from ratlib import hang
from ratlib.hang import CollectiveMismatchError, StallReport, format_summary
from ratlib.hang import collectives as hang_collectives
from ratlib.hang import summary as hang_summary
from ratlib.hang import watchdog as hang_watchdog
from ratlib.testing import run_on_ranks

TARGETS = Path(hang_targets.__file__)


def line_of(marker: str) -> int:
    """The line of tests/hang_targets.py tagged ``# <marker>``."""
    for number, text in enumerate(TARGETS.read_text().splitlines(), 1):
        if text.rstrip().endswith(f"# <{marker}>"):
            return number
    raise AssertionError(f"no line tagged <{marker}> in {TARGETS}")


@pytest.fixture(autouse=True)
def _clean_install():
    yield
    hang.uninstall()


# ----------------------------------------------------------------------------------------------
# Real ranks


@pytest.mark.distributed
def test_stalled_ranks_dump_summarize_and_fail(tmp_path: Path) -> None:
    """3 ranks, rank 2 runs out of data one batch early and skips the last all_reduce: each rank dumps
    its stack at its real line, rank 0 logs one table that marks rank 2, every rank ends with HangError."""
    stall = 3.0
    started = time.time()
    run = run_on_ranks(hang_targets.uneven_last_batch, 3, args=(str(tmp_path), 2, stall), timeout=60)
    ended = time.time()
    assert not run.timed_out, f"the job waited until the deadline instead of failing:\n{run}"
    assert run.returncodes == [hang.HANG_EXIT_CODE] * 3, run
    last_beat = max(float(m) for out in run.stdouts for m in re.findall(r"BEAT \d+ ([\d.]+)", out))
    assert ended - last_beat < stall + 15, f"took {ended - last_beat:.1f}s after the last heartbeat:\n{run}"
    assert ended - started < 50

    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(3)]
    reduce_line, save_line = line_of("ALL_REDUCE"), line_of("SAVE")
    for r in (0, 1):
        assert "no heartbeat for" in logs[r] and "last step 3" in logs[r], logs[r]
        assert f'hang_targets.py", line {reduce_line} in uneven_last_batch' in logs[r], logs[r]
    assert "last step 2" in logs[2]
    assert f'hang_targets.py", line {save_line} in save_predictions' in logs[2], logs[2]
    for r, text in enumerate(logs):
        assert "ratlib.hang.HangError: " in text and f"exit code {hang.HANG_EXIT_CODE}" in text, text
        assert "Odd one out: rank 2" in text, text
        assert "ratlib.hang.HangError: " in run.stderrs[r], run.stderrs[r]  # on the console too, tagged
        assert f"[rank {r}/3]" in run.stderrs[r]

    summary = logs[0][logs[0].index("hang summary") :]
    assert "3 of 3 rank(s) stalled" in summary and "odd one out: rank 2" in summary, summary
    rows = {int(m.group(2)): m.group(0) for m in re.finditer(r"^(>>)?\s+(\d)\s+.*$", summary, re.MULTILINE)}
    assert sorted(rows) == [0, 1, 2], summary
    for r in (0, 1):
        assert not rows[r].startswith(">>") and re.search(r"\s3\s+\d+\.\ds\s", rows[r]), rows[r]
        assert f"hang_targets.py:{reduce_line} in uneven_last_batch" in rows[r], rows[r]
    assert rows[2].startswith(">>") and "<- step 2 (others 3), elsewhere" in rows[2], rows[2]
    assert f"hang_targets.py:{save_line} in save_predictions" in rows[2], rows[2]
    ages = [float(a) for a in re.findall(r"\s(\d+\.\d)s\s", summary)]
    assert len(ages) == 3 and all(stall <= a < stall + 10 for a in ages), summary
    assert all("hang summary" not in text for text in logs[1:]), "exactly one rank prints the table"


@pytest.mark.distributed
def test_dump_signal_dumps_a_blocked_rank_and_the_job_goes_on(tmp_path: Path) -> None:
    run = run_on_ranks(hang_targets.signal_while_blocked, 2, args=(str(tmp_path),), timeout=60).check()
    assert all(f"DONE rank {r}" in run.stdouts[r] for r in range(2))
    text = (tmp_path / "rank1.log").read_text()
    assert "stack dump on SIGUSR2" in text and "the process goes on" in text, text
    assert f'hang_targets.py", line {line_of("BLOCKED")} in signal_while_blocked' in text, text
    assert "[MainThread]" in text and "ratlib-hang" not in text.split("stack dump", 1)[1], text
    assert "[rank 1/2]" in run.stderrs[1] and "stack dump on SIGUSR2" in run.stderrs[1]
    assert "stack dump" not in (tmp_path / "rank0.log").read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["op", "skip"])
def test_mismatched_collectives_raise_naming_ranks_and_sites(kind: str) -> None:
    run = run_on_ranks(hang_targets.mismatched_collectives, 2, args=(kind,), timeout=60)
    assert run.returncodes == [3, 3], run
    if kind == "op":
        expected = [
            f"rank 0: all_reduce_mean at tests/hang_targets.py:{line_of('OP_ALL_REDUCE')} in "
            "mismatched_collectives (step 2)",
            f"rank 1: broadcast_object at tests/hang_targets.py:{line_of('BROADCAST')} in "
            "mismatched_collectives (step 2)",
        ]
    else:
        site = f"all_reduce_mean at tests/hang_targets.py:{line_of('SKIP_ALL_REDUCE')} in mismatched_collectives"
        expected = [f"rank 0: {site} (step 2)", f"rank 1: {site} (step 3)"]
    for out in run.stdouts:
        assert "MISMATCH CollectiveMismatchError: ratlib collective #2 differs across ranks" in out, out
        for line in expected:
            assert line in out, out


# ----------------------------------------------------------------------------------------------
# Store protocols with threads as ranks (a TCPStore made here)


def _tcp_store(timeout: float = 20.0):
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=timeout), wait_for_workers=False)


def _client(server, timeout: float = 20.0):
    """Another client of ``server``, as each rank has its own (TCPStore.clone is torch >= 2.6)."""
    import torch.distributed as dist

    if hasattr(server, "clone"):
        return server.clone()
    return dist.TCPStore("127.0.0.1", server.port, 1, False, timedelta(seconds=timeout))


def _run_threads(fn, ranks: tuple[int, ...]) -> dict[int, object]:
    """``fn(rank)`` in one thread per rank, as ranks would run it; results or exceptions by rank."""
    results: dict[int, object] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_agree_passes_matching_records_and_names_differences() -> None:
    server = _tcp_store()
    stores = [_client(server) for _ in range(3)]

    def rank_fn(rank: int) -> str:
        for seq in range(5):
            hang_collectives._agree(
                stores[rank],
                rank,
                3,
                seq,
                {"op": "all_reduce_mean", "site": "t.py:9 in f", "id": "t.py:9:f", "step": seq},
            )
        op = "broadcast_object" if rank == 1 else "all_reduce_mean"
        hang_collectives._agree(
            stores[rank], rank, 3, 5, {"op": op, "site": f"t.py:{10 + rank} in f", "id": f"t:{10 + rank}", "step": 5}
        )
        return "no error"

    results = _run_threads(rank_fn, (0, 1, 2))
    for rank in range(3):
        exc = results[rank]
        assert isinstance(exc, CollectiveMismatchError), exc
        text = str(exc)
        assert "collective #5 differs" in text
        assert "rank 0: all_reduce_mean at t.py:10 in f (step 5)" in text
        assert "rank 1: broadcast_object at t.py:11 in f (step 5)" in text
        assert "rank 2: all_reduce_mean at t.py:12 in f (step 5)" in text
    assert not server.check(["ratlib/hang/coll/0/0"]) and server.check(["ratlib/hang/coll/4/0"])  # old keys go


def test_agree_names_a_rank_that_never_arrives() -> None:
    server = _tcp_store(timeout=1.0)
    with pytest.raises(CollectiveMismatchError, match=r"rank 1 never reached it within the store timeout"):
        hang_collectives._agree(
            _client(server), 0, 2, 0, {"op": "reduce_dict", "site": "t.py:3 in g", "id": "t:3", "step": 7}
        )


def test_share_through_store_prints_one_summary_marking_the_odd_rank(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratlib.hang")
    server = _tcp_store()
    now = time.time()

    def rank_fn(rank: int) -> dict:
        report = StallReport(
            rank,
            2 if rank == 2 else 3,
            now - 3.5,
            "c10d.py:1 in all_reduce" if rank != 2 else "t.py:5 in save",
            "t.py:4 in loop" if rank != 2 else "t.py:5 in save",
            "h",
            100 + rank,
        )
        return hang_watchdog._share_through(_client(server), report, 3, 2.0)

    results = _run_threads(rank_fn, (0, 1, 2))
    assert all(
        isinstance(results[r], dict) and results[r]["odd"] == [2] and results[r]["printer"] == 0 for r in range(3)
    ), results
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hang summary")]
    assert len(tables) == 1 and "3 of 3 rank(s) stalled" in tables[0], tables


def test_share_through_store_marks_a_silent_rank_after_the_window(caplog: pytest.LogCaptureFixture) -> None:
    """Rank 1 keeps running (or died): ranks 0 and 2 wait out the window, then rank 0 prints."""
    caplog.set_level(logging.INFO, logger="ratlib.hang")
    server = _tcp_store()
    start = time.monotonic()
    results = _run_threads(
        lambda rank: hang_watchdog._share_through(
            _client(server),
            StallReport(rank, 5, time.time() - 1, "c10d.py:1 in barrier", "t.py:4 in loop", "h", rank),
            3,
            1.0,
        ),
        ranks=(0, 2),
    )
    assert 1.0 <= time.monotonic() - start < 15
    assert results[0]["odd"] == [1] == results[2]["odd"] and results[2]["printer"] == 0, results
    (table,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hang summary")]
    assert "2 of 3 rank(s) stalled" in table and re.search(r"^>>\s+1\s+\?.*no report.*<- no report$", table, re.M)


# ----------------------------------------------------------------------------------------------
# One process


def _slow_step(seconds: float) -> None:
    time.sleep(seconds)


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _step_until_stalls(caplog: pytest.LogCaptureFixture, count: int, limit: float = 60.0) -> list[str]:
    """A training step that lasts until the watchdog has reported ``count`` stalls in all (``limit``: only
    against a watchdog that never fires), so the order of events is checked, not their count in a window."""
    deadline = time.monotonic() + limit
    while len(stalls := _records(caplog, "Stacks of all threads")) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return stalls


def test_watchdog_reports_a_stall_and_goes_on_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratlib.hang")
    hang.install(stall_timeout=0.4, dump_signal=None, abort_after_dump=False)
    _slow_step(0.8)  # twice the timeout: a watchdog armed before the first heartbeat would fire (more on a slow box)
    assert not _records(caplog, "no heartbeat"), "armed before the first heartbeat"
    hang.heartbeat(41)
    stalls = _step_until_stalls(caplog, 1)
    assert len(stalls) == 1, stalls
    assert "no heartbeat for" in stalls[0] and "last step 41" in stalls[0] and "in _step_until_stalls" in stalls[0]
    assert "[MainThread]" in stalls[0] and "test_hang.py" in stalls[0]
    assert any("1 of 1 rank(s) stalled" in m for m in _records(caplog, "hang summary"))
    assert _records(caplog, "Going on (abort_after_dump=False)")
    _slow_step(1.2)  # three more timeouts without a heartbeat: once per stall, it re-arms only at the next one
    assert len(_records(caplog, "Stacks of all threads")) == 1


def test_watchdog_without_abort_keeps_watching_after_a_stall(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratlib.hang")
    hang.install(stall_timeout=0.3, dump_signal=None, abort_after_dump=False)
    for step in range(2):
        hang.heartbeat(step)
        stalls = _step_until_stalls(caplog, step + 1)  # stall k comes after heartbeat k, before heartbeat k + 1
        assert len(stalls) == step + 1 and f"last step {step}" in stalls[step], stalls
    stalls = _records(caplog, "Stacks of all threads")
    assert len(stalls) == 2 and "last step 0" in stalls[0] and "last step 1" in stalls[1], stalls


def test_signal_dump_in_process(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratlib.hang")
    hang.install(dump_signal="SIGUSR2")
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not _records(caplog, "stack dump on SIGUSR2") and time.monotonic() < deadline:
        time.sleep(0.05)
    dump = _records(caplog, "stack dump on SIGUSR2")
    assert dump and "test_signal_dump_in_process" in dump[0] and "[MainThread]" in dump[0], dump


def test_dump_stacks_on_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratlib.hang")
    hang.dump_stacks("because the test asked")
    (text,) = _records(caplog, "because the test asked")
    assert "test_dump_stacks_on_request" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stall_timeout": 0}, "hang.install: stall_timeout=0. Expected: a number of seconds > 0"),
        ({"stall_timeout": "5"}, "stall_timeout='5'"),
        ({"dump_signal": "SIGNOPE"}, "dump_signal='SIGNOPE' is not a signal on this platform"),
        ({"dump_signal": "SIGSEGV"}, "cannot dump stacks on signal 11"),
    ],
)
def test_install_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        hang.install(**kwargs)
    assert not hang.is_installed()


def test_install_is_idempotent_and_uninstall_stops_everything() -> None:
    before = {t.name for t in threading.enumerate()}
    for _ in range(3):
        hang.install(stall_timeout=30, dump_signal="USR2")
    names = [t.name for t in threading.enumerate() if t.name.startswith("ratlib-hang")]
    assert sorted(names) == ["ratlib-hang-dump", "ratlib-hang-watchdog"], names
    hang.uninstall()
    deadline = time.monotonic() + 5
    while {t.name for t in threading.enumerate()} - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {t.name for t in threading.enumerate()} - before
    assert not hang.is_installed()


def test_collective_check_is_a_no_op_in_one_process() -> None:
    from ratlib import comm

    hang.install(check_collectives=True, dump_signal=None)
    assert comm.all_reduce_mean(2.0) == 2.0 and comm.broadcast_object("x") == "x"


def test_import_is_light_and_heartbeat_works_uninstalled() -> None:
    code = (
        "import sys, ratlib.hang as h; h.heartbeat(3); h.before_collective('x'); "
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------------------------
# The summary table


def _report(rank: int, step: int, frame: str, site: str | None = None, age: float = 4.0) -> StallReport:
    return StallReport(rank, step, 1000.0 - age, frame, site or frame, "node1", 10 + rank)


def test_summary_marks_the_rank_at_another_step_and_place() -> None:
    reports = [_report(r, 7, "c10d.py:9 in all_reduce", "train.py:40 in main") for r in (0, 1, 3)]
    reports.append(_report(2, 6, "loader.py:12 in next_batch", "train.py:31 in main", age=9.0))
    text, odd = format_summary(reports, 4, 5, now=1000.0)
    assert odd == [2]
    assert "4 of 4 rank(s) stalled (no heartbeat for 5 s); odd one out: rank 2." in text
    row = next(line for line in text.splitlines() if line.startswith(">>"))
    assert re.match(
        r">>\s+2\s+6\s+9\.0s\s+loader.py:12 in next_batch\s+train.py:31 in main\s+node1:12\s+"
        r"<- step 6 \(others 7\), elsewhere$",
        row,
    ), row
    assert sum(line.startswith(">>") for line in text.splitlines()) == 1


def test_summary_marks_silent_ranks_and_same_step_elsewhere() -> None:
    reports = [_report(0, 5, "a.py:1 in f"), _report(1, 5, "a.py:1 in f"), _report(2, 5, "b.py:2 in g")]
    text, odd = format_summary(reports, 5, 3, now=1000.0)
    assert odd == [2, 3, 4]
    assert "<- elsewhere" in text and text.count("(no report: still running, dead, or blocked holding the GIL)") == 2
    assert "odd one out: ranks 2-4" in text


def test_summary_without_a_majority_marks_no_rank() -> None:
    text, odd = format_summary([_report(0, 5, "a.py:1 in f"), _report(1, 4, "b.py:2 in g")], 2, 3, now=1000.0)
    assert odd == [] and "no majority" in text and ">>" not in text
    text, odd = format_summary([_report(0, 5, "a.py:1 in f"), _report(1, 5, "a.py:1 in f")], 2, 3, now=1000.0)
    assert odd == [] and "every reporting rank is at the same step and place" in text


def test_ranks_text() -> None:
    assert hang_summary._ranks_text([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"
    assert hang_summary._ranks([3]) == "rank 3" and hang_summary._ranks([1, 2]) == "ranks 1-2"
