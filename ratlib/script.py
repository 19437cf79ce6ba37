"""The command-line entry of a training script, the part every script repeats around its own loop:
arguments, logging, the config, the process group (always torn down), every rank on the same config,
``--eval-only`` or training, ``outcome.json`` for a launcher, and the user's input errors as one message
with exit code 2 instead of a traceback::

    def main(argv=None) -> int:
        return run_script(argv, schema=MyConfig, train=train, evaluate=evaluate_checkpoint, description=__doc__)

``train(cfg, *, run_dir, resume, info)`` and ``evaluate(cfg, checkpoint, *, run_dir, info)`` are the script's
own functions and return their metrics (a dict of floats); the loop stays in the script.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ratlib.comm import assert_same
from ratlib.config_defaults import ConfigError, load_config, parse_args
from ratlib.dist_init import distributed
from ratlib.errors import RatlibError
from ratlib.rank_logger import get_logger, setup_logging
from ratlib.tracking import run_outcome

__all__ = ["run_script"]

log = get_logger("ratlib.script")


def run_script(
    argv: Sequence[str] | None,
    *,
    schema: type,
    train: Callable[..., dict[str, float]],
    evaluate: Callable[..., dict[str, float]],
    description: str | None = None,
) -> int:
    """Run a training script's command line (``parse_args``): 0 when it finished, 2 for an input error (a
    ``RatlibError``: the config, the data, a checkpoint), logged on every rank as one message; a preemption
    stop leaves through ``SystemExit(75)`` and anything else with its traceback."""
    args = parse_args(argv, description=(description or "").strip().split("\n")[0])
    setup_logging()
    try:
        cfg: Any = load_config(args.config, overrides=args.overrides, schema=schema)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    run_dir = Path(cfg.output_dir)
    setup_logging(log_dir=run_dir / "logs")
    d = cfg.distributed
    with distributed(
        d.backend, timeout=d.timeout_s, connect_timeout=d.connect_timeout_s, stall_timeout=d.stall_timeout_s
    ) as info:
        try:
            assert_same(cfg.model_dump(mode="json"), name="config")  # a rank started with other overrides fails
            metrics: dict[str, Any]
            if args.eval_only:
                metrics = evaluate(cfg, args.checkpoint, run_dir=run_dir, info=info)
            else:
                with run_outcome(run_dir) as finished:  # outcome.json, for a launcher such as the ablation driver
                    metrics = train(cfg, run_dir=run_dir, resume=args.resume, info=info)
                    finished(metrics=metrics)
        except RatlibError as exc:  # the user's input (config, data, checkpoint): the message, no traceback
            log.error("%s", exc)
            return 2
    log.info("final: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0
