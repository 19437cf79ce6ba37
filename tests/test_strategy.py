"""ratlib.strategy: what the training section means at run time (schedule, optimiser, autocast, Stepper,
make_stepper), and a training script's command line (ratlib.config_defaults.parse_args)."""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from ratlib.config_defaults import ExperimentConfig, UsageError, load_config, parse_args
from ratlib.data import ShardedBatchSampler
from ratlib.errors import RatlibError
from ratlib.strategy import (
    Stepper,
    autocast_for,
    eval_loader,
    fork_can_deadlock,
    lr_lambda,
    make_optimizer,
    make_scheduler,
    make_stepper,
    train_loader,
)
from ratlib.testing import run_on_ranks

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing runs on it, so the tests need no GPU


def config(**training: Any) -> ExperimentConfig:
    return load_config({"training": training})


# ----------------------------------------------------------------------------------------------
# The schedule


def test_cosine_warms_up_linearly_then_falls_to_min_lr() -> None:
    cfg = config(optimizer={"lr": 0.1}, scheduler={"name": "cosine", "warmup_epochs": 2, "min_lr": 0.001})
    f = partial(lr_lambda, cfg=cfg, steps_per_epoch=10, total_steps=120)  # warmup: 20 steps, cosine: 100
    assert f(0) == pytest.approx(1 / 20)
    assert f(9) == pytest.approx(10 / 20)
    assert f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(1.0)  # the cosine starts at the full rate
    assert f(70) == pytest.approx(0.01 + 0.99 * 0.5)  # half way: the mean of 1 and min_lr / lr
    assert f(45) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(120) == pytest.approx(0.01)  # the end: min_lr / lr
    assert f(500) == pytest.approx(0.01)  # past the end it stays there


def test_step_decays_every_step_size_epochs_and_constant_stays() -> None:
    cfg = config(scheduler={"name": "step", "step_size": 3, "gamma": 0.5})
    f = partial(lr_lambda, cfg=cfg, steps_per_epoch=10, total_steps=100)
    assert [f(s) for s in (0, 29, 30, 59, 60, 95)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.125])
    cfg = config(scheduler={"name": "constant", "warmup_epochs": 0.5})
    f = partial(lr_lambda, cfg=cfg, steps_per_epoch=4, total_steps=40)  # warmup: 2 steps
    assert [f(s) for s in (0, 1, 2, 39)] == pytest.approx([0.5, 1, 1, 1])


def test_make_scheduler_sets_the_optimiser_s_rate_at_every_step() -> None:
    cfg = config(optimizer={"lr": 0.1}, scheduler={"name": "cosine", "warmup_epochs": 1, "min_lr": 0.001})
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=4, total_steps=8)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    expected = [0.1 * lr_lambda(s, cfg, 4, 8) for s in range(9)]
    assert rates == pytest.approx(expected)
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1]) and rates[8] == pytest.approx(0.001)


# ----------------------------------------------------------------------------------------------
# Optimiser and autocast


def test_make_optimizer_builds_the_configured_kind_over_the_given_parameters() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    sgd = make_optimizer(config(optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.8, "weight_decay": 0.1}), [a], CPU)
    assert type(sgd) is torch.optim.SGD and len(sgd.param_groups) == 1
    g = sgd.param_groups[0]
    assert g["params"] == [a] and (g["lr"], g["momentum"], g["weight_decay"]) == (0.5, 0.8, 0.1)
    adamw = make_optimizer(config(optimizer={"lr": 0.01, "betas": [0.8, 0.9], "weight_decay": 0.2}), [a, b], CPU)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["params"] == [a, b]
    g = adamw.param_groups[0]
    assert (g["lr"], tuple(g["betas"]), g["weight_decay"], g["fused"]) == (0.01, (0.8, 0.9), 0.2, False)
    adam = make_optimizer(config(optimizer={"name": "adam"}), [b], CPU)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["lr"] == 1e-4  # the schema's default


