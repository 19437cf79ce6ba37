"""Numerical faults named by rank, step and tensor: the first non-finite loss or gradient on any rank stops
every rank at one step, and ranks whose weights drift apart are found.

Every rank calls ``Sentinel.check(step, loss)`` at every optimiser step, after ``backward()`` (after
``scaler.unscale_``) and before ``optimizer.step()``::

    sentinel = ratlib.numerics.Sentinel(model, policy="raise", drift_every=100, run_dir=run_dir)
    for step in range(start, total):
        if pre.should_stop(step):
            save_checkpoint(step)
            pre.exit()
        loss = loss_fn(model(x), y)
        loss.backward()
        if sentinel.check(step, loss, indices=batch_indices):
            optimizer.step()
        optimizer.zero_grad()

Each rank turns its loss and gradients into one small number (0: finite; 1: the loss; 2 + i: the i-th
parameter's gradient), and the ranks agree on it in one all-reduce: the preemption agreement's when
``ratlib.preempt`` is installed (``Preemption.carry``: no second collective per step), else one of its own.
So every rank gets the same answer at the same step and knows which rank saw what first. Under DDP the
gradients are looked at in a communication hook, *before* the all-reduce that would spread one rank's NaN to
every rank. Every ``drift_every`` steps each rank digests every parameter and buffer exactly and the digests
are all-gathered once; a majority vote names the odd ranks and tensors. docs/numerics.md has the costs.
Torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ratlib import dist_init, preempt
from ratlib.errors import RatlibError, message
from ratlib.io import append_jsonl
from ratlib.rank_logger import get_logger

__all__ = [
    "POLICIES",
    "DriftError",
    "NumericalError",
    "NumericsInputError",
    "Report",
    "Sentinel",
]

POLICIES = ("raise", "skip", "stop")
REPORT_FILE = "numerics.jsonl"  # in the run folder: one JSON record per report

log = get_logger("ratlib.numerics")


# ----------------------------------------------------------------------------------------------
# Errors and the report


class NumericsInputError(RatlibError, ValueError):
    """A bad argument to ``Sentinel``: an unknown policy, ``drift_every < 1``, an unsupported model."""


@dataclass(frozen=True)
class Report:
    """What every rank learnt at a faulty step: the same object on every rank.

    ``kind``: ``"non-finite"`` or ``"drift"``. ``tensors``: per rank that saw it (non-finite) or that is odd
    (drift), the tensors: for a non-finite step one name, ``"loss"`` or the first parameter (in
    ``named_parameters()`` order of the unwrapped model) whose gradient is non-finite; for drift, every
    tensor whose digest differs from the majority's. ``samples``: per rank, the batch's sample indices
    when ``check`` was given them.
    """

    kind: str
    step: int
    world_size: int
    policy: str
    tensors: dict[int, tuple[str, ...]]
    samples: dict[int, list[int]] = field(default_factory=dict)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(self.tensors))

    @property
    def first(self) -> dict[int, str]:
        """Per rank, the first tensor named."""
        return {r: names[0] for r, names in self.tensors.items() if names}

    def table(self) -> str:
        """The report as the log shows it: one line per rank."""
        what = "non-finite value" if self.kind == "non-finite" else "weights differ from the majority"
        head = f"numerics: {what} at step {self.step} on {len(self.tensors)} of {self.world_size} rank(s)"
        rows = [("rank", "tensor" if self.kind == "non-finite" else "tensors", "samples")]
        for r in self.ranks:
            names = self.tensors[r]
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            samples = self.samples.get(r)
            rows.append((str(r), shown, _short(samples) if samples is not None else "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join([head, *lines])

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (JSON, a tracker, a checkpoint): ranks as a list, tensors keyed by rank."""
        out = asdict(self)
        out["ranks"] = list(self.ranks)
        out["tensors"] = {str(r): list(v) for r, v in self.tensors.items()}
        out["samples"] = {str(r): v for r, v in self.samples.items()}
        return out


class NumericalError(RatlibError, FloatingPointError):
    """A non-finite loss or gradient (or drift) on some rank: raised on every rank at the same step;
    ``.report`` names the step, the ranks and per rank the first tensor."""

    def __init__(self, text: str, report: Report | None = None) -> None:
        super().__init__(text)
        self.report = report


class DriftError(NumericalError):
    """Ranks hold different weights (or different parameter names: that is drift too)."""


def _short(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)})"


# ----------------------------------------------------------------------------------------------
# The sentinel


