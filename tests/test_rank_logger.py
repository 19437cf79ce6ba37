"""ratlib.rank_logger: the rank policy on real processes, per-rank files, hooks and bad input."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import logger_targets
import pytest

from ratlib import rank_logger
from ratlib.testing import run_on_ranks


def _lines(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


@pytest.mark.distributed
def test_policy_on_four_ranks(tmp_path: Path) -> None:
    run = run_on_ranks(logger_targets.policy, 4, args=(str(tmp_path),), timeout=120).check()
    err = run.stderrs
    # INFO once, on the main rank only
    assert sum(len(_lines(e, "info-x")) for e in err) == 1 and len(_lines(err[0], "info-x")) == 1
    # warnings and errors from every rank, tagged
    for r in range(4):
        for word, level in (("warn-y", "WARNING"), ("error-z", "ERROR")):
            (line,) = _lines(err[r], word)
            assert f"[rank {r}/4] {level} lib.module: {word}" in line
        (line,) = _lines(err[r], "everyone-w")
        assert f"[rank {r}/4] INFO" in line
        # warnings.warn captured once per rank, tagged (the next line is the source line)
        (line,) = [ln for ln in _lines(err[r], "careful-v") if "py.warnings" in ln]
        assert f"[rank {r}/4] WARNING py.warnings" in line
        assert not _lines(err[r], "debug-never")
    # third-party INFO noise follows the same policy
    assert [len(_lines(e, "noise-from-library")) for e in err] == [1, 0, 0, 0]
    assert [len(_lines(e, "after-teardown")) for e in err] == [1, 0, 0, 0]
    # per-rank files keep everything at INFO and above, printed or not
    for r in range(4):
        text = (tmp_path / f"rank{r}.log").read_text()
        for word in ("info-x", "warn-y", "error-z", "everyone-w", "ordered", "after-teardown"):
            assert word in text, (r, word)
        assert "debug-never" not in text
        assert f"[rank {r}/4]" in text


@pytest.mark.distributed
def test_in_order_prints_rank_by_rank(tmp_path: Path) -> None:
    run = run_on_ranks(logger_targets.policy, 2, args=(str(tmp_path),), timeout=120).check()
    assert all(len(_lines(e, "ordered")) == 1 for e in run.stderrs)
    stamps = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert all("ordered" in s for s in stamps)
    ordered = [line for s in stamps for line in s.splitlines() if line.endswith("ordered")]
    assert len(ordered) == 2 and all("[logger_targets.py:" in line for line in ordered), ordered  # the caller


@pytest.mark.distributed
def test_rank_known_only_after_init(tmp_path: Path) -> None:
    run = run_on_ranks(
        logger_targets.spawned_rank,
        2,
        args=(str(tmp_path),),
        launcher="none",
        env=lambda r: {"MY_RANK": str(r)},
        timeout=120,
    ).check()
    assert [len(_lines(e, "main-only-after-init")) for e in run.stderrs] == [1, 0]
    assert "[rank 1/2] WARNING" in _lines(run.stderrs[1], "tagged-after-init")[0]
    # nothing was logged before init, so the lazily opened files carry the ranks from the process group:
    # no stray rank0.log written by rank 1 (that would have been a duplicate, rank0.dup-pid*.log)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.log", "rank1.log"]
    assert "tagged-after-init" in (tmp_path / "rank1.log").read_text()
    assert "[rank 1/2]" not in (tmp_path / "rank0.log").read_text()


@pytest.mark.distributed
def test_uncaught_exception_is_logged_with_rank(tmp_path: Path) -> None:
    run = run_on_ranks(logger_targets.crash, 2, args=(str(tmp_path),), timeout=60)
    assert run.returncodes[0] == 0 and run.returncodes[1] != 0
    assert "[rank 1/2] CRITICAL ratlib: uncaught RuntimeError" in run.stderrs[1]
    assert run.stderrs[1].count("Traceback (most recent call last)") == 1  # tagged once, not again untagged
    assert "boom on one rank" in (tmp_path / "rank1.log").read_text()


@pytest.mark.parametrize("with_files", [True, False])
def test_an_uncaught_ratlib_error_shows_its_message_once(tmp_path: Path, with_files: bool) -> None:
    """One process, no group: the message once, then the traceback in the file (or once, under it)."""
    log_dir = repr(str(tmp_path)) if with_files else "None"
    code = (
        "from ratlib.rank_logger import setup_logging\n"
        "from ratlib.coco_paths import CocoPathError\n"
        f"setup_logging('INFO', log_dir={log_dir})\n"
        "def load(): raise CocoPathError('no annotations under /data. Fix: pass root=')\n"
        "load()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("no annotations under /data") == 1, out.stderr
    assert "CRITICAL ratlib: uncaught CocoPathError on [rank 0/1]: no annotations" in out.stderr
    if with_files:
        assert "Traceback" not in out.stderr and f"(traceback in {tmp_path / 'rank0.log'})" in out.stderr
        text = (tmp_path / "rank0.log").read_text()
        assert "line 4, in load" in text and text.count("no annotations under /data") == 2  # message, exc line
    else:
        assert out.stderr.count("Traceback (most recent call last)") == 1 and "line 4, in load" in out.stderr


@pytest.mark.distributed
def test_other_ranks_stdout_off_quiets_a_printing_library_but_not_its_warnings(tmp_path: Path) -> None:
    run = run_on_ranks(logger_targets.library_prints, 2, args=(str(tmp_path), "quiet"), timeout=60).check()
    table = "Average Precision  (AP) @[ IoU="
    assert run.stdouts[0].count(table) == 3 and "partial-line" in run.stdouts[0]  # the main rank: untouched
    assert table not in run.outputs[1] and "partial-" not in run.outputs[1], run.outputs[1]
    assert "[rank 1/2] WARNING thirdparty.eval: eval-warning-1" in run.stderrs[1]  # still printed, tagged
    assert "[rank 1/2] ERROR lib.module: eval-error" in run.stderrs[1]
    assert "after-restore" in run.stdouts[1]  # setup_logging() again gives the rank its stdout back
    kept = (tmp_path / "rank1.log").read_text()  # nothing lost: the rank's file has every line
    lines = _lines(kept, "INFO py.stdout [logger_targets.py:")  # named by the line that printed
    assert sum(table in ln for ln in lines) == 3 and lines[-1].endswith("]: partial-line"), kept
    assert "py.stdout" not in (tmp_path / "rank0.log").read_text()


@pytest.mark.distributed
def test_other_ranks_stdout_is_printed_by_default(tmp_path: Path) -> None:
    run = run_on_ranks(logger_targets.library_prints, 2, args=(str(tmp_path), "loud"), timeout=60).check()
    assert all(out.count("Average Precision  (AP) @[ IoU=") == 3 for out in run.stdouts)


@pytest.mark.distributed
def test_in_order_emits_in_rank_order(tmp_path: Path) -> None:
    stamps = tmp_path / "stamps.txt"
    run = run_on_ranks(
        logger_targets.in_order_stamps, 4, args=(str(tmp_path / "logs"), str(stamps)), timeout=120
    ).check()
    # lower ranks reach each call later (rank 0 last), yet the records are emitted 0, 1, 2, 3, every time
    expected = [f"ordered-{n} rank={r}" for n in range(2) for r in range(4)]
    assert stamps.read_text().splitlines() == expected
    for r in range(4):
        lines = _lines(run.stderrs[r], "ordered-")
        assert len(lines) == 2 and all(f"[rank {r}/4] INFO lib.module: ordered-" in ln for ln in lines), lines


@pytest.mark.distributed
def test_uncaught_exception_in_thread_is_logged_with_rank(tmp_path: Path) -> None:
    run = run_on_ranks(logger_targets.thread_crash, 2, args=(str(tmp_path),), timeout=60).check()
    assert run.returncodes == [0, 0]  # a dying thread does not end the process
    head = (
        "[rank 1/2] CRITICAL ratlib: uncaught RuntimeError in thread loader-worker on [rank 1/2]: "
        "thread boom on one rank"
    )
    assert len(_lines(run.stderrs[1], head)) == 1, run.stderrs[1]
    assert run.stderrs[1].count("Traceback (most recent call last)") == 1  # not printed again by Python
    assert "RuntimeError: thread boom on one rank" in run.stderrs[1]
    assert "thread boom" not in run.stderrs[0]
    text = (tmp_path / "rank1.log").read_text()
    assert "CRITICAL ratlib" in text and "in thread loader-worker" in text and "Traceback" in text
    assert "thread boom" not in (tmp_path / "rank0.log").read_text()
    assert _lines(run.stderrs[1], "main-thread-still-alive")


def _child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=60)


def test_rank_from_launcher_variables_without_torch() -> None:
    code = (
        "import sys; from ratlib.rank_logger import get_logger, setup_logging, current_rank\n"
        "setup_logging(); log = get_logger('t'); log.info('hidden'); log.warning('shown')\n"
        "print(current_rank(), 'torch' in sys.modules)"
    )
    cases = {
        "slurm": {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "n1"},
        "openmpi": {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"},
        "mpich": {"PMI_RANK": "2", "PMI_SIZE": "3"},
        "torchrun": {"RANK": "2", "WORLD_SIZE": "3"},
    }
    for name, env in cases.items():
        out = _child(code, env)
        assert out.stdout.strip() == "(2, 3) False", (name, out.stderr)
        assert "hidden" not in out.stderr and "[rank 2/3] WARNING t: shown" in out.stderr, name


def test_invalid_launcher_variables_never_break_logging() -> None:
    out = _child(
        "from ratlib.rank_logger import get_logger, setup_logging\nsetup_logging()\n"
        "get_logger('t').info('still-printed')",
        {"RANK": "5", "WORLD_SIZE": "2"},
    )
    assert out.returncode == 0
    assert "cannot tell this process's rank" in out.stderr and "[rank ?/?] INFO t: still-printed" in out.stderr


def test_same_rank_claimed_twice_is_detected(tmp_path: Path) -> None:
    code = (
        "import time; from ratlib.rank_logger import get_logger, setup_logging\n"
        f"setup_logging(log_dir={str(tmp_path)!r}); get_logger('t').warning('hello'); time.sleep(3)"
    )
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    import os

    full = {**os.environ, **env}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=full) for _ in range(2)
    ]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert sum("two processes claim rank 1" in e for e in errs) == 1, errs
    assert (tmp_path / "rank1.log").exists() and list(tmp_path.glob("rank1.dup-pid*.log"))


def test_setup_logging_is_idempotent_and_validates() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        rank_logger.setup_logging("INFO", stream=stream)
        rank_logger.setup_logging("INFO", stream=stream)
        assert len(root.handlers) == len(before) + 1
        rank_logger.get_logger("x").info("once")
        assert stream.getvalue().count("once") == 1
        with pytest.raises(ValueError, match="level='LOUD' is not a logging level"):
            rank_logger.setup_logging("LOUD")
        with pytest.raises(ValueError, match="other_ranks='DEBUG' is below level='INFO'"):
            rank_logger.setup_logging("INFO", other_ranks="DEBUG")
        blocker = Path(__file__)  # a file: a folder cannot be created below it
        with pytest.raises(OSError, match="log_dir=.* cannot be created"):
            rank_logger.setup_logging(log_dir=blocker / "sub")
    finally:
        for handler in rank_logger._STATE.handlers:
            root.removeHandler(handler)
        rank_logger._STATE.handlers = []


def test_logger_is_stdlib_compatible_and_keeps_caller_location() -> None:
    stream = io.StringIO()
    log = rank_logger.get_logger("compat")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(filename)s:%(funcName)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        log.info("hi %s", "there")
        try:
            raise KeyError("k")
        except KeyError:
            log.exception("failed")
        assert rank_logger.get_logger("compat") is log
        assert isinstance(log, logging.LoggerAdapter) and log.isEnabledFor(logging.INFO)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "test_rank_logger.py:test_logger_is_stdlib_compatible_and_keeps_caller_location INFO hi there" in text
    assert "KeyError: 'k'" in text


def test_rank_zero_only_and_progress_single_process() -> None:
    calls = []
    fn = rank_logger.rank_zero_only(lambda: calls.append(1) or "ran")
    assert fn() == "ran" and calls == [1]
    assert list(rank_logger.progress(range(3), disable=True)) == [0, 1, 2]


def test_rank_zero_only_and_progress_on_other_rank() -> None:
    out = _child(
        "from ratlib.rank_logger import rank_zero_only, progress\n"
        "print(rank_zero_only(lambda: 'ran')(), type(progress([1, 2])).__name__)",
        {"RANK": "1", "WORLD_SIZE": "2"},
    )
    assert out.stdout.strip() == "None list"


def test_dictconfig_and_user_handlers_coexist() -> None:
    import logging.config

    stream = io.StringIO()
    rank_logger.setup_logging("INFO", stream=stream)
    try:
        logging.config.dictConfig({"version": 1, "incremental": True, "loggers": {"noisy": {"level": "ERROR"}}})
        rank_logger.get_logger("noisy").warning("quiet-please")
        rank_logger.get_logger("fine").warning("loud")
        assert "quiet-please" not in stream.getvalue()
        assert re.search(r"WARNING fine: loud", stream.getvalue())
    finally:
        root = logging.getLogger()
        for handler in rank_logger._STATE.handlers:
            root.removeHandler(handler)
        rank_logger._STATE.handlers = []


def test_hooks_installed_before_setup_still_run() -> None:
    code = (
        "import sys, threading\n"
        "def mine(t, e, tb): print('user-sys-hook', t.__name__, e, flush=True)\n"
        "def mine_thread(args): print('user-thread-hook', args.exc_type.__name__, args.exc_value, flush=True)\n"
        "sys.excepthook, threading.excepthook = mine, mine_thread\n"
        "from ratlib.rank_logger import setup_logging\n"
        "setup_logging()\n"
        "def work(): raise ValueError('in-thread')\n"
        "t = threading.Thread(target=work, name='w1'); t.start(); t.join()\n"
        "raise KeyError('in-main')"
    )
    out = _child(code, {"RANK": "1", "WORLD_SIZE": "2"})
    assert out.returncode == 1
    # ours logged each one, tagged, then the user's hook ran
    assert "[rank 1/2] CRITICAL ratlib: uncaught ValueError in thread w1 on [rank 1/2]: in-thread" in out.stderr
    assert "[rank 1/2] CRITICAL ratlib: uncaught KeyError on [rank 1/2]: 'in-main'" in out.stderr
    assert out.stdout.splitlines() == ["user-thread-hook ValueError in-thread", "user-sys-hook KeyError 'in-main'"]


def test_log_dir_created_and_file_opened_at_first_record(tmp_path: Path) -> None:
    log_dir = tmp_path / "a" / "b"
    code = (
        "import os, sys\n"
        "from ratlib.rank_logger import get_logger, log_file_path, setup_logging\n"
        f"d = {str(log_dir)!r}\n"
        "setup_logging('INFO', log_dir=d); setup_logging('INFO', log_dir=d)\n"
        "print('after-setup', os.path.isdir(d), sorted(os.listdir(d)), log_file_path().name)\n"
        "log = get_logger('t'); log.debug('below-level')\n"
        "print('after-debug', sorted(os.listdir(d)))\n"
        "log.info('first-record')\n"
        "print('after-info', sorted(os.listdir(d)), log_file_path().name)\n"
    )
    assert not (tmp_path / "a").exists()
    out = _child(code, {"RANK": "1", "WORLD_SIZE": "2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "after-setup True [] rank1.log",  # folder made, no file yet
        "after-debug []",  # a record below the file level opens nothing
        "after-info ['rank1.log'] rank1.log",
    ]  # no rank0.log, no rank-pending.log
    assert "first-record" in (log_dir / "rank1.log").read_text()
    assert "first-record" not in out.stderr  # INFO on rank 1: the file only


def test_progress_is_a_tqdm_bar_on_the_main_rank() -> None:
    code = (
        "import io; from tqdm.std import tqdm\n"
        "from ratlib.rank_logger import progress\n"
        "f = io.StringIO(); bar = progress(range(3), desc='epoch 1', file=f)\n"
        "print(isinstance(bar, tqdm), list(bar), bar.n, 'epoch 1' in f.getvalue())"
    )
    out = _child(code)
    assert out.stdout.strip() == "True [0, 1, 2] 3 True", out.stderr


def test_progress_is_the_plain_iterable_elsewhere() -> None:
    code = (
        "from ratlib.rank_logger import progress\n"
        "items = iter([1, 2])\n"
        "print(progress(items, desc='x') is items, list(progress(items)))"
    )
    # a non-main rank, from the launcher's variables (no process group)
    for env in (
        {"RANK": "1", "WORLD_SIZE": "2"},
        {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "n1"},
    ):
        out = _child(code, env)
        assert out.stdout.strip() == "True [1, 2]", (env, out.stderr)
        assert not out.stderr, out.stderr  # no bar drawn
    # the main rank without tqdm installed
    out = _child("import sys; sys.modules['tqdm'] = None\n" + code)
    assert out.stdout.strip() == "True [1, 2]" and not out.stderr, out.stderr


def test_the_adapter_forwards_the_stdlib_loggers_names_both_ways() -> None:
    # Reading and setting go to the stdlib logger (setting used to land on the adapter and do nothing), and a
    # custom logger class's own methods are reachable, without a __getattr__ on the hot path.
    log = rank_logger.get_logger("ratlib.test.forward")
    plain = logging.getLogger("ratlib.test.forward")
    assert log.handlers is plain.handlers and log.parent is plain.parent
    log.propagate = False
    try:
        assert plain.propagate is False and "propagate" not in vars(log)
    finally:
        plain.propagate = True
    log.disabled = True
    try:
        assert plain.disabled is True and "disabled" not in vars(log)
    finally:
        plain.disabled = False
    with pytest.raises(AttributeError):
        log.no_such_name  # noqa: B018
    assert not any("__getattr__" in vars(c) for c in type(log).__mro__)
    public = {n for n in dir(plain) if not n.startswith("_")}
    assert public <= set(dir(log)), public - set(dir(log))  # every public name of a stdlib logger is forwarded

    class TraceLogger(logging.Logger):
        def trace(self, msg: str) -> str:
            return f"trace {msg}"

    logging.setLoggerClass(TraceLogger)
    try:
        custom = rank_logger.get_logger("ratlib.test.forward.custom")
    finally:
        logging.setLoggerClass(logging.Logger)
    assert custom.trace("x") == "trace x" and isinstance(custom, type(log))


def test_an_unknown_rank_is_not_the_main_rank_and_is_warned_once() -> None:
    code = (
        "from ratlib.rank_logger import get_logger, progress, rank_zero_only, setup_logging\n"
        "from ratlib.launch import is_main_process\n"
        "setup_logging(); ran = []\n"
        "@rank_zero_only\ndef f(): ran.append(1)\n"
        "f(); f(); bar = progress([1, 2])\n"
        "print(ran, type(bar).__name__, is_main_process(), is_main_process())\n"
        "get_logger('t').info('still-printed')"
    )
    out = _child(code, {"RANK": "5", "WORLD_SIZE": "2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] list False False", out.stdout  # skipped, as on any non-main rank
    assert out.stderr.count("cannot tell this process's rank") == 1, out.stderr
    assert "it is not the main rank" in out.stderr and "RANK=5 is not below WORLD_SIZE=2" in out.stderr


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, a folder that takes no files")
def test_a_log_dir_that_takes_no_files_fails_at_set_up() -> None:
    from ratlib.errors import RatlibError

    with pytest.raises(rank_logger.LogDirError, match=r"log_dir='/proc' is not writable") as info:
        rank_logger.setup_logging(log_dir="/proc")
    assert isinstance(info.value, RatlibError) and isinstance(info.value, OSError)
    assert "Fix: pass a writable folder, or log_dir=None." in str(info.value)
