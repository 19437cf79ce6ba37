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
torch is imported inside the functions, so ``import ratlib.memory`` stays cheap.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["MemoryReport", "RankMemory", "memory_report", "peak_memory", "reset_peak_memory"]

GIB = 1024**3
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
        raise ValueError(
            f"memory_report: warn_fraction={warn_fraction!r}; expected a fraction in (0, 1], "
            "e.g. 0.9, or None for no warning"
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
