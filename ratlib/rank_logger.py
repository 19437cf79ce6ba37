"""Logging that is safe and useful on every rank.

``get_logger(name)`` never returns None: it is a stdlib-compatible logger on every rank, before the
process group exists, while it exists and after teardown. The policy (set once by ``setup_logging``):

- the main rank prints records at ``level`` and above;
- other ranks print only records at ``other_ranks`` (default WARNING) and above, tagged ``[rank R/W]``,
  so no rank's warnings or errors are ever dropped;
- ``log.info(msg, main_process_only=False)`` prints on every rank, ``in_order=True`` rank by rank;
- with ``log_dir`` every rank also writes ``rank{R}.log`` with every record at ``level`` and above,
  printed or not, for post-mortems;
- uncaught exceptions (any thread) and ``warnings.warn`` are logged with the rank tag.

The rank is ``ratlib.launch.rank_state()``'s: the process group's once it exists (torch is never
imported here), else the launcher's variables, else rank 0 of 1. An unknown rank (invalid launcher
variables) is not the main rank: ``rank_zero_only`` and ``progress`` skip it, and the console prints
every record, tagged ``[rank ?/?]``. A dropped call on a non-main rank returns after one comparison:
no record, no formatting, no I/O.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable, MutableMapping
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from ratlib.errors import RatlibError, message
from ratlib.launch import process_group, rank_state

__all__ = [
    "LogDirError",
    "LogLevelError",
    "RankFilter",
    "RankLogger",
    "current_rank",
    "get_logger",
    "log_file_path",
    "progress",
    "rank_tag",
    "rank_zero_only",
    "setup_logging",
]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

CONSOLE_FORMAT = "%(asctime)s %(rank_tag)s%(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_ALL_RANKS = "ratlib_all_ranks"  # record attribute set by main_process_only=False
_BRIEF = "ratlib_brief"  # record attribute: an exception report whose RatlibError traceback goes to the file only
_REPORTED = "_ratlib_reported"  # exception attribute: already reported on this rank (the hooks stay quiet)


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
        self.file_handler: _RankFileHandler | None = None
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


# ----------------------------------------------------------------------------------------------
# Handlers and filters


class RankFilter(logging.Filter):
    """Adds ``record.rank``, ``record.world_size`` and ``record.rank_tag`` (empty for one process).

    Add it to your own handlers to use ``%(rank_tag)s`` in their formats.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Tag the record with this process's rank; never drops it."""
        _refresh()
        record.rank, record.world_size, record.rank_tag = _STATE.rank, _STATE.world, _STATE.tag
        return True


class _ConsolePolicy(RankFilter):
    """Main rank: everything the handler level lets through. Other ranks: ``other_ranks`` and above,
    or records logged with ``main_process_only=False``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _STATE.resolved or _STATE.from_dist or "torch.distributed" in sys.modules:
            _refresh()
        state = _STATE
        record.rank, record.world_size, record.rank_tag = state.rank, state.world, state.tag
        if not state.known or state.rank == 0:
            return True
        return record.levelno >= _STATE.other_ranks or getattr(record, _ALL_RANKS, False)


class _ConsoleFormatter(logging.Formatter):
    """The console format. An exception ratlib reports (uncaught, or leaving ``distributed()``) that is a
    ``RatlibError`` shows its message only, and where its traceback is, when the rank writes a log file: the
    message says what to do, and the traceback, which is about ratlib's internals, would bury it."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if not (isinstance(exc, RatlibError) and getattr(record, _BRIEF, False)):
            return super().format(record)
        brief = copy.copy(record)  # the file handler formats the original, traceback included
        brief.exc_info, brief.exc_text, brief.stack_info = None, None, None
        if _STATE.file_handler is not None:
            return f"{super().format(brief)}\n(traceback in {log_file_path()})"
        # no file: the traceback here, without its last line, which would repeat the message just printed
        chunks = list(traceback.TracebackException.from_exception(exc).format())
        last = list(traceback.TracebackException.from_exception(exc).format_exception_only())
        if chunks[-len(last) :] == last:
            chunks = chunks[: -len(last)]
        return f"{super().format(brief)}\n{''.join(chunks).rstrip()}"


