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
    warnings.warn("careful-v")
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
