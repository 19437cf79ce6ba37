"""Peak memory on every rank, gathered on the main rank, with a warning before a rank runs out.

The rank that runs out of memory first is rarely rank 0 (uneven images, the evaluation gather, the rank
that also writes checkpoints), so watching ``nvidia-smi`` on one node or logging rank 0's figure is not
enough. Two lines in a loop::

    reset_peak_memory(info.device)                 # at the start of each epoch
    ...
    report = memory_report(info.device)            # at the end, on every rank (a collective)
    metrics.update(report.to_metrics())            # per-rank list, the max and the rank that holds it

On CUDA the figures are ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` (reserved is
what counts against the device's capacity); on the CPU both are the process's peak resident set size
(Linux ``VmHWM``, reset per epoch through ``/proc/self/clear_refs``; elsewhere the peak since start).
Before training, ``estimate_model_memory`` counts model-state bytes per GPU from a parameter count (or
a module on the meta device), and ``probe_memory`` measures one training step at two batch sizes on a
GPU (``check_config`` uses both; they moved here from ``ratlib.config_defaults``, which re-exports them).
torch is imported inside the functions, so ``import ratlib.memory`` stays cheap.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ratlib.errors import RatlibError, message

__all__ = [
    "MemoryEstimate",
    "MemoryProbe",
    "MemoryReport",
    "MemoryReportError",
    "RankMemory",
    "count_parameters",
    "estimate_model_memory",
    "memory_report",
    "peak_memory",
    "probe_memory",
    "reset_peak_memory",
]

GIB = 1024**3


class MemoryReportError(RatlibError, ValueError):
    """``memory_report``, ``estimate_model_memory`` or ``probe_memory`` cannot answer with the arguments given."""


REMEDIES = (
    "a smaller per-device training.batch_size (raise training.gradient_accumulation_steps to keep "
    "the global batch), activation checkpointing, or DeepSpeed ZeRO (training.deepspeed.enabled=true, "
    "zero_stage 2 or 3); ratlib.check_config / `ratlib doctor` estimate the memory a config needs"
)


@dataclass(frozen=True)
class RankMemory:
    """One rank's peak memory since the last reset, in bytes."""

    rank: int
    kind: str  # "cuda" (device memory) or "rss" (host memory of the process)
    device: str
    peak_allocated: int
    peak_reserved: int
    capacity: int | None  # the device's total memory (host memory for "rss"); None when unknown

    @property
    def peak(self) -> int:
        """The figure that counts against ``capacity``: reserved on CUDA, the peak RSS on the CPU."""
        return self.peak_reserved

    @property
    def fraction(self) -> float | None:
        return self.peak / self.capacity if self.capacity else None


@dataclass(frozen=True)
class MemoryReport:
    """Every rank's :class:`RankMemory`, by rank (on every rank: the report is all-gathered)."""

    ranks: list[RankMemory]

    @property
    def max(self) -> RankMemory:
        """The rank with the highest peak (the lowest rank on a tie)."""
        return max(self.ranks, key=lambda r: (r.peak, -r.rank))

    def over(self, fraction: float) -> list[RankMemory]:
        """The ranks whose peak is above ``fraction`` of their capacity."""
        return [r for r in self.ranks if r.fraction is not None and r.fraction > fraction]

    def to_metrics(self, prefix: str = "peak_memory") -> dict[str, Any]:
        """Flat, JSON-ready figures for metrics.jsonl: per-rank lists in GiB, the max and its rank."""
        top = self.max
        return {
            f"{prefix}_kind": top.kind,
            f"{prefix}_gib": [round(r.peak / GIB, 4) for r in self.ranks],
            f"{prefix}_allocated_gib": [round(r.peak_allocated / GIB, 4) for r in self.ranks],
            f"{prefix}_max_gib": round(top.peak / GIB, 4),
            f"{prefix}_max_rank": top.rank,
        }

    def as_dicts(self) -> list[dict[str, Any]]:
        """Every rank's figures as plain dicts, by rank (for JSON, a tracker or a table of your own)."""
        return [asdict(r) for r in self.ranks]

    def table(self) -> str:
        """A small text table, one line per rank, the peak rank marked."""
        top = self.max.rank
        lines = ["rank  kind  device   peak GiB  allocated GiB  of capacity"]
        for r in self.ranks:
            share = f"{r.fraction:6.1%}" if r.fraction is not None else "     ?"
            mark = "  <- peak" if r.rank == top and len(self.ranks) > 1 else ""
            lines.append(
                f"{r.rank:>4}  {r.kind:<4}  {r.device:<7}  {r.peak / GIB:8.3f}  "
                f"{r.peak_allocated / GIB:13.3f}  {share}{mark}"
            )
        return "\n".join(lines)