class Sentinel:
    """The per-step non-finite check and the periodic drift check for one model (see the module docstring).

    ``policy``: ``"raise"`` (every rank raises ``NumericalError`` at the faulty step; nothing was stepped, so
    the last checkpoint is the last good state), ``"skip"`` (``check`` returns False on every rank, the
    gradients are zeroed, ``skips`` counts it; ``max_skips`` consecutive skips raise), ``"stop"`` (``check``
    returns False, ``stopped`` holds the report, and with ``ratlib.preempt`` installed the next
    ``should_stop`` answers True on every rank, so the loop's preemption branch saves and exits, without a
    Slurm requeue). Drift is never skipped: skipping a step cannot make weights equal again, so under
    ``"skip"`` it raises. ``exclude``: ``fnmatch`` patterns of parameter or buffer names the drift check
    leaves out (rank-local by design). ``run_dir``: the main rank appends each report to
    ``run_dir/numerics.jsonl``. ``grad_scaler``: a fp16 ``GradScaler``, whose overflow steps are its own
    business: non-finite gradients are then left to it (it skips that step and lowers the scale) and only a
    non-finite loss is reported. Create it before the first step (under DDP it registers a comm hook).
    """

    def __init__(
        self,
        model: Any,
        *,
        policy: str = "raise",
        drift_every: int | None = None,
        exclude: Iterable[str] = (),
        max_skips: int = 10,
        run_dir: str | Path | None = None,
        grad_scaler: Any = None,
    ) -> None:
        if policy not in POLICIES:
            raise NumericsInputError(
                message(
                    f"numerics.Sentinel: unknown policy {policy!r}",
                    expected=" or ".join(repr(p) for p in POLICIES),
                    fix="policy='raise' (the default) stops every rank at the faulty step",
                )
            )
        for name, value in (("drift_every", drift_every), ("max_skips", max_skips)):
            if value is None and name == "drift_every":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NumericsInputError(
                    message(
                        f"numerics.Sentinel: {name} must be a whole number of steps >= 1",
                        got=f"{name}={value!r}",
                        fix="drift_every=100 checks the weights every 100 steps (None: never)"
                        if name == "drift_every"
                        else "max_skips=10 raises after 10 skipped steps in a row",
                    )
                )
        _refuse_unsupported(model)
        self.model = model
        self.module = _unwrap(model)
        self.policy = policy
        self.drift_every = drift_every
        self.exclude = tuple(exclude)
        self.max_skips = max_skips
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.grad_scaler = grad_scaler
        self.skips = 0  # steps skipped in all
        self.consecutive_skips = 0
        self.drift_checks = 0
        self.stopped: Report | None = None  # the report that made the "stop" policy stop
        self.last_report: Report | None = None
        self._params = [(n, p) for n, p in self.module.named_parameters()]
        self._index = {id(p): i for i, (_, p) in enumerate(self._params)}
        self._names_checked = False
        self._group: Any = None
        self._bucket_codes: list[Any] = []  # per DDP bucket this step: its first non-finite parameter (_first_bad)
        self._hooked = False
        if not self._scaler_on():
            self._hooked = _register_ddp_hook(model, self)

    # -- the per-step check -------------------------------------------------------------------

    def check(self, step: int, loss: Any = None, *, indices: Sequence[int] | None = None) -> bool:
        """True when every rank may take the optimiser step; the same answer on every rank. Every rank calls it
        at every optimiser step (a collective). ``indices``: this rank's sample indices, for the report."""
        dist = _dist()
        if not self._names_checked:
            self._check_names(dist)
        code = self._local_code(loss)
        codes = self._agree(step, code, dist)
        ok = not any(codes)
        if not ok:
            ok = self._fault(step, codes, indices, dist)
        else:
            self.consecutive_skips = 0
        if self.drift_every and step % self.drift_every == 0:
            self._drift(step, dist)
        return ok

    def _scaler_on(self) -> bool:
        s = self.grad_scaler
        if s is None:
            return False
        return bool(s.is_enabled()) if hasattr(s, "is_enabled") else True

    def _local_code(self, loss: Any) -> int:
        """0: all finite; 1: the loss; 2 + i: parameter i's gradient. A few small tensor ops and one
        device-to-host copy: each part is one int64 (-1: the loss, i: the first parameter whose gradient is not
        finite, _ALL_FINITE: none), and their minimum is the answer (the loss first: a non-finite loss makes
        every gradient non-finite)."""
        import torch

        parts: list[Any] = []  # 0-dim int64 tensors, on the device
        if loss is not None:
            value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            parts.append(torch.where(torch.isfinite(value).all(), _ALL_FINITE, -1))
        if not self._scaler_on():
            parts += self._grad_codes()
        if not parts:
            return 0
        device = parts[0].device
        first = parts[0] if len(parts) == 1 else torch.stack([p.to(device) for p in parts]).min()
        found = int(first.item())
        return 0 if found == _ALL_FINITE else 1 if found < 0 else found + 2

    def _grad_codes(self) -> list[Any]:
        """Per DDP bucket (what each held before the all-reduce), or over every gradient: the index of the
        first parameter whose gradient is not finite, or _ALL_FINITE."""
        if self._hooked:
            codes, self._bucket_codes = self._bucket_codes, []
            return codes
        pairs = [(i, _local(p.grad)) for i, (_, p) in enumerate(self._params) if p.grad is not None]
        if not pairs:
            return []
        return [_first_bad([i for i, _ in pairs], [g for _, g in pairs])]

    def _note_bucket(self, params: list[Any], grads: list[Any]) -> None:
        """From the DDP comm hook, before the all-reduce: this bucket's first non-finite gradient, if any."""
        if grads:
            self._bucket_codes.append(_first_bad([self._index.get(id(p), -1) for p in params], grads))

    def _agree(self, step: int, code: int, dist: Any) -> list[int]:
        """Every rank's code, the same list on every rank: in the preemption agreement when installed."""
        pre = preempt.current()
        if pre is not None:
            return [row[0] for row in pre.carry(step, [code])]
        if dist is None:
            return [code]
        import torch

        buf = torch.zeros(dist.get_world_size(), dtype=torch.int64)
        buf[dist.get_rank()] = code
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self._cpu_group(dist))
        return buf.tolist()

    def _fault(self, step: int, codes: list[int], indices: Sequence[int] | None, dist: Any) -> bool:
        names: dict[int, tuple[str, ...]] = {
            r: ("loss" if c == 1 else str(self._params[c - 2][0]),) for r, c in enumerate(codes) if c
        }
        samples = _gather_samples(indices, dist, self._cpu_group(dist) if dist is not None else None)
        report = Report("non-finite", step, len(codes), self.policy, names, samples)
        self._publish(report)
        if self.policy == "skip":
            self.skips += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_skips:
                raise NumericalError(
                    message(
                        f"numerics: {self.consecutive_skips} steps in a row were skipped for non-finite values "
                        f"(max_skips={self.max_skips}); last at step {step} on rank(s) {_ranks(report)}",
                        got=_first_text(report),
                        fix="lower the learning rate, keep gradient clipping on, look at the samples named above",
                    ),
                    report,
                )
            self.module.zero_grad(set_to_none=True)
            return False
        if self.policy == "stop":
            self._stop(report)
            return False
        raise NumericalError(
            message(
                f"numerics: non-finite value at step {step} on rank(s) {_ranks(report)}; no rank stepped",
                got=_first_text(report),
                fix="the last checkpoint is the last good state; lower the learning rate, keep gradient clipping "
                "on, or look at the samples named in the report",
            ),
            report,
        )

    def _stop(self, report: Report) -> None:
        self.stopped = report
        pre = preempt.current()
        if pre is not None:
            pre.stop_next(f"ratlib.numerics: {report.kind} at step {report.step} on rank(s) {_ranks(report)}")

    def _publish(self, report: Report) -> None:
        """Log the table once on the main rank (and in every rank's log file); append it to the run folder."""
        self.last_report = report
        text = report.table()
        if dist_init.is_main_process():
            log.error("%s", text)
            if self.run_dir is not None:
                append_jsonl(self.run_dir / REPORT_FILE, report.to_dict())
        else:
            log.info("%s", text)  # this rank's log file (printed only by the main rank)

    # -- parameter names and drift ------------------------------------------------------------

    def _tensors(self) -> list[tuple[str, Any]]:
        """What the drift check digests: parameters and buffers (less ``exclude``; less the buffers DDP
        broadcasts from rank 0 at every forward), skipping sharded DTensors (no replica to compare)."""
        out = [(n, p) for n, p in self._params]
        if getattr(self.model, "broadcast_buffers", False) is not True or not _is_ddp(self.model):
            out += list(self.module.named_buffers())
        out = [(n, t) for n, t in out if not any(fnmatch.fnmatchcase(n, pat) for pat in self.exclude)]
        return [(n, t) for n, t in out if not _is_sharded(t)]

    def _check_names(self, dist: Any) -> None:
        self._names_checked = True
        if dist is None:
            return
        names = [n for n, _ in self._tensors()] if self.drift_every else [n for n, _ in self._params]
        everyone = _all_gather_object(dist, names, self._cpu_group(dist))
        if all(other == everyone[0] for other in everyone):
            return
        base = Counter(tuple(x) for x in everyone).most_common(1)[0][0]
        diffs = {}
        for r, other in enumerate(everyone):
            if tuple(other) != base:
                extra, missing = sorted(set(other) - set(base)), sorted(set(base) - set(other))
                diffs[r] = (
                    f"rank {r}: extra {extra[:3]}, missing {missing[:3]}"
                    if extra or missing
                    else (f"rank {r}: same names in another order")
                )
        raise DriftError(
            message(
                "numerics.Sentinel: the model's parameter and buffer names differ across ranks (that is drift: "
                "the ranks do not train the same model)",
                got="; ".join(diffs.values()),
                fix="build the same model on every rank (no rank-dependent layers), or exclude= rank-local buffers",
            ),
            Report("drift", -1, len(everyone), self.policy, {r: ("<names>",) for r in diffs}),
        )

    def _drift(self, step: int, dist: Any) -> None:
        if dist is None:
            return
        import torch

        self.drift_checks += 1
        tensors = self._tensors()
        mine = _digests([t for _, t in tensors])
        world = dist.get_world_size()
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=self._cpu_group(dist))
        odd: dict[int, list[str]] = {}
        for j, (name, _) in enumerate(tensors):
            digests = [tuple(p[j].tolist()) for p in parts]
            if len(set(digests)) == 1:
                continue
            value, count = Counter(digests).most_common(1)[0]
            majority = value if count * 2 > world else None  # no strict majority: every rank is named
            for r, d in enumerate(digests):
                if majority is None or d != majority:
                    odd.setdefault(r, []).append(name)
        if not odd:
            return
        report = Report("drift", step, world, self.policy, {r: tuple(v) for r, v in odd.items()})
        self._publish(report)
        if self.policy == "stop":
            self._stop(report)
            return
        raise DriftError(
            message(
                f"numerics: the weights differ across ranks at step {step}: rank(s) {_ranks(report)} differ from "
                "the majority",
                got=_first_text(report),
                fix="look for a rank-dependent code path, a buffer DDP does not broadcast (broadcast_buffers), a "
                "parameter outside DDP, or a faulty device; exclude= names rank-local buffers",
            ),
            report,
        )

    def _cpu_group(self, dist: Any) -> Any:
        """The default group under gloo; under nccl a gloo side group, so the flag never syncs the GPU again."""
        if "gloo" in str(dist.get_backend()):
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(minutes=30))
        return self._group