def _report_exception(logger_name: str, level: int, msg: str, *args: Any, exc: BaseException) -> None:
    """Log ``exc`` on this rank (console and file, tagged, whatever the rank) and mark it reported, so that
    the excepthook does not print it a second time when it goes on to end the process."""
    logging.getLogger(logger_name).log(
        level,
        msg,
        *args,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={_ALL_RANKS: True, _BRIEF: True},
    )
    try:
        setattr(exc, _REPORTED, True)
    except AttributeError:  # pragma: no cover - an exception type with __slots__ and no __dict__
        pass


def _reported(exc: BaseException | None) -> bool:
    return exc is not None and getattr(exc, _REPORTED, False) is True


class LogDirError(RatlibError, OSError):
    """``setup_logging(log_dir=...)``: the folder cannot be created or written."""


class LogLevelError(RatlibError, ValueError):
    """``setup_logging``: a level that is not a logging level, or ``other_ranks`` below ``level``."""


class _RankFileHandler(logging.FileHandler):
    """``rank{R}.log``, opened at the first record, flushed on each one, exclusive to one process."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        super().__init__(log_dir / "rank-pending.log", mode="a", encoding="utf-8", delay=True)

    def _open(self) -> Any:
        rank, _ = current_rank()
        name = f"rank{rank}" if rank >= 0 else "rank-unknown"
        self.baseFilename = str(self.log_dir / f"{name}.log")
        stream = open(self.baseFilename, self.mode, encoding=self.encoding)
        if not _try_lock(stream):
            stream.close()
            taken = self.baseFilename
            self.baseFilename = str(self.log_dir / f"{name}.dup-pid{os.getpid()}.log")
            print(
                f"ratlib.rank_logger: {taken} is already being written by another live process, so two "
                f"processes claim rank {rank}; this one (pid {os.getpid()}) writes {self.baseFilename} instead. "
                "Check the launcher: every process needs its own RANK.",
                file=sys.stderr,
            )
            stream = open(self.baseFilename, self.mode, encoding=self.encoding)
        return stream


def _try_lock(stream: Any) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, no detection
        return True
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _level(value: int | str, arg: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        number = logging.getLevelName(value.strip().upper())
        if isinstance(number, int):
            return number
    names = ", ".join(logging.getLevelName(n) for n in (10, 20, 30, 40, 50))
    raise LogLevelError(
        message(f"setup_logging: {arg}={value!r} is not a logging level", expected=f"one of {names}, or an int")
    )


def _writable_dir(log_dir: str | os.PathLike[str]) -> Path:
    """``log_dir``, created, after writing a file in it: a folder that takes no files fails here, at set-up
    (``os.access`` says yes to root everywhere, also on /proc), not at the first log call."""
    directory = Path(log_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LogDirError(
            exc.errno,
            message(
                f"setup_logging: log_dir={os.fspath(log_dir)!r} cannot be created ({exc.strerror})",
                fix="pass a writable folder, or log_dir=None",
            ),
        ) from None
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".ratlib-log-probe-"):
            pass
    except OSError as exc:
        raise LogDirError(
            exc.errno,
            message(
                f"setup_logging: log_dir={os.fspath(log_dir)!r} is not writable ({exc.strerror})",
                fix="pass a writable folder, or log_dir=None",
            ),
        ) from None
    return directory


class _OtherRanksStdout:
    """``sys.stdout`` under ``setup_logging(other_ranks_stdout=False)``: the main rank (and an unknown rank,
    which prints everything) writes through; another rank's complete lines become INFO records of
    ``py.stdout``, which its console drops and its file keeps. The rank is read at each write, so a rank
    learnt only from ``init_process_group`` is honoured. Everything else (``fileno``, ``buffer``, ...) is
    the real stream's: output written to the file descriptor or ``sys.stdout.buffer`` is not caught."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self._pending = ""
        self._lock = threading.RLock()
        self._inside = threading.local()  # a handler writing to sys.stdout must not loop back here

    def write(self, text: str) -> int:
        """Write through on the main rank; log the complete lines on the others."""
        if current_rank()[0] <= 0:
            return self.original.write(text)
        if getattr(self._inside, "active", False):
            return len(text)  # a handler of ours that writes to sys.stdout: the record is logged already
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            self._inside.active = True
            try:
                for line in lines:
                    logging.getLogger("py.stdout").info("%s", line, stacklevel=2)  # the file names the caller
            finally:
                self._inside.active = False
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        """``write`` each."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Flush the real stream (a partial line on another rank waits for its newline)."""
        self.original.flush()

    def isatty(self) -> bool:
        """The real stream's answer on the main rank; False elsewhere (nothing reaches a terminal)."""
        return bool(self.original.isatty()) if current_rank()[0] <= 0 else False

    def __getattr__(self, name: str) -> Any:
        # through __dict__: before __init__ (a copy being built) getattr(None, name) fails, without recursion
        return getattr(self.__dict__.get("original"), name)


