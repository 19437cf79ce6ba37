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

The package: ``state`` (the rank and the settings), ``streams`` (the rank file, captured stdout); the policy,
``setup_logging`` and the logger are here.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, MutableMapping
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from ratlib.errors import RatlibError, message
from ratlib.rank_logger.state import (
    _LOCK,
    _STATE,
    _dist_module,
    _refresh,
    _resolve,
    current_rank,
    log_file_path,
    rank_tag,
)
from ratlib.rank_logger.streams import (
    LogDirError,
    LogLevelError,
    _level,
    _OtherRanksStdout,
    _RankFileHandler,
    _writable_dir,
)

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
