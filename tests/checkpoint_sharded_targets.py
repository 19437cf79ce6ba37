"""Rank functions for tests/test_checkpoint_sharded.py (run by run_on_ranks in real gloo ranks), and the crash
trials' runner (one process that forks the ranks of each trial, so a trial costs no torch import)."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ratlib import checkpoint


def sharded_model(seed: int) -> torch.nn.Module:
    """An FSDP2 model over every rank: each Linear and the root are fully_shard-ed (8 and 6 rows: uneven at 3)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def plain_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6))


def trained(model: torch.nn.Module) -> torch.optim.Optimizer:
    """An AdamW after one step (so that its state exists), the same input on every rank."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(7)
    model(torch.randn(3, 4, generator=gen)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def full(state: Any) -> Any:
    """Every DTensor of ``state`` as its full tensor (a collective), the rest as it is."""
    if isinstance(state, dict):
        return {k: full(v) for k, v in state.items()}
    if isinstance(state, list):
        return [full(v) for v in state]
    if hasattr(state, "full_tensor"):
        return state.full_tensor().detach().clone()
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    return state


def same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(a), sorted(b))
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, (where, a, b)


def fsdp2_save(folder: str) -> int:
    """4 (or 2) ranks: a synchronous save (step1) and an asynchronous one (step2) after which every parameter
    and optimizer state is changed at once; the full tensors at each call go to expected*.pt."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ratlib import distributed
    from ratlib.checkpoint import planner

    planner.PIECE_BYTES = 16  # one row of Linear(4, 8) per stored piece: loads at other sizes read pieces
    out = Path(folder)
    with distributed(device="cpu", timeout=60) as info:
        model = sharded_model(0)
        optimizer = trained(model)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "cfg": {"lr": 0.1}}
        expected1 = full({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        checkpoint.save(state, out / "step1", per_rank={"rank": info.rank, "batch": torch.full((2,), info.rank)})
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4}
        expected2 = full({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        checkpoint.save(state, out / "step2", async_save=True)
        with torch.no_grad():  # every parameter and every optimizer tensor, right after the call returned
            for p in model.parameters():
                p.add_(1000.0)
            for s in optimizer.state.values():
                for v in s.values():
                    v.add_(1000.0)
        assert checkpoint.save_in_flight() in (None, out / "step2")
        assert checkpoint.latest(out) == out / "step2"  # waits for the save in flight
        if info.is_main:
            torch.save(expected1, out / "expected1.pt")
            torch.save(expected2, out / "expected2.pt")
        ddp = DDP(plain_model(5))  # a DDP run's checkpoint: plain tensors, the same on every rank
        checkpoint.save({"model": ddp.module.state_dict(), "step": 5}, out / "ddp5")
        print(f"rank {info.rank} saved", flush=True)
    return 0


def fsdp2_load(folder: str, name: str, expected: str, info: Any) -> None:
    """At this world size: load ``name`` into a fresh FSDP2 model and optimizer (other weights), and into a plain
    model (as DDP holds it); both must equal the expected full tensors."""
    out = Path(folder)
    want = torch.load(out / expected, weights_only=True)
    model = sharded_model(1)
    optimizer = trained(model)
    state = checkpoint.load(out / name, into={"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    same(want, full({"model": model.state_dict(), "optimizer": optimizer.state_dict()}), "fsdp2")
    plain = plain_model(2)
    state = checkpoint.load(out / name, into={"model": plain.state_dict()})
    plain.load_state_dict(state["model"])
    same(want["model"], full(plain.state_dict()), "plain")
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (8, 4)  # outside `into`: whole, plain
    print(f"rank {info.rank} loaded {name} at world size {info.world_size}", flush=True)


def ddp_round_trip(folder: str, info: Any) -> None:
    """A DDP run's checkpoint (plain tensors, the same on every rank; saved by fsdp2_save) into FSDP2 at this
    world size and back into a plain model, and the consolidated full .pt (written by the test) into an FSDP2
    model with set_model_state_dict(broadcast_from_rank0=True)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    out = Path(folder)
    want = plain_model(5).state_dict()
    sharded = sharded_model(6)
    checkpoint.load(out / "ddp5", into={"model": sharded.state_dict()})
    same(want, full(sharded.state_dict()), "ddp->fsdp2")
    checkpoint.save({"model": sharded.state_dict()}, out / f"fsdp{info.world_size}")
    back = plain_model(7)
    checkpoint.load(out / f"fsdp{info.world_size}", into={"model": back.state_dict()})
    same(want, full(back.state_dict()), "fsdp2->plain")
    full_state = checkpoint.load(out / "full.pt")
    want_full = {k: v.clone() for k, v in full_state["model"].items()}
    fresh = sharded_model(8)
    set_model_state_dict(  # it turns the dict it is given into DTensors: hence the copy above
        fresh,
        full_state["model"] if info.is_main else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    same(want_full, full(fresh.state_dict()), "full.pt->fsdp2")
    print(f"rank {info.rank} ddp round trip ok", flush=True)


def load_everywhere(folder: str, name: str, expected: str) -> int:
    """fsdp2_load then ddp_round_trip, in one launch."""
    from ratlib import distributed

    with distributed(device="cpu", timeout=60) as info:
        fsdp2_load(folder, name, expected, info)
        ddp_round_trip(folder, info)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Crash trials


def _trial_state(step: int, rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """The state at ``step``: every value says which step it is (so a mix of steps is seen), a DTensor sharded
    over the ranks, plain replicated tensors (DCP spreads their writes over the ranks), plain data."""
    from torch.distributed.tensor import DTensor, Shard

    rows = 4 * world
    whole = torch.arange(rows * 64, dtype=torch.float32).reshape(rows, 64) + 1000.0 * step
    local = whole.chunk(world)[rank].clone()
    state = {
        "model": {
            "sharded": DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
            **{f"w{i}": torch.full((64, 64), float(step * 10 + i)) for i in range(6)},
        },
        "step": step,
    }
    return state


def _expected(step: int, world: int) -> dict[str, torch.Tensor]:
    rows = 4 * world
    want = {"model.sharded": torch.arange(rows * 64, dtype=torch.float32).reshape(rows, 64) + 1000.0 * step}
    want.update({f"model.w{i}": torch.full((64, 64), float(step * 10 + i)) for i in range(6)})
    return want


def _rank_main(folder: str, rank: int, world: int, port: int, kill: str | None, kill_step: int, seed: int) -> None:
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ratlib.checkpoint import planner, sharded

    planner.PIECE_BYTES = 2 * 64 * 4  # the DTensor's shard (4 rows of 64) in pieces of 2 rows
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    mesh = init_device_mesh("cpu", (world,))
    rng = random.Random(seed)

    def hook(phase: str, path: Path) -> None:
        if kill == phase and path.name == f"step{kill_step}":
            time.sleep(rng.random() * 0.02)
            os.kill(os.getpid(), signal.SIGKILL)

    sharded._phase_hook = hook
    for step in range(1, 7):
        state = _trial_state(step, rank, world, mesh)
        if os.environ.get("TRIAL_TIMES"):
            print(f"rank {rank} step {step} at {time.monotonic():.2f}", flush=True)
        checkpoint.save(state, Path(folder) / f"step{step}", keep=2, async_save=step % 2 == 0, sync_timeout=10)
        with torch.no_grad():  # the loop moves on: the staged copy must be what is written
            state["model"]["w0"].add_(-1.0)
    checkpoint.wait_pending()
    dist.barrier()  # rank 0 hosts the store: it stays until every rank has read the last commit's outcome
    os._exit(0)


PHASES = ["staged", "written", "arrived", "marker", "renamed", "pruning", "pruned", None]
MAIN_ONLY = {"marker", "renamed", "pruning", "pruned"}  # phases of the main rank alone


def crash_trials(folder: str, trials: int, seed: int, worlds: str = "2,3") -> int:
    """``trials`` crash trials; prints one JSON line per trial and "ALL OK" at the end, exits 1 on a failure."""
    import torch._dynamo  # noqa: F401 - imported once here, not in every forked rank (DTensor.from_local's)
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    from ratlib.checkpoint import async_save, safe_metadata  # noqa: F401
    from ratlib.testing.ranks import free_port

    torch.set_num_threads(1)
    rng = random.Random(seed)
    sizes = [int(w) for w in worlds.split(",")]
    failures = 0
    for trial in range(trials):
        world = sizes[trial % len(sizes)]
        out = Path(folder) / f"trial{trial}"
        out.mkdir(parents=True)
        phase = PHASES[trial % len(PHASES)]  # every phase, in turn; None: killed from outside at a random time
        kill_step = rng.randint(2, 5)
        victims = "all" if trial % 3 == 2 else "one"
        victim = 0 if phase in MAIN_ONLY else rng.randrange(world)
        port = free_port()
        pids = []
        for rank in range(world):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the rank
                log = os.open(Path(folder) / f"trial{trial}-rank{rank}.log", os.O_WRONLY | os.O_CREAT, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                try:
                    mine = phase if (victims == "all" or rank == victim) else None
                    _rank_main(str(out), rank, world, port, mine, kill_step, seed * 1000 + trial * 10 + rank)
                finally:
                    os._exit(3)
            pids.append(pid)
        if phase is None:  # killed from outside at a random moment of the run
            time.sleep(rng.uniform(0.05, 0.6))
            targets = pids if victims == "all" else [pids[victim]]
            for pid in targets:
                _kill(pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            if any(_gone(p) for p in pids):  # one died (killed): the others get 0.5 s to do what they can
                time.sleep(0.5)
                break
            time.sleep(0.02)
        for pid in pids:
            _kill(pid)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        result = _check_trial(out, world)
        result.update(trial=trial, world=world, phase=phase, kill_step=kill_step, victims=victims)
        print(json.dumps(result), flush=True)
        failures += not result["ok"]
    print("ALL OK" if not failures else f"{failures} FAILED", flush=True)
    return 1 if failures else 0


_EXITED: dict[int, int] = {}


def _alive(pid: int) -> bool:
    if pid in _EXITED:
        return False
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        _EXITED[pid] = status
        return False
    return True


def _gone(pid: int) -> bool:
    return not _alive(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _check_trial(out: Path, world: int) -> dict[str, Any]:
    """latest() must be a complete checkpoint whose tensors are those of the step in its name."""
    found = checkpoint.latest(out)
    if found is None:
        return {"ok": True, "latest": None}
    try:
        step = int(found.name.removeprefix("step"))
        state = checkpoint.load(found)
        tensors = {f"model.{k}": v for k, v in state["model"].items()}
        want = _expected(step, world)
        ok = state["step"] == step and tensors.keys() == want.keys()
        ok = ok and all(torch.equal(tensors[k], want[k]) for k in want)
        return {"ok": bool(ok), "latest": found.name}
    except Exception as exc:  # noqa: BLE001 - reported as a failed trial
        return {"ok": False, "latest": found.name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


if __name__ == "__main__":
    sys.exit(crash_trials(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5]))


def async_error_on_one_rank(folder: str) -> int:
    """Rank 1's background write fails (disk full, injected): the next checkpoint call raises on every rank,
    nothing is committed, and the save after that works."""
    from ratlib import distributed
    from ratlib.checkpoint import sharded

    out = Path(folder)
    with distributed(device="cpu", timeout=60) as info:
        checkpoint.save({"w": torch.ones(4)}, out / "step1", per_rank={"r": info.rank})
        original = sharded._write_durable
        if info.rank == 1:

            def full_disk(path: Path, data: bytes) -> None:
                raise OSError(28, "No space left on device (injected)")

            sharded._write_durable = full_disk  # type: ignore[assignment]
        checkpoint.save({"w": torch.full((4,), 2.0)}, out / "step2", per_rank={"r": info.rank}, async_save=True)
        try:
            checkpoint.latest(out)
        except checkpoint.CheckpointError as exc:
            print(f"rank {info.rank} raised: {exc}", flush=True)
        else:
            raise AssertionError("the failed background write was not raised")
        assert checkpoint.latest(out) == out / "step1"  # raised once; the failed save left nothing visible
        sharded._write_durable = original  # type: ignore[assignment]
        checkpoint.save({"w": torch.full((4,), 3.0)}, out / "step3", per_rank={"r": info.rank}, async_save=True)
        assert checkpoint.load(out / "step3")["w"].tolist() == [3.0] * 4
        print(f"rank {info.rank} recovered", flush=True)
    return 0


def async_save_then_preempt_exit(folder: str) -> int:
    """On each rank: an asynchronous save of a large state, then at once ``Preemption.exit()`` (as a loop does
    after its stop checkpoint): the save must be committed before any rank leaves."""
    import ratlib
    from ratlib import checkpoint, preempt

    with ratlib.distributed("gloo"):
        pre = preempt.install()
        state = {"w": torch.full((512, 1024), float(1 + torch.distributed.get_rank())), "step": 3}
        checkpoint.save(state, Path(folder) / "ck", async_save=True)
        pre.exit()  # SystemExit(75)
    return 0


def _tiny_fsdp2(world_size: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))  # 3 and 1 rows: fewer than 4 ranks
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def more_ranks_than_rows(folder: str, phase: str) -> int:
    """Saved on 2 ranks, loaded on 4: a tensor of 1 or 3 rows leaves some ranks an empty shard, and the whole
    tensors still come back exactly (there is no world size an FSDP2 state cannot be resharded to)."""
    import ratlib
    from ratlib import checkpoint

    with ratlib.distributed("gloo") as info:
        model = _tiny_fsdp2(info.world_size)
        if phase == "save":
            checkpoint.save({"model": model.state_dict()}, Path(folder) / "ck")
            return 0
        for p in model.parameters():
            p.data.zero_()
        checkpoint.load(Path(folder) / "ck", into={"model": model.state_dict()})
        torch.manual_seed(0)
        expected = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)).state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(value.full_tensor(), expected[key]), key
        if info.rank == info.world_size - 1:  # the last rank holds no row of either tensor
            assert all(v.to_local().shape[0] == 0 for v in model.state_dict().values())
    return 0