def setup_logging(
    level: int | str = "INFO",
    *,
    log_dir: str | os.PathLike[str] | None = None,
    other_ranks: int | str = "WARNING",
    excepthook: bool = True,
    capture_warnings: bool = True,
    stream: Any = None,
    fmt: str = CONSOLE_FORMAT,
    other_ranks_stdout: bool = True,
) -> None:
    """Configure rank-aware logging for this process. Idempotent: a second call replaces the first.

    Handlers go on the root logger, so third-party loggers follow the same policy. Bad arguments raise
    here (``LogLevelError``, a ``ValueError``; ``LogDirError``, an ``OSError``, for a folder that takes no
    files), never at the first log call deep inside training.

    ``other_ranks_stdout=False``: what the other ranks write to ``sys.stdout`` (``print`` in your code or in
    a library, e.g. pycocotools' AP table) stays off the console; each line becomes an INFO record of the
    logger ``py.stdout``, so it is in the rank's file with ``log_dir``. Their logged warnings and errors
    still print, tagged (they go to ``stderr``). The main rank's stdout is untouched.
    """
    lvl, other = _level(level, "level"), _level(other_ranks, "other_ranks")
    if other < lvl:
        raise LogLevelError(
            message(
                f"setup_logging: other_ranks={other_ranks!r} is below level={level!r}: other ranks would print more",
                fix="use other_ranks >= level (default WARNING)",
            )
        )
    directory: Path | None = None
    if log_dir is not None:
        directory = _writable_dir(log_dir)
    with _LOCK:
        root = logging.getLogger()
        for handler in _STATE.handlers:  # idempotent: never double handlers
            root.removeHandler(handler)
            handler.close()
        _STATE.handlers, _STATE.file_handler = [], None
        _STATE.level, _STATE.other_ranks, _STATE.log_dir = lvl, other, directory
        _resolve()
        if isinstance(stream, _OtherRanksStdout):  # sys.stdout passed after an earlier other_ranks_stdout=False
            stream = stream.original
        console = logging.StreamHandler(stream if stream is not None else sys.stderr)
        console.setLevel(lvl)
        console.addFilter(_ConsolePolicy())
        console.setFormatter(_ConsoleFormatter(fmt, DATE_FORMAT))
        _STATE.handlers.append(console)
        if directory is not None:
            fh = _RankFileHandler(directory)
            fh.setLevel(lvl)
            fh.addFilter(RankFilter())
            fh.setFormatter(
                logging.Formatter(
                    "%(asctime)s %(rank_tag)s%(levelname)s %(name)s [%(filename)s:%(lineno)d]: %(message)s", DATE_FORMAT
                )
            )
            _STATE.handlers.append(fh)
            _STATE.file_handler = fh
        for handler in _STATE.handlers:
            root.addHandler(handler)
        root.setLevel(lvl)
        logging.captureWarnings(capture_warnings)
        if not other_ranks_stdout and not isinstance(sys.stdout, _OtherRanksStdout):
            sys.stdout = _OtherRanksStdout(sys.stdout)
        elif other_ranks_stdout and isinstance(sys.stdout, _OtherRanksStdout):
            sys.stdout = sys.stdout.original
        if excepthook and not _STATE.hooks_installed:
            _install_hooks()
        _STATE.configured = True