@pytest.mark.parametrize(
    "mixed_precision,device,dtype",
    [
        (True, CUDA, torch.bfloat16),
        ("bf16", CUDA, torch.bfloat16),
        ("fp16", CUDA, torch.float16),
        (False, CUDA, None),
        (True, CPU, None),
        ("fp16", CPU, None),
    ],
)
def test_autocast_is_bf16_or_fp16_on_cuda_and_nothing_on_the_cpu(
    mixed_precision: Any, device: torch.device, dtype: torch.dtype | None
) -> None:
    autocast = autocast_for(config(mixed_precision=mixed_precision), device)
    if dtype is None:
        assert autocast is contextlib.nullcontext
    else:
        assert autocast.func is torch.autocast and autocast.args == ("cuda",)
        assert autocast.keywords == {"dtype": dtype}


# ----------------------------------------------------------------------------------------------
# Stepper and make_stepper on the CPU


def tiny(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean() * 100  # large gradients, so that clipping bites


SGD = {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}
INFO = SimpleNamespace(device=CPU, world_size=1, rank=0)


def test_make_stepper_on_one_cpu_process_steps_like_plain_sgd() -> None:
    cfg = config(optimizer=SGD, scheduler={"name": "constant"}, gradient_clip=None, mixed_precision=False)
    model, reference = tiny(), tiny()
    frozen = nn.Parameter(torch.zeros(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    stepper = make_stepper(cfg, model, INFO, steps_per_epoch=3, total_steps=3)
    assert stepper.model is model and stepper.scaler is None and stepper.engine is None
    assert [p for g in stepper.optimizer.param_groups for p in g["params"]] == [model.weight, model.bias]
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01)
    for batch in batches(3):
        with stepper.no_sync(True):
            stepper.backward(loss_of(stepper.model, batch))
        assert stepper.step(True) is True
        assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
        loss_of(reference, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(model.weight, reference.weight)
    torch.testing.assert_close(model.bias, reference.bias)
    assert stepper.lr == 0.01 and stepper.scheduler.last_epoch == 3


def test_gradient_accumulation_steps_once_with_the_mean_gradient() -> None:
    cfg = config(optimizer=SGD, scheduler={"name": "constant"}, gradient_clip=None, gradient_accumulation_steps=2)
    model, reference = tiny(), tiny()
    stepper = make_stepper(cfg, model, INFO, steps_per_epoch=1, total_steps=1)
    assert stepper.accum == 2
    first, second = batches(2)
    stepper.backward(loss_of(stepper.model, first))
    before = model.weight.detach().clone()
    assert stepper.step(False) is False  # off the boundary: nothing moves, the gradient stays
    torch.testing.assert_close(model.weight.detach(), before)
    assert model.weight.grad is not None and stepper.scheduler.last_epoch == 0
    stepper.backward(loss_of(stepper.model, second))
    assert stepper.step(True) is True and stepper.scheduler.last_epoch == 1
    ((loss_of(reference, first) + loss_of(reference, second)) / 2).backward()
    torch.optim.SGD(reference.parameters(), lr=0.01).step()
    torch.testing.assert_close(model.weight, reference.weight)
    torch.testing.assert_close(model.bias, reference.bias)


def test_gradient_clip_bounds_the_update_to_lr_times_the_clip() -> None:
    cfg = config(optimizer={**SGD, "lr": 1.0}, scheduler={"name": "constant"}, gradient_clip=0.01)
    model = tiny()
    stepper = make_stepper(cfg, model, INFO, steps_per_epoch=1, total_steps=1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    stepper.backward(loss_of(model, batches(1)[0]))
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert grad_norm > 1  # far above the clip, so that an unclipped step would be caught
    stepper.step(True)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() == pytest.approx(0.01, rel=1e-4)


def test_the_schedule_moves_the_rate_once_per_optimiser_step() -> None:
    cfg = config(optimizer={**SGD, "lr": 0.1}, scheduler={"name": "cosine", "min_lr": 0.001}, gradient_clip=None)
    stepper = make_stepper(cfg, tiny(), INFO, steps_per_epoch=2, total_steps=4)
    rates = [stepper.lr]
    for batch in batches(4):
        stepper.backward(loss_of(stepper.model, batch))
        stepper.step(True)
        rates.append(stepper.lr)
    assert rates == pytest.approx([0.1 * lr_lambda(s, cfg, 2, 4) for s in range(5)])
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.001)


def test_state_dict_and_load_resume_the_optimiser_and_the_schedule() -> None:
    cfg = config(optimizer={"lr": 0.1}, scheduler={"name": "cosine", "min_lr": 0.001}, gradient_clip=1.0)
    model = tiny()
    stepper = make_stepper(cfg, model, INFO, steps_per_epoch=4, total_steps=8)
    data = batches(5)
    for batch in data[:3]:
        stepper.backward(loss_of(model, batch))
        stepper.step(True)
    state = {"epoch": 0, **stepper.state_dict()}
    buffer = io.BytesIO()  # through a file, as a checkpoint goes: the state shares no tensor with the run
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["scaler"] is None and state["scheduler"]["last_epoch"] == 3

    resumed_model = tiny(seed=5)
    resumed = make_stepper(cfg, resumed_model, INFO, steps_per_epoch=4, total_steps=8)
    resumed.load_state_dict(state, Path("unused"), Path("epoch0000.pt"))
    assert resumed.lr == pytest.approx(stepper.lr) and resumed.scheduler.last_epoch == 3
    for batch in data[3:]:  # both go on the same way: the AdamW moments came along
        for s, m in ((stepper, model), (resumed, resumed_model)):
            s.backward(loss_of(m, batch))
            s.step(True)
    torch.testing.assert_close(resumed_model.weight, model.weight)
    assert resumed.lr == pytest.approx(stepper.lr)


def test_loading_a_deepspeed_checkpoint_without_deepspeed_names_the_flag() -> None:
    stepper = make_stepper(config(), tiny(), INFO, steps_per_epoch=1, total_steps=1)
    state = {"epoch": 0, "optimizer": None, "scheduler": None, "scaler": None}
    with pytest.raises(UsageError, match="written by a DeepSpeed run.*set training.strategy=deepspeed"):
        stepper.load_state_dict(state, Path("ds"), Path("run/epoch0000.pt"))
    assert issubclass(UsageError, RatlibError) and issubclass(UsageError, ValueError)


class FakeEngine:
    """What Stepper uses of DeepSpeed's engine: the boundary, backward, step, save and load."""

    def __init__(self, boundaries: list[bool]) -> None:
        self.boundaries, self.calls = boundaries, []

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.boundaries[len([c for c in self.calls if c == "step"])]

    def backward(self, loss: Any) -> None:
        self.calls.append("backward")

    def step(self) -> None:
        self.calls.append("step")

    def save_checkpoint(self, folder: str, tag: str, client_state: dict[str, Any]) -> None:
        (Path(folder) / tag).mkdir(parents=True)

    def load_checkpoint(self, folder: str, tag: str) -> tuple[Any, dict[str, Any]]:
        return (folder if (Path(folder) / tag).is_dir() else None), {}

    def state_dict(self) -> dict[str, Any]:  # the module's weights (the engine unwraps to itself here)
        return {"w": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls.append("load")


def test_with_an_engine_deepspeed_decides_the_boundary_and_keeps_its_own_state(tmp_path: Path) -> None:
    engine = FakeEngine([False, True])
    stepper = Stepper(engine, None, None, accum=2, clip=1.0, engine=engine)  # type: ignore[arg-type]
    stepper.backward(torch.ones(()))
    assert stepper.step(True) is False  # the engine's boundary wins over the loop's
    stepper.backward(torch.ones(()))
    assert stepper.step(False) is True
    assert engine.calls == ["backward", "step", "backward", "step"]
    assert stepper.state_dict() == {"model": {"w": 1}, "optimizer": None, "scheduler": None, "scaler": None}
    folder = tmp_path / "deepspeed"
    for epoch in range(4):
        stepper.save(folder, epoch, step=epoch * 10, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0002", "epoch0003"]  # DeepSpeed deletes nothing
    stepper.load_state_dict({"epoch": 3, "model": {}}, folder, tmp_path / "epoch0003.pt")
    with pytest.raises(UsageError, match=r"has no DeepSpeed state.*epoch0001 is missing.*training.strategy"):
        stepper.load_state_dict({"epoch": 1, "model": {}}, folder, tmp_path / "epoch0001.pt")


def test_deepspeed_enabled_but_not_installed_is_one_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: `import deepspeed` raises
    cfg = config(deepspeed={"enabled": True})
    with pytest.raises(UsageError, match=r"DeepSpeed is not installed.*pip install 'ratlib\[deepspeed\]'"):
        make_stepper(cfg, tiny(), INFO, steps_per_epoch=1, total_steps=1)


def ddp_accumulation(root: str) -> int:
    """On each of 2 gloo ranks: DDP with accumulation over 2 batches of this rank's own data; the weights
    after one optimiser step must be those of one process on all 4 batches."""
    import ratlib

    with ratlib.distributed("gloo") as info:
        cfg = config(optimizer=SGD, scheduler={"name": "constant"}, gradient_clip=None, gradient_accumulation_steps=2)
        model = tiny()
        stepper = make_stepper(cfg, model, info, steps_per_epoch=1, total_steps=1)
        assert isinstance(stepper.model, nn.parallel.DistributedDataParallel)
        data = batches(4)
        mine = data[2 * info.rank : 2 * info.rank + 2]
        for i, batch in enumerate(mine):
            boundary = i == 1
            with stepper.no_sync(boundary):
                stepper.backward(loss_of(stepper.model, batch))
            if not boundary:  # no all-reduce yet: the gradient is this rank's alone
                torch.save(model.weight.grad.clone(), Path(root) / f"local{info.rank}.pt")
            stepper.step(boundary)
        torch.save(model.weight.detach().clone(), Path(root) / f"weight{info.rank}.pt")
    return 0


@pytest.mark.distributed
def test_ddp_skips_the_all_reduce_off_the_boundary_and_averages_at_it(tmp_path: Path) -> None:
    run_on_ranks(ddp_accumulation, 2, args=(str(tmp_path),), timeout=180).check()
    reference = tiny()
    data = batches(4)
    (sum(loss_of(reference, b) for b in data) / 4).backward()
    torch.optim.SGD(reference.parameters(), lr=0.01).step()
    weights = [torch.load(tmp_path / f"weight{r}.pt") for r in range(2)]
    torch.testing.assert_close(weights[0], weights[1])
    torch.testing.assert_close(weights[0], reference.weight.detach())
    local = [torch.load(tmp_path / f"local{r}.pt") for r in range(2)]
    assert not torch.allclose(local[0], local[1])  # had no_sync not held, both would be the same mean


# ----------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("flag", [["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=3"], ["--local-rank", "3"]])
def test_parse_args_accepts_deepspeed_s_local_rank_flag(flag: list[str]) -> None:
    args = parse_args(["--config", "c.yaml", *flag, "a=1", "--resume", "b.c=2"], "demo")
    assert args.local_rank == 3 and args.overrides == ["a=1", "b.c=2"]
    assert (args.config, args.resume, args.eval_only, args.checkpoint) == ("c.yaml", True, False, None)


def test_parse_args_defaults_and_eval_only() -> None:
    args = parse_args([], "demo")
    assert (args.config, args.resume, args.eval_only, args.checkpoint, args.local_rank, args.overrides) == (
        None,
        False,
        False,
        None,
        None,
        [],
    )
    args = parse_args(["--eval-only", "--checkpoint", "run/epoch0003.pt"], "demo")
    assert args.eval_only and args.checkpoint == "run/epoch0003.pt"
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag"], "demo")


def test_importing_config_defaults_and_strategy_does_not_import_torch() -> None:
    code = "import sys, ratlib.config_defaults as c, ratlib.strategy; c.parse_args; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("where", ["ratlib.config_defaults", "ratlib.config_defaults.training"])
def test_the_old_names_of_the_moved_training_mechanics_warn_and_forward(where: str) -> None:
    import importlib

    import ratlib.strategy

    module = importlib.import_module(where)
    with pytest.warns(DeprecationWarning, match=r"moved to ratlib\.strategy\.make_stepper"):
        assert module.make_stepper is ratlib.strategy.make_stepper
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_deepspeed_enabled_and_strategy_agree_and_a_conflict_names_both() -> None:
    assert config(deepspeed={"enabled": True}).training.strategy == "deepspeed"
    assert config(strategy="deepspeed").training.deepspeed.enabled is True
    assert config(strategy="fsdp2").training.deepspeed.enabled is False
    with pytest.raises(RatlibError, match=r"training.strategy: got fsdp2 with training.deepspeed.enabled=true"):
        config(strategy="fsdp2", deepspeed={"enabled": True})


def fsdp2_against_ddp(root: str) -> int:
    """On 2 gloo ranks: the same model, data and steps under training.strategy=fsdp2 and =ddp (accumulation 2,
    clipping): the full weights after 3 optimiser steps agree; the FSDP2 stepper's state is sharded."""
    import ratlib
    from ratlib.strategy import make_stepper

    with ratlib.distributed("gloo") as info:
        results = {}
        for strategy in ("fsdp2", "ddp"):
            cfg = config(strategy=strategy, optimizer={"lr": 0.05}, gradient_clip=0.5, gradient_accumulation_steps=2)
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            stepper = make_stepper(cfg, model, info, steps_per_epoch=3, total_steps=3)
            assert stepper.kind == strategy and stepper.sharded == (strategy == "fsdp2")
            gen = torch.Generator().manual_seed(1 + info.rank)
            for i in range(6):
                x, y = torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)
                boundary = i % 2 == 1
                with stepper.no_sync(boundary):
                    stepper.backward(nn.functional.mse_loss(stepper.model(x), y))
                stepper.step(boundary)
            state = stepper.state_dict()
            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state["model"].items()}
            results[strategy] = full
            if strategy == "fsdp2":
                assert type(state["model"]["0.weight"]).__name__ == "DTensor"
                assert any(type(v).__name__ == "DTensor" for v in state["optimizer"]["state"]["0.weight"].values())
        for key, value in results["ddp"].items():
            torch.testing.assert_close(results["fsdp2"][key], value, rtol=1e-5, atol=1e-6)
    return 0


@pytest.mark.distributed
@pytest.mark.needs_torch("2.6", "FSDP2's fully_shard in torch.distributed.fsdp")
def test_fsdp2_steps_like_ddp_with_accumulation_and_clipping(tmp_path: Path) -> None:
    run_on_ranks(fsdp2_against_ddp, 2, args=(str(tmp_path),), timeout=120).check()


def ddp_to_fsdp2_and_back(root: str) -> int:
    """On 2 gloo ranks: a DDP stepper's checkpoint (.pt, whole tensors, optimiser keyed by index) resumes into an
    FSDP2 stepper, and the FSDP2 stepper's (a sharded folder, optimiser keyed by name) back into DDP: the
    weights and the AdamW moments arrive equal, and a step after each resume gives the same weights."""
    import ratlib
    from ratlib import checkpoint
    from ratlib.strategy import make_stepper

    def build(strategy: str) -> Any:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        return make_stepper(config(strategy=strategy, optimizer={"lr": 0.05}), model, info, 2, 8)

    def train(stepper: Any, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed + info.rank)
        x, y = torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)
        stepper.backward(nn.functional.mse_loss(stepper.model(x), y))
        stepper.step(True)

    def whole(stepper: Any) -> dict[str, torch.Tensor]:
        state = stepper.state_dict()
        model = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state["model"].items()}
        moments = state["optimizer"]["state"]
        key = "0.weight" if "0.weight" in moments else 0
        model["exp_avg"] = moments[key]["exp_avg"]
        model["exp_avg"] = (
            model["exp_avg"].full_tensor() if hasattr(model["exp_avg"], "full_tensor") else model["exp_avg"]
        )
        return model

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)

    with ratlib.distributed("gloo") as info:
        ddp = build("ddp")
        train(ddp, 1)
        checkpoint.save({"epoch": 0, **ddp.state_dict()}, Path(root) / "ddp.pt")
        fsdp = build("fsdp2")
        fsdp.load_state_dict(checkpoint.load(Path(root) / "ddp.pt"), Path(root), Path(root) / "ddp.pt")
        same(whole(fsdp), whole(ddp))
        train(ddp, 2)
        train(fsdp, 2)
        same(whole(fsdp), whole(ddp))
        checkpoint.save({"epoch": 1, **fsdp.state_dict()}, Path(root) / "fsdp")
        back = build("ddp")
        back.load_state_dict(checkpoint.load(Path(root) / "fsdp"), Path(root), Path(root) / "fsdp")
        same(whole(back), whole(fsdp))
        train(back, 3)
        train(fsdp, 3)
        same(whole(back), whole(fsdp))
    return 0


