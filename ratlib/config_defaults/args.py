"""A training script's command line (``parse_args``) and ``UsageError``, the error of the user's input that a
training script prints without a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ratlib.errors import RatlibError

__all__ = ["UsageError", "parse_args"]


class UsageError(RatlibError, ValueError):
    """A problem with the user's input (config, paths, checkpoint): a training script prints the message
    without a traceback."""


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """The command line of a training script: --config, --resume, --eval-only, --checkpoint, key=value
    overrides, and the ``--local_rank N`` / ``--local_rank=N`` / ``--local-rank=N`` that DeepSpeed's launcher
    adds (accepted and ignored: ratlib reads LOCAL_RANK from the environment, which wins)."""

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (default: all defaults)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate a checkpoint")
    parser.add_argument("--checkpoint", help="with --eval-only: the checkpoint (default: the latest in output_dir)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.batch_size=4")
    return parser.parse_intermixed_args(argv)