def _install_hooks() -> None:
    previous_sys, previous_thread = sys.excepthook, threading.excepthook

    def sys_hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not issubclass(exc_type, KeyboardInterrupt) or _reported(exc):
            if not _reported(exc):  # distributed() reported it already, on its way out: once per rank
                _report_exception(
                    "ratlib", logging.CRITICAL, "uncaught %s on %s: %s", exc_type.__name__, rank_tag(), exc, exc=exc
                )
            if previous_sys is sys.__excepthook__ and _STATE.handlers:
                return  # our console handler printed it, tagged: Python's default would print it again
        previous_sys(exc_type, exc, tb)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            name = args.thread.name if args.thread is not None else "?"
            if args.exc_value is not None and not _reported(args.exc_value):
                _report_exception(
                    "ratlib",
                    logging.CRITICAL,
                    "uncaught %s in thread %s on %s: %s",
                    args.exc_type.__name__,
                    name,
                    rank_tag(),
                    args.exc_value,
                    exc=args.exc_value,
                )
            elif args.exc_value is None:  # ExceptHookArgs allows a None value (never seen from a thread)
                logging.getLogger("ratlib").critical(
                    "uncaught %s in thread %s on %s", args.exc_type.__name__, name, rank_tag(), extra={_ALL_RANKS: True}
                )
            if previous_thread is threading.__excepthook__ and _STATE.handlers:
                return  # printed, tagged, by our console handler
        previous_thread(args)

    sys.excepthook, threading.excepthook = sys_hook, thread_hook
    _STATE.hooks_installed = True


# ----------------------------------------------------------------------------------------------
# The logger


def _forward(name: str) -> property:
    return property(
        lambda self: getattr(self.logger, name),
        lambda self, value: setattr(self.logger, name, value),
        doc=f"The stdlib logger's ``{name}``.",
    )