def _device(device: Any) -> Any:
    import torch

    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _peak_rss() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _host_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def reset_peak_memory(device: Any = None) -> None:
    """Start a new peak on this rank (e.g. at each epoch): CUDA's peak statistics, or the process's
    peak RSS (Linux; elsewhere the RSS peak cannot be reset and keeps counting from the start)."""
    dev = _device(device)
    if dev.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_memory(device: Any = None) -> RankMemory:
    """This rank's peak memory since the last :func:`reset_peak_memory` (not a collective)."""
    from ratlib.launch import get_rank

    dev = _device(device)
    if dev.type == "cuda":
        import torch

        return RankMemory(
            get_rank(),
            "cuda",
            str(dev),
            torch.cuda.max_memory_allocated(dev),
            torch.cuda.max_memory_reserved(dev),
            torch.cuda.get_device_properties(dev).total_memory,
        )
    rss = _peak_rss()
    return RankMemory(get_rank(), "rss", str(dev), rss, rss, _host_memory())


def memory_report(
    device: Any = None, *, warn_fraction: float | None = 0.9, reset: bool = False, logger: Any = None
) -> MemoryReport:
    """Every rank's peak memory, gathered (a collective: call it on every rank); the same report on all.

    When a rank's peak passes ``warn_fraction`` of its capacity (None: never), the main rank logs a
    warning naming the rank, the figure and the usual remedies. ``reset``: start a new peak afterwards.
    """
    from ratlib.comm import all_gather_object
    from ratlib.launch import is_main_process

    if warn_fraction is not None and not 0 < warn_fraction <= 1:
        raise MemoryReportError(
            message(
                f"memory_report: warn_fraction={warn_fraction!r} is out of range",
                expected="a fraction in (0, 1], e.g. 0.9, or None for no warning",
            )
        )
    report = MemoryReport(sorted(all_gather_object(peak_memory(device)), key=lambda r: r.rank))
    if warn_fraction is not None and is_main_process():
        if logger is None:
            from ratlib.rank_logger import get_logger

            logger = get_logger(__name__)
        for r in report.over(warn_fraction):
            what = "GPU memory (reserved)" if r.kind == "cuda" else "host memory (peak RSS)"
            logger.warning(
                "rank %d peak %s is %.2f GiB of %.2f GiB on %s (%.0f%%, above %.0f%%): it is close to "
                "running out. Remedies: %s",
                r.rank,
                what,
                r.peak / GIB,
                (r.capacity or 0) / GIB,
                r.device,
                100 * (r.fraction or 0),
                100 * warn_fraction,
                REMEDIES,
            )
    if reset:
        reset_peak_memory(device)
    return report


# ----------------------------------------------------------------------------------------------
# Before training: an estimate of model states from a parameter count, and a measured probe on a GPU


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of model states per GPU (parameters, gradients, optimizer state; no activations) and
    what ZeRO offload moves to CPU memory, per rank. See ``estimate_model_memory`` for the rules."""

    num_params: int
    largest_layer_params: int
    world_size: int
    zero_stage: int
    precision: str
    optimizer: str
    offload: bool
    params_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    cpu_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.gradients_bytes + self.optimizer_bytes

    def __str__(self) -> str:
        gib = 2**30
        return (
            f"{self.total_bytes / gib:.2f} GiB per GPU (params {self.params_bytes / gib:.2f}, gradients "
            f"{self.gradients_bytes / gib:.2f}, optimizer {self.optimizer_bytes / gib:.2f}) for "
            f"{self.num_params / 1e6:.1f}M parameters, {self.precision}, {self.optimizer}, ZeRO stage "
            f"{self.zero_stage}{' + offload' if self.offload else ''}, {self.world_size} rank(s)"
        )


def count_parameters(model: Any) -> tuple[int, int]:
    """(total parameters, parameters of the largest single module) of a ``torch.nn.Module``.
    Shared parameters count once; works on the meta device (nothing is allocated)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def estimate_model_memory(
    model: Any,
    *,
    world_size: int = 1,
    precision: Literal["fp32", "mixed"] = "fp32",
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
    momentum: float = 0.9,
    zero_stage: int = 0,
    offload: bool = False,
    largest_layer_params: int | None = None,
) -> MemoryEstimate:
    """Model-state memory per GPU for a ``torch.nn.Module`` (build it under ``torch.device("meta")``
    to count without allocating) or a parameter count, the way DeepSpeed's estimators count.

    Bytes per parameter (P parameters, N = ``world_size``): ``precision="fp32"`` (plain PyTorch,
    autocast included, keeps fp32 weights): weights 4, gradients 4, optimizer 4 per moment (Adam 2
    moments, SGD 1 with momentum). ``"mixed"`` (DeepSpeed bf16/fp16): weights 2, gradients 2,
    optimizer 4 (fp32 master weights) + 4 (fp32 gradients) + 4 per moment. ZeRO stage 1 divides the
    optimizer bytes by N, stage 2 also the gradients, stage 3 also the weights, plus the largest
    layer gathered in full (weights + gradients). ``offload`` moves optimizer state (stage >= 1; at
    stage 3 the weight partition too) to CPU memory. Activations are not included: ``probe_memory``
    measures them.
    """
    if isinstance(model, int):
        total, largest = model, largest_layer_params or 0
    else:
        total, largest = count_parameters(model)
        largest = largest_layer_params if largest_layer_params is not None else largest
    if world_size < 1 or zero_stage not in (0, 1, 2, 3) or precision not in ("fp32", "mixed"):
        raise MemoryReportError(
            message(
                "estimate_model_memory: an argument is out of range",
                got=f"world_size={world_size!r}, zero_stage={zero_stage!r}, precision={precision!r}",
                expected="world_size >= 1, zero_stage 0-3, precision 'fp32' or 'mixed'",
            )
        )
    moments = {"adamw": 2, "adam": 2, "sgd": 1 if momentum > 0 else 0}[optimizer]
    weight = grad = 2 if precision == "mixed" else 4
    opt = 4 * moments + (8 if precision == "mixed" else 0)
    n = world_size
    params = weight * total / n + (weight + grad) * largest if zero_stage == 3 else weight * total
    grads = grad * total / n if zero_stage >= 2 else grad * total
    optim = opt * total / n if zero_stage >= 1 else opt * total
    cpu = 0.0
    if offload and zero_stage >= 1:
        cpu, optim = optim, 0.0
        if zero_stage == 3:
            cpu += weight * total / n
            params = (weight + grad) * largest
    return MemoryEstimate(
        total,
        largest,
        n,
        zero_stage,
        precision,
        optimizer,
        offload and zero_stage >= 1,
        int(params),
        int(grads),
        int(optim),
        int(cpu),
    )


