"""Functions run on several ranks by tests/test_rank_logger.py."""

from __future__ import annotations

import sys
import warnings

from ratlib.rank_logger import get_logger, setup_logging

log = get_logger("lib.module")  # module level, created before any process group exists


def policy(log_dir: str) -> int:
    import torch.distributed as dist

    setup_logging("INFO", log_dir=log_dir)
    log.info("info-x")
    log.warning("warn-y")
    log.error("error-z")
    log.info("everyone-%s", "w", main_process_only=False)
    log.debug("debug-never")
    dist.init_process_group("gloo")
    log.info("ordered", in_order=True)
    warnings.warn("careful-v", stacklevel=1)
    third = get_logger("thirdparty")
    third.logger.info("noise-from-library")  # a plain stdlib call from another library
    dist.destroy_process_group()
    log.info("after-teardown")
    sys.stdout.flush()
    return 0


def spawned_rank(log_dir: str) -> int:
    """No launcher rank variables: the rank is known only once init_process_group ran."""
    import os

    import torch.distributed as dist

    rank = int(os.environ.pop("MY_RANK"))
    setup_logging("INFO", log_dir=log_dir)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="env://")
    log.info("main-only-after-init")
    log.warning("tagged-after-init")
    dist.destroy_process_group()
    return 0


def crash(log_dir: str) -> int:
    import os

    setup_logging("INFO", log_dir=log_dir)
    if os.environ["RANK"] == "1":
        raise RuntimeError("boom on one rank")
    return 0


def in_order_stamps(log_dir: str, stamp_file: str) -> int:
    """Each rank appends its rank to one shared O_APPEND file at the moment its in_order record is
    emitted. Lower ranks reach the call later, so without the rank-by-rank barriers the file would read
    in reverse order."""
    import logging
    import os
    import time

    import torch.distributed as dist

    class Stamp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("ordered-"):
                fd = os.open(stamp_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{record.getMessage()} rank={dist.get_rank()}\n".encode())
                finally:
                    os.close(fd)

    setup_logging("INFO", log_dir=log_dir)
    logging.getLogger().addHandler(Stamp())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for round_ in range(2):
        dist.barrier()
        time.sleep(0.15 * (world - 1 - rank))  # rank 0 arrives last
        log.info("ordered-%d", round_, in_order=True)
    dist.destroy_process_group()
    return 0


def thread_crash(log_dir: str) -> int:
    """Rank 1 dies in a non-main thread; the process itself goes on and exits 0."""
    import os
    import threading

    setup_logging("INFO", log_dir=log_dir)

    def work() -> None:
        if os.environ["RANK"] == "1":
            raise RuntimeError("thread boom on one rank")

    worker = threading.Thread(target=work, name="loader-worker")
    worker.start()
    worker.join()
    log.warning("main-thread-still-alive")
    return 0


def _evaluator_summary() -> None:
    """A library's own output, printed on every rank (the shape of a COCO evaluator's summary)."""
    for iou in ("0.50:0.95", "0.50", "0.75"):
        print(f" Average Precision  (AP) @[ IoU={iou:<9} | area=   all | maxDets=100 ] = 0.123")
    print("partial-", end="", flush=True)
    print("line")


def library_prints(log_dir: str, quiet: str) -> int:
    """Third-party output on every rank, with ``other_ranks_stdout`` off (``quiet="quiet"``) or on."""
    import logging

    setup_logging("INFO", log_dir=log_dir, other_ranks_stdout=quiet != "quiet")
    _evaluator_summary()
    logging.getLogger("thirdparty.eval").warning("eval-warning-%d", 1)  # a library's warning, every rank
    log.error("eval-error")
    sys.stdout.flush()
    setup_logging("INFO", log_dir=log_dir)  # the default again: this rank's stdout is the real one
    print("after-restore", flush=True)
    return 0
