"""A user's training script, as a type checker sees it: ratlib ships py.typed, so this file must type-check
with the repository's mypy settings (pydantic's plugin) and with none (what pyright and plain mypy see).
tests/test_typing.py runs mypy on it; pytest never collects it, and nothing here runs."""

from __future__ import annotations

import torch
from typing_extensions import assert_type

import ratlib
from ratlib.comm import all_reduce_mean
from ratlib.config_defaults import ExperimentConfig, OptimizerConfig, TrainingConfig, dump_config, load_config
from ratlib.data import ShardedBatchSampler
from ratlib.rank_logger import RankLogger, get_logger, progress, rank_zero_only, setup_logging


@rank_zero_only
def save_summary(path: str) -> int:
    """Runs on the main rank; the others get None."""
    return len(path)


def main() -> None:
    setup_logging("INFO", other_ranks="WARNING")
    log = get_logger(__name__)
    assert_type(log, RankLogger)
    log.info("x", main_process_only=False)
    log.info("step %d", 3, in_order=True)
    log.debug("detail", main_process_only=True)
    log.warning("careful: %s", "value", stacklevel=2)
    log.log(20, "plain %s", "log", exc_info=False, extra={"k": 1})

    # Every field has a default: a section takes only what differs.
    training = TrainingConfig(batch_size=8)
    assert_type(training.batch_size, int)
    assert_type(training.gradient_clip, "float | None")
    cfg = ExperimentConfig()
    cfg = ExperimentConfig(training=TrainingConfig(num_epochs=2, optimizer=OptimizerConfig(lr=3e-4)))
    assert_type(cfg.training.optimizer.lr, float)

    loaded = load_config("config.yaml", overrides=["training.batch_size=16"])
    assert_type(loaded, ExperimentConfig)
    assert_type(load_config({"training": {"seed": 1}}, schema=ExperimentConfig), ExperimentConfig)
    assert_type(ratlib.load_config(None), ExperimentConfig)
    written = dump_config(loaded, "runs/x/config.yaml")
    if written is not None:
        print(written.name)

    # rank_zero_only keeps the parameters and says the result may be None (other ranks).
    summary = save_summary("runs/x")
    assert_type(summary, "int | None")
    if summary is not None:
        print(summary + 1)

    sampler = ShardedBatchSampler(100, batch_size=training.batch_size, rank=0, world_size=1)
    for batch in progress(sampler, desc="train"):
        print(len(batch))

    assert_type(all_reduce_mean(1.5), float)
    assert_type(all_reduce_mean(torch.ones(2)), torch.Tensor)