class RankLogger(logging.LoggerAdapter):
    """A stdlib logger with two more keywords on every call: ``main_process_only`` (default True:
    below ``other_ranks`` only the main rank prints) and ``in_order`` (print rank by rank)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """The message and keywords unchanged (the rank tag comes from the handlers' filter, not from here)."""
        return msg, kwargs

    # main_process_only and in_order are typed object and read as true or false: LoggerAdapter's methods take
    # any keyword (``**kwargs: object``), so an override that narrowed them would break the base's contract.
    def log(
        self,
        level: int,
        msg: Any,
        *args: Any,
        main_process_only: object = True,
        in_order: object = False,
        **kwargs: Any,
    ) -> None:
        """``logging.Logger.log``, plus ``main_process_only=False`` (print on every rank) and ``in_order=True``
        (print rank by rank: a collective, every rank must call it)."""
        if main_process_only and level < _STATE.drop_below and not in_order:
            return  # the hot path on non-main ranks: one comparison, nothing else
        if not self.logger.isEnabledFor(level):
            return
        if not main_process_only or in_order:
            kwargs["extra"] = {**(kwargs.get("extra") or {}), _ALL_RANKS: True}
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 2
        if in_order:
            self._in_order(level, msg, args, kwargs)
        else:
            self.logger._log(level, msg, args, **kwargs)

    def _in_order(self, level: int, msg: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = {**kwargs, "stacklevel": kwargs["stacklevel"] + 1}  # this frame too: the record names the caller
        dist = _dist_module()
        if dist is None or dist.get_world_size() == 1:
            self.logger._log(level, msg, args, **kwargs)
            return
        for r in range(dist.get_world_size()):
            if r == dist.get_rank():
                self.logger._log(level, msg, args, **kwargs)
                for handler in _STATE.handlers:
                    handler.flush()
            dist.barrier()

    def debug(self, msg: Any, *args: Any, main_process_only: object = True, **kwargs: Any) -> None:
        """Log at DEBUG: the main rank only unless ``main_process_only=False`` (see ``log``)."""
        if main_process_only and _STATE.drop_below > 10 and not kwargs:
            return  # dropped: one comparison, no record
        self.log(10, msg, *args, main_process_only=main_process_only, **kwargs)

    def info(self, msg: Any, *args: Any, main_process_only: object = True, **kwargs: Any) -> None:
        """Log at INFO: the main rank only unless ``main_process_only=False`` (see ``log``)."""
        if main_process_only and _STATE.drop_below > 20 and not kwargs:
            return  # dropped: one comparison, no record
        if not kwargs and main_process_only and self.logger.isEnabledFor(20):
            self.logger._log(20, msg, args, stacklevel=2)  # the common emitted case, without log()'s bookkeeping
            return
        self.log(20, msg, *args, main_process_only=main_process_only, **kwargs)

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        """Log at WARNING: every rank prints it (at the default ``other_ranks="WARNING"``), tagged."""
        self.log(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        """Log at ERROR: every rank prints it, tagged; never dropped."""
        self.log(logging.ERROR, msg, *args, **kwargs)

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        """Log at ERROR with the current exception's traceback (call it in an ``except`` block)."""
        self.log(logging.ERROR, msg, *args, exc_info=exc_info, **kwargs)

    def critical(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        """Log at CRITICAL: every rank prints it, tagged; never dropped."""
        self.log(logging.CRITICAL, msg, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<RankLogger {self.logger.name} ({logging.getLevelName(self.logger.getEffectiveLevel())})>"

    # The stdlib logger's names that LoggerAdapter lacks, read and set through the adapter. Listed, not
    # __getattr__: CPython does not specialise attribute lookups on a class with __getattr__, which made a
    # dropped call 1.1x-1.5x a disabled stdlib call instead of about 0.7x (benchmarks/bench_logging.py).
    handlers = _forward("handlers")
    filters = _forward("filters")
    propagate = _forward("propagate")
    disabled = _forward("disabled")
    level = _forward("level")
    parent = _forward("parent")
    root = _forward("root")
    addHandler = _forward("addHandler")
    removeHandler = _forward("removeHandler")
    addFilter = _forward("addFilter")
    removeFilter = _forward("removeFilter")
    filter = _forward("filter")
    handle = _forward("handle")
    callHandlers = _forward("callHandlers")
    findCaller = _forward("findCaller")
    makeRecord = _forward("makeRecord")
    getChild = _forward("getChild")
    fatal = _forward("fatal")


class _CustomRankLogger(RankLogger):
    """For a custom logger class (``logging.setLoggerClass``): that class's own names, via ``__getattr__``."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "logger":
            raise AttributeError(name)
        return getattr(self.logger, name)


_LOGGERS: dict[str | None, RankLogger] = {}


def get_logger(name: str | None = None) -> RankLogger:
    """The rank-aware logger for ``name`` (None: the root logger). Never None, on any rank, at any time."""
    logger = _LOGGERS.get(name)
    if logger is None:
        if not _STATE.resolved:
            _resolve()
        plain = logging.getLogger(name)
        cls = RankLogger if type(plain) in (logging.Logger, logging.RootLogger) else _CustomRankLogger
        logger = _LOGGERS.setdefault(name, cls(plain))
    return logger


# ----------------------------------------------------------------------------------------------
# Helpers


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorator: ``fn`` runs on the main rank only (returns None elsewhere, and on an unknown rank).
    The rank is read per call."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        if current_rank()[0] == 0:  # an unknown rank (-1) is not the main rank
            return fn(*args, **kwargs)
        return None

    return wrapper


def progress(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """A tqdm bar on the main rank; the plain iterable on other (and unknown) ranks and without tqdm."""
    if current_rank()[0] != 0:  # other ranks, and an unknown rank (-1)
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