@pytest.mark.distributed
@pytest.mark.needs_torch("2.6", "FSDP2's fully_shard in torch.distributed.fsdp")
def test_a_ddp_checkpoint_resumes_into_fsdp2_and_back(tmp_path: Path) -> None:
    run_on_ranks(ddp_to_fsdp2_and_back, 2, args=(str(tmp_path),), timeout=120).check()


# ----------------------------------------------------------------------------------------------
# The loaders


def test_eval_loader_gives_each_sample_to_one_rank_in_eval_batches() -> None:
    cfg = load_config({"training": {"batch_size": 4}, "eval": {"batch_size": 3}, "data": {"num_workers": 0}})
    data = list(range(11))
    shares = []
    for rank in range(3):
        info = SimpleNamespace(device=CPU, world_size=3, rank=rank)
        loader = eval_loader(cfg, data, info, collate_fn=list)
        assert all(len(b) <= 3 for b in loader)
        shares.append([x for b in loader for x in b])
    assert sorted(x for share in shares for x in share) == data  # each sample once, nothing padded
    cfg = load_config({"training": {"batch_size": 4}, "data": {"num_workers": 0}})  # eval.batch_size null
    assert eval_loader(cfg, data, INFO, collate_fn=list).batch_size == 4


def test_train_loader_leaves_the_global_rng_alone() -> None:
    """A resumed run restores the global RNG; an iterator of a DataLoader without its own generator would
    draw its base seed from it at every epoch, so the resumed run's RNG would differ."""
    cfg = load_config({"training": {"batch_size": 2, "seed": 3}, "data": {"num_workers": 0}})
    sampler = ShardedBatchSampler(8, 2, rank=0, world_size=1, seed=3)
    loader = train_loader(cfg, list(range(8)), sampler, INFO, collate_fn=list)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert sorted(x for b in loader for x in b) == list(range(8))
    assert torch.equal(torch.get_rng_state(), before)
    plain = torch.utils.data.DataLoader(list(range(8)), batch_sampler=sampler, collate_fn=list)
    list(plain)
    assert not torch.equal(torch.get_rng_state(), before)  # what the generator is for