@dataclass(frozen=True)
class MemoryProbe:
    """Peak CUDA memory of one training step at two batch sizes, and the straight line through them."""

    batch_sizes: tuple[int, int]
    peak_bytes: tuple[int, int]
    capacity_bytes: int
    fraction: float

    @property
    def bytes_per_sample(self) -> float:
        (b1, b2), (p1, p2) = self.batch_sizes, self.peak_bytes
        return (p2 - p1) / (b2 - b1)

    @property
    def fixed_bytes(self) -> float:
        return self.peak_bytes[0] - self.batch_sizes[0] * self.bytes_per_sample

    def predict(self, batch_size: int) -> int:
        """Extrapolated peak bytes of one step at ``batch_size``."""
        return int(self.fixed_bytes + batch_size * self.bytes_per_sample)

    @property
    def max_batch_size(self) -> int:
        """The largest batch whose predicted peak stays under ``fraction`` of the device's memory."""
        return max(0, int((self.fraction * self.capacity_bytes - self.fixed_bytes) // self.bytes_per_sample))


def _to_device(batch: Any, device: Any) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def probe_memory(
    model: Any,
    make_batch: Callable[[int], Any],
    *,
    batch_sizes: tuple[int, int] = (2, 4),
    loss_fn: Callable[[Any, Any], Any] | None = None,
    optimizer: Any = None,
    mixed_precision: bool | str = True,
    channels_last: bool = False,
    fraction: float = 0.9,
    device: Any = "cuda",
) -> MemoryProbe:
    """Measure one forward/backward/optimizer step at two batch sizes on a GPU and extrapolate.

    ``make_batch(b)`` returns the model input, or a tuple whose first item is the input;
    ``loss_fn(output, batch)`` defaults to ``output.float().mean()``. The default optimizer is AdamW
    with lr 0 (its state is allocated, the weights do not move). A warm-up step comes first, so the
    optimizer state and workspaces exist before measuring. The model is moved to ``device``.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise MemoryReportError(
            message(
                "probe_memory: measures CUDA memory only",
                got=f"device={str(device)!r}, CUDA {'available' if torch.cuda.is_available() else 'unavailable'}",
                fix="without a GPU use estimate_model_memory (model states only)",
            )
        )
    b1, b2 = batch_sizes
    if not 0 < b1 < b2:
        raise MemoryReportError(
            message(f"probe_memory: batch_sizes={batch_sizes!r}", expected="two increasing sizes >= 1")
        )
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    model.train()
    opt = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=0.0)
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16

    def step(size: int) -> None:
        batch = _to_device(make_batch(size), device)
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        if channels_last and getattr(inputs, "dim", lambda: 0)() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype, enabled=bool(mixed_precision)):
            output = model(inputs)
            loss = loss_fn(output, batch) if loss_fn is not None else output.float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(b1)
    peaks = []
    for size in (b1, b2):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(size)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    if peaks[1] <= peaks[0]:
        raise MemoryReportError(
            message(
                f"probe_memory: peak memory did not grow from batch {b1} to {b2}",
                got=f"peaks {peaks}",
                fix="probe larger batch sizes",
            )
        )
    capacity = torch.cuda.get_device_properties(device).total_memory
    return MemoryProbe((b1, b2), (peaks[0], peaks[1]), capacity, fraction)
