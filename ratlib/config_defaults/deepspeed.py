"""``to_deepspeed_config``: the ``training`` section as a config ``deepspeed.initialize`` accepts."""

from __future__ import annotations

from typing import Any

from ratlib.config_defaults.schema import ConfigError, ExperimentConfig
from ratlib.errors import message

__all__ = ["to_deepspeed_config"]


def to_deepspeed_config(
    cfg: ExperimentConfig, world_size: int, *, steps_per_epoch: int | None = None, device: str = "cuda"
) -> dict[str, Any]:
    """A config dict for ``deepspeed.initialize(config=...)``.

    Batch: ``train_batch_size = micro batch x gradient_accumulation_steps x world_size`` (DeepSpeed's
    invariant). Precision: ``bf16`` for true/"bf16", ``fp16`` (dynamic loss scale) for "fp16".
    Optimizer: AdamW, Adam (``adam_w_mode: false``, DeepSpeed's "Adam" is AdamW otherwise) or torch's
    SGD. Scheduler, given the optimiser ``steps_per_epoch``: cosine -> WarmupCosineLR, constant with
    warmup -> WarmupLR; ``step`` has no DeepSpeed equivalent: pass a torch scheduler as
    ``lr_scheduler=`` instead. ``device="cpu"`` uses torch's Adam kernels (DeepSpeed's fused ones need CUDA).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(message(f"to_deepspeed_config: world_size={world_size!r}", expected="a positive int"))
    if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
        raise ConfigError(
            message(
                f"to_deepspeed_config: steps_per_epoch={steps_per_epoch!r}",
                expected="a positive int (optimiser steps per epoch: batches per rank // gradient_accumulation_steps)",
            )
        )
    t, o, s = cfg.training, cfg.training.optimizer, cfg.training.scheduler
    zero: dict[str, Any] = {"stage": t.deepspeed.zero_stage}
    if t.deepspeed.offload and t.deepspeed.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device != "cpu"}
        if t.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device != "cpu"}
    ds: dict[str, Any] = {
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": float(t.gradient_clip or 0.0),  # 0.0: off
        "steps_per_print": t.log_every,
        "bf16": {"enabled": t.mixed_precision in (True, "bf16")},
        "fp16": {"enabled": t.mixed_precision == "fp16"},
        "zero_optimization": zero,
        "wall_clock_breakdown": False,
    }
    if t.mixed_precision == "fp16":
        ds["fp16"].update(
            {
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        )
    if o.name in ("adamw", "adam"):
        params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": 1e-8, "weight_decay": o.weight_decay}
        if o.name == "adam":
            params["adam_w_mode"] = False
        if device == "cpu":
            params["torch_adam"] = True
        ds["optimizer"] = {"type": "AdamW" if o.name == "adamw" else "Adam", "params": params}
    else:
        ds["optimizer"] = {
            "type": "SGD",
            "params": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay},
        }
        if t.deepspeed.zero_stage >= 1:
            ds["zero_allow_untested_optimizer"] = True  # torch.optim.SGD is outside DeepSpeed's tested list
    if steps_per_epoch is not None:
        total = steps_per_epoch * t.num_epochs
        total = min(total, t.max_steps) if t.max_steps is not None else total
        warmup = min(total, round(s.warmup_epochs * steps_per_epoch))
        if s.name == "cosine":
            # DeepSpeed refuses warmup_num_steps=0: no warmup is one step that starts at the full rate.
            ds["scheduler"] = {
                "type": "WarmupCosineLR",
                "params": {
                    "total_num_steps": total,
                    "warmup_num_steps": max(1, warmup),
                    "warmup_min_ratio": 0.0 if warmup else 1.0,
                    "cos_min_ratio": s.min_lr / o.lr,
                    "warmup_type": "linear",
                },
            }
        elif s.name == "constant" and warmup > 0:
            ds["scheduler"] = {
                "type": "WarmupLR",
                "params": {
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": o.lr,
                    "warmup_num_steps": warmup,
                    "warmup_type": "linear",
                },
            }
    return ds