@pytest.mark.parametrize(
    ("version", "deadlocks"),
    [((3, 10, 13), True), ((3, 11, 7), True), ((3, 11, 9), True), ((3, 11, 10), False), ((3, 12, 1), False)],
)
def test_fork_can_deadlock_names_the_interpreters_with_cpython_gh_112275(version, deadlocks) -> None:
    assert fork_can_deadlock(version) is deadlocks


def test_a_fork_risk_is_said_once_and_a_forkserver_can_be_asked_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A forked DataLoader worker of 3.11.7 hung in os.fork() once in about 100 runs of the detection example
    under mpirun (stuck in _PyThreadState_DeleteExcept: CPython gh-112275). The loaders say so once where the
    interpreter has the bug, and take a start method; with a forkserver every batch still comes."""
    import multiprocessing

    import ratlib.strategy as strategy_module

    cfg = load_config({"training": {"batch_size": 2}, "data": {"num_workers": 2}})
    sampler = ShardedBatchSampler(8, 2, rank=0, world_size=1, seed=0)
    monkeypatch.setattr(strategy_module, "fork_can_deadlock", lambda: True)
    strategy_module._note_fork_risk.cache_clear()
    with caplog.at_level("INFO", logger="ratlib.strategy"):
        train_loader(cfg, list(range(8)), sampler, INFO)
        eval_loader(cfg, list(range(5)), INFO)
    assert sum("gh-112275" in r.getMessage() for r in caplog.records) == 1, caplog.text
    context = multiprocessing.get_context("forkserver")
    loader = train_loader(cfg, list(range(8)), sampler, INFO, multiprocessing_context=context)
    assert loader.multiprocessing_context is context
    assert sorted(int(x) for b in loader for x in b) == list(range(8))