# ----------------------------------------------------------------------------------------------
# Helpers


def _dist() -> Any | None:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist


def _is_ddp(model: Any) -> bool:
    return type(model).__name__ == "DistributedDataParallel" and hasattr(model, "register_comm_hook")


def _unwrap(model: Any) -> Any:
    inner = getattr(model, "module", None)
    return inner if inner is not None and _is_ddp(model) else getattr(model, "_orig_mod", model)


def _refuse_unsupported(model: Any) -> None:
    mod = type(model).__module__ or ""
    if mod.startswith("deepspeed"):
        raise NumericsInputError(
            message(
                "numerics.Sentinel: DeepSpeed engines are not supported: ZeRO keeps gradients in its own "
                "partitioned buffers (param.grad is None) and skips fp16 overflow steps itself",
                got=f"a {type(model).__name__} from {mod}",
                fix="use training.strategy ddp or fsdp2 for the check, or leave numerics off under DeepSpeed "
                "(training.numerics.policy: off)",
            )
        )
    if not hasattr(model, "named_parameters"):
        raise NumericsInputError(
            message("numerics.Sentinel: model must be a torch.nn.Module", got=type(model).__name__)
        )


def _local(t: Any) -> Any:
    """A DTensor's local shard (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def _is_sharded(t: Any) -> bool:
    placements = getattr(t, "placements", None)
    return placements is not None and any(not p.is_replicate() for p in placements)


_ALL_FINITE = 2**63 - 1  # a part of the local code with nothing non-finite (the largest int64: min() skips it)


def _first_bad(indices: list[int], tensors: list[Any]) -> Any:
    """A 0-dim int64 on the device: the first of ``indices`` whose tensor holds a non-finite value, or
    _ALL_FINITE (one fused norm over the tensors, then three small ops; nothing reaches the host)."""
    import torch

    finite = _finite_flags(tensors)
    idx = torch.tensor(indices, dtype=torch.int64, device=finite.device)
    return torch.where(finite, _ALL_FINITE, idx).min()


def _finite_flags(tensors: list[Any]) -> Any:
    """One bool per tensor, on the device: all its values are finite. The 2-norm (float32 accumulation) is
    NaN or Inf exactly when a value is, except that values above about 1e19 overflow it (counted non-finite)."""
    import torch

    def widened() -> Any:  # half precision widened first, so as not to overflow
        low = (torch.float16, torch.bfloat16)
        return torch._foreach_norm([t.float() if t.dtype in low else t for t in tensors], 2)

    if any(t.dtype == torch.float64 for t in tensors):  # dtype=float32 cannot narrow float64
        norms = widened()
    else:
        try:
            norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        except TypeError:  # torch before 2.4 has no dtype argument
            norms = widened()
    return torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms]))


_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
_CHUNK = 1 << 22  # elements per piece of the weighted sum on a GPU: bounds its int64 temporary to 32 MiB


def _digests(tensors: list[Any], *, checksums: bool = False) -> Any:
    """An exact digest per tensor, as an ``[n, 2]`` int64 CPU tensor: BLAKE2b of the bytes on the CPU; on a GPU
    two checksums of the tensor's words computed on the device (their plain sum, in which any one changed bit
    changes the total, and a position-weighted sum, which also catches values that swapped places), then one
    copy to the host for all of them. ``checksums``: the GPU's way on the CPU too (tests)."""
    import torch

    rows: list[Any] = []
    for t in tensors:
        x = _local(t).detach()
        if x.device.type == "cpu" and not checksums:
            raw = x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            d = hashlib.blake2b(raw, digest_size=16).digest()
            pair = (int.from_bytes(d[:8], "little", signed=True), int.from_bytes(d[8:], "little", signed=True))
            rows.append(torch.tensor(pair, dtype=torch.int64))
            continue
        flat = x.contiguous().reshape(-1)
        words = flat.view(getattr(torch, _INT_OF_SIZE.get(flat.element_size(), "uint8")))
        plain = words.sum(dtype=torch.int64)
        weighted = torch.zeros((), dtype=torch.int64, device=flat.device)
        for start in range(0, words.numel(), _CHUNK):
            piece = words[start : start + _CHUNK].to(torch.int64)
            weights = torch.arange(start, start + piece.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
            weighted += (piece * weights).sum()
        rows.append(torch.stack([plain, weighted]))
    if not rows:
        return torch.zeros(0, 2, dtype=torch.int64)
    if len({r.device for r in rows}) == 1:
        return torch.stack(rows).cpu()  # one copy to the host for every tensor
    return torch.stack([r.cpu() for r in rows])


def _all_gather_object(dist: Any, obj: Any, group: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def _gather_samples(indices: Sequence[int] | None, dist: Any, group: Any) -> dict[int, list[int]]:
    """Every rank's sample indices (only on a faulty step, when every rank is on this path)."""
    mine = [int(i) for i in indices] if indices is not None else None
    if dist is None:
        return {dist_init.get_rank(): mine} if mine is not None else {}
    everyone = _all_gather_object(dist, mine, group)
    return {r: v for r, v in enumerate(everyone) if v is not None}


def _ranks(report: Report) -> str:
    return ", ".join(str(r) for r in report.ranks)


def _first_text(report: Report) -> str:
    return "; ".join(f"rank {r}: {', '.join(names[:3])}" for r, names in sorted(report.tensors.items()))


def _register_ddp_hook(model: Any, sentinel: Sentinel) -> bool:
    """Under DDP, look at each gradient bucket before its all-reduce (which would spread one rank's NaN to
    every rank). The hook then runs DDP's default all-reduce. False when the model is not DDP."""
    if not _is_ddp(model):
        return False
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state: Any, bucket: Any) -> Any:
        sentinel._note_bucket(bucket.parameters(), bucket.gradients())
        return default_hooks.allreduce_hook(state, bucket)

    hook.__annotations__ = {}  # DDP checks annotations; with postponed evaluation they would be strings
    try:
        model.register_comm_hook(model.process_group, hook)
    except RuntimeError as exc:  # the user registered one already: fall back to the reduced gradients
        log.warning(
            "numerics: DDP already has a comm hook (%s); gradients are checked after the all-reduce, so a "
            "non-finite gradient is named on every rank, not only on the one where it began",
            exc,
        )
        return False
    return True


def dump(report: Report) -> str:
    """The report as one JSON line (what ``run_dir/numerics.jsonl`` holds)."""
    return json.dumps(report.to_dict())
