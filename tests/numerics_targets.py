"""Functions run on several gloo ranks by tests/test_numerics.py.

``train`` runs a tiny DDP model for some steps with faults injected on given ranks at given steps, and prints
one line per event for the test to parse: ``FAULT {json}`` when ``check`` raised (then exit 3), ``SKIP
rank=R step=S`` when it returned False, ``STOP rank=R step=S`` when the preemption branch stopped, ``DONE {json}``
at the end (skips, a digest of the weights).
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from torch import nn

from ratlib import dist_init, numerics, preempt
from ratlib.rank_logger import setup_logging


class Toy(nn.Module):
    def __init__(self, norm: bool = False, extra: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.head = nn.Linear(16, 1)
        if extra:
            self.extra = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.body(x))))


def _plan(text: str) -> dict[tuple[int, int], list[tuple[str, str]]]:
    """``"grad:1:5:head.weight,loss:2:5:"`` -> {(rank, step): [(kind, arg)]}."""
    out: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for item in filter(None, text.split(",")):
        kind, rank, step, arg = item.split(":")
        for r in rank.split("+"):
            out.setdefault((int(r), int(step)), []).append((kind, arg))
    return out


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.parameters():  # buffers: BatchNorm's are each rank's own after the last forward
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def train(
    plan: str = "",
    steps: int = 20,
    policy: str = "raise",
    drift_every: int = 0,
    use_preempt: bool = False,
    norm: bool = False,
    broadcast_buffers: bool = True,
    run_dir: str = "",
    max_skips: int = 10,
) -> int:
    setup_logging("WARNING")
    info = dist_init.init_distributed("gloo", timeout=60, connect_timeout=30)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Toy(norm=norm), broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pre = preempt.install() if use_preempt else None
    sentinel = numerics.Sentinel(
        model, policy=policy, drift_every=drift_every or None, run_dir=run_dir or None, max_skips=max_skips
    )
    params = dict(model.module.named_parameters())
    faults = _plan(plan)
    gen = torch.Generator().manual_seed(1000 + info.rank)
    for step in range(steps):
        if pre is not None and pre.should_stop(step):
            print(f"STOP rank={info.rank} step={step}", flush=True)
            pre.exit()
        todo = faults.get((info.rank, step), [])
        for kind, arg in todo:
            if kind == "flip":
                with torch.no_grad():
                    params[arg].view(-1).view(torch.int32)[0] ^= 1
        x = torch.randn(4, 8, generator=gen)
        loss = model(x).pow(2).mean()
        handles = []
        for kind, arg in todo:
            if kind == "loss":
                loss = loss * float(arg or "nan")
            elif kind == "grad":
                handles.append(params[arg].register_hook(lambda g: torch.full_like(g, float("inf"))))
        loss.backward()
        for h in handles:
            h.remove()
        try:
            ok = sentinel.check(step, loss, indices=[info.rank * 1000 + step * 4 + i for i in range(4)])
        except numerics.NumericalError as exc:
            r = exc.report
            assert r is not None
            record = {"rank": info.rank, "step": r.step, "kind": r.kind, "type": type(exc).__name__}
            record.update(first={str(k): v for k, v in r.first.items()}, ranks=list(r.ranks), samples=r.samples)
            record.update(tensors={str(k): list(v) for k, v in r.tensors.items()}, text=str(exc))
            print("FAULT " + json.dumps(record), flush=True)
            return 3
        if ok:
            opt.step()
        else:
            print(f"SKIP rank={info.rank} step={step}", flush=True)
        opt.zero_grad(set_to_none=True)
    done = {"rank": info.rank, "skips": sentinel.skips, "drift_checks": sentinel.drift_checks}
    done["weights"] = _weights_digest(model.module)
    print("DONE " + json.dumps(done), flush=True)
    dist_init.shutdown()
    return 0


def names_differ() -> int:
    """Rank 1 builds a model with one more layer: the first check is a DriftError on every rank."""
    setup_logging("WARNING")
    info = dist_init.init_distributed("gloo", timeout=60, connect_timeout=30)
    model = Toy(extra=info.rank == 1)
    sentinel = numerics.Sentinel(model, drift_every=10)
    try:
        sentinel.check(0, torch.tensor(1.0))
    except numerics.DriftError as exc:
        print(f"DRIFT rank={info.rank}: {exc}", flush=True)
        return 3
    return 0


def fsdp2(plan: str = "", steps: int = 6) -> int:
    """FSDP2 (fully_shard over a CPU mesh): DTensor gradients are checked shard by shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    setup_logging("WARNING")
    info = dist_init.init_distributed("gloo", timeout=60, connect_timeout=30)
    torch.manual_seed(0)
    model = Toy()
    mesh = init_device_mesh("cpu", (info.world_size,))
    fully_shard(model.body, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sentinel = numerics.Sentinel(model, drift_every=2)
    faults = _plan(plan)
    for step in range(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        if any(kind == "loss" for kind, _ in faults.get((info.rank, step), [])):
            loss = loss * float("nan")
        loss.backward()
        try:
            ok = sentinel.check(step, loss)
        except numerics.NumericalError as exc:
            assert exc.report is not None
            r = exc.report
            first = {str(k): v for k, v in r.first.items()}
            print("FAULT " + json.dumps({"rank": info.rank, "step": r.step, "ranks": list(r.ranks), "first": first}))
            return 3
        if ok:
            opt.step()
        opt.zero_grad()
    print(f"DONE rank={info.rank} drift_checks={sentinel.drift_checks}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(train(*sys.argv[1:]))
