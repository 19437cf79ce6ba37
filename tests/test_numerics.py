"""ratlib.numerics on real gloo ranks: non-finite values named by rank, step and tensor; drift found by a
majority vote; the policies; bad input. The ranks run tests/numerics_targets.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numerics_targets
import pytest
import torch
from torch import nn

from ratlib import hang, numerics, preempt
from ratlib.config_defaults import load_config
from ratlib.preempt import PREEMPT_EXIT_CODE
from ratlib.testing import run_on_ranks


@pytest.fixture(autouse=True)
def _clean_install():
    yield
    preempt.uninstall()
    hang.uninstall()


def faults(run) -> list[dict]:
    out = []
    for rank, text in enumerate(run.stdouts):
        found = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("FAULT ")]
        assert len(found) == 1 and found[0]["rank"] == rank, f"rank {rank} did not raise once:\n{run}"
        out.append(found[0])
    return out


def done(run) -> list[dict]:
    out = []
    for rank, text in enumerate(run.stdouts):
        found = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("DONE ")]
        assert len(found) == 1, f"rank {rank} did not finish:\n{run}"
        out.append(found[0])
    return out


# ----------------------------------------------------------------------------------------------
# Non-finite values


@pytest.mark.distributed
@pytest.mark.parametrize("use_preempt", [False, True], ids=["own-all-reduce", "in-preempt-agreement"])
def test_inf_in_one_ranks_gradient_is_named(tmp_path: Path, use_preempt: bool) -> None:
    args = ("grad:2:5:body.weight", 12, "raise", 0, use_preempt, False, True, str(tmp_path))
    run = run_on_ranks(numerics_targets.train, 4, args=args, timeout=120)
    assert run.returncodes == [3] * 4, run
    for f in faults(run):
        # every rank stops at that step; DDP's all-reduce would have spread the Inf, the comm hook saw it first
        assert (f["step"], f["ranks"], f["first"]) == (5, [2], {"2": "body.weight"}), f
        assert f["samples"]["2"] == [2020, 2021, 2022, 2023]
        assert "rank(s) 2" in f["text"] and "body.weight" in f["text"]
    records = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["ranks"], r["tensors"]) for r in records] == [(5, [2], {"2": ["body.weight"]})]
    assert "non-finite value at step 5 on 1 of 4 rank(s)" in run.outputs[0]


@pytest.mark.distributed
def test_nan_in_one_ranks_loss_only() -> None:
    run = run_on_ranks(numerics_targets.train, 4, args=("loss:1:3:nan", 10), timeout=120)
    assert run.returncodes == [3] * 4, run
    for f in faults(run):
        assert (f["step"], f["ranks"], f["first"]) == (3, [1], {"1": "loss"}), f


@pytest.mark.distributed
def test_two_ranks_at_once() -> None:
    plan = "grad:0:4:head.bias,loss:3:4:inf"
    run = run_on_ranks(numerics_targets.train, 4, args=(plan, 10, "raise", 0, True), timeout=120)
    assert run.returncodes == [3] * 4, run
    for f in faults(run):
        assert (f["step"], f["ranks"], f["first"]) == (4, [0, 3], {"0": "head.bias", "3": "loss"}), f


@pytest.mark.distributed
@pytest.mark.slow  # 1,000 steps on 4 ranks: about 15 s on an idle machine, 40 s on a busy one
def test_clean_steps_report_nothing(tmp_path: Path) -> None:
    """1,000 clean steps of a tiny model on 4 ranks, drift checked every 100: no report, no skip."""
    args = ("", 1000, "skip", 100, True, True, True, str(tmp_path))
    run = run_on_ranks(numerics_targets.train, 4, args=args, timeout=240)
    assert run.ok, run
    ends = done(run)
    assert [d["skips"] for d in ends] == [0] * 4 and [d["drift_checks"] for d in ends] == [10] * 4
    assert len({d["weights"] for d in ends}) == 1
    assert not (tmp_path / "numerics.jsonl").exists()
    assert all("SKIP" not in out for out in run.stdouts)


@pytest.mark.distributed
def test_skip_policy_skips_on_every_rank_and_keeps_weights_equal() -> None:
    plan = "grad:1:3:body.bias,loss:2:7:nan"
    run = run_on_ranks(numerics_targets.train, 4, args=(plan, 12, "skip", 5, True), timeout=120)
    assert run.ok, run
    for out in run.stdouts:
        assert re.findall(r"SKIP rank=\d+ step=(\d+)", out) == ["3", "7"], out
    ends = done(run)
    assert [d["skips"] for d in ends] == [2] * 4
    assert len({d["weights"] for d in ends}) == 1  # no rank stepped while another skipped


@pytest.mark.distributed
def test_consecutive_skips_raise() -> None:
    plan = ",".join(f"loss:1:{s}:nan" for s in range(4, 7))
    run = run_on_ranks(numerics_targets.train, 2, args=(plan, 12, "skip", 0, False, False, True, "", 3), timeout=120)
    assert run.returncodes == [3, 3], run
    for f in faults(run):
        assert f["step"] == 6 and "3 steps in a row" in f["text"], f


@pytest.mark.distributed
def test_stop_policy_stops_like_a_preemption() -> None:
    run = run_on_ranks(numerics_targets.train, 2, args=("loss:0:4:nan", 12, "stop", 0, True), timeout=120)
    assert run.returncodes == [PREEMPT_EXIT_CODE] * 2, run
    for rank, out in enumerate(run.stdouts):
        assert f"SKIP rank={rank} step=4" in out and f"STOP rank={rank} step=5" in out, out


# ----------------------------------------------------------------------------------------------
# Drift


@pytest.mark.distributed
def test_flipped_bit_found_at_next_drift_check() -> None:
    run = run_on_ranks(numerics_targets.train, 4, args=("flip:3:6:head.weight", 20, "raise", 5), timeout=120)
    assert run.returncodes == [3] * 4, run
    for f in faults(run):
        assert (f["kind"], f["type"], f["step"], f["tensors"]) == ("drift", "DriftError", 10, {"3": ["head.weight"]})


@pytest.mark.distributed
def test_unsynchronised_batchnorm_buffer_found() -> None:
    run = run_on_ranks(numerics_targets.train, 4, args=("", 10, "raise", 4, False, True, False), timeout=120)
    assert run.returncodes == [3] * 4, run
    for f in faults(run):
        assert f["kind"] == "drift" and f["step"] == 0, f  # step 0 is a drift step: the first forward did it
        assert set(f["ranks"]) == {0, 1, 2, 3}  # every rank's own statistics: no majority
        assert "norm.running_mean" in f["tensors"]["0"] and "norm.num_batches_tracked" not in f["tensors"]["0"]


@pytest.mark.distributed
def test_batchnorm_buffer_not_reported_with_broadcast_buffers() -> None:
    run = run_on_ranks(numerics_targets.train, 4, args=("", 10, "raise", 4, False, True, True), timeout=120)
    assert run.ok, run
    assert [d["drift_checks"] for d in done(run)] == [3] * 4  # steps 0, 4, 8


@pytest.mark.distributed
def test_parameter_names_that_differ_are_drift() -> None:
    run = run_on_ranks(numerics_targets.names_differ, 2, timeout=120)
    assert run.returncodes == [3, 3], run
    for out in run.stdouts:
        assert "names differ across ranks (that is drift" in out and "rank 1: extra ['extra.bias'" in out, out


# ----------------------------------------------------------------------------------------------
# Strategies and bad input


@pytest.mark.distributed
@pytest.mark.needs_torch("2.6", "FSDP2's fully_shard in torch.distributed.fsdp")
def test_fsdp2_dtensor_gradients() -> None:
    run = run_on_ranks(numerics_targets.fsdp2, 2, args=("loss:1:3:",), timeout=120)
    assert run.returncodes == [3, 3], run
    for out in run.stdouts:
        # the reduce-scatter spreads rank 1's NaN into rank 0's gradient shards before the check sees them;
        # the loss is still named on the rank where it began
        assert '"step": 3, "ranks": [0, 1]' in out and '"1": "loss"' in out and '"0": "body.weight"' in out, out
    clean = run_on_ranks(numerics_targets.fsdp2, 2, timeout=120)
    assert clean.ok and all("drift_checks=3" in out for out in clean.stdouts), clean


def test_deepspeed_engine_is_a_clear_error() -> None:
    engine = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})()
    with pytest.raises(numerics.NumericsInputError, match="DeepSpeed engines are not supported"):
        numerics.Sentinel(engine)
    # and deepspeed is never imported for it (in a fresh process: another test of this one may have imported it)
    code = (
        "import sys, torch\nfrom torch import nn\nfrom ratlib import numerics\n"
        "e = type('DeepSpeedEngine', (nn.Module,), {'__module__': 'deepspeed.runtime.engine'})()\n"
        "try:\n    numerics.Sentinel(e)\nexcept numerics.NumericsInputError:\n    pass\n"
        "print('deepspeed' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"policy": "ignore"}, "unknown policy 'ignore'"),
        ({"drift_every": 0}, "drift_every must be a whole number of steps >= 1"),
        ({"drift_every": 2.5}, "drift_every must be"),
        ({"max_skips": 0}, "max_skips must be"),
    ],
)
def test_bad_input(kwargs: dict, text: str) -> None:
    with pytest.raises(numerics.NumericsInputError, match=re.escape(text)) as info:
        numerics.Sentinel(nn.Linear(2, 2), **kwargs)
    assert isinstance(info.value, ValueError) and "Fix:" in str(info.value) or "Expected:" in str(info.value)


def test_single_process_check() -> None:
    model = nn.Linear(3, 1)
    sentinel = numerics.Sentinel(model, policy="skip", max_skips=2)
    model(torch.ones(2, 3)).sum().backward()
    assert sentinel.check(0, torch.tensor(1.0))
    model.weight.grad[0, 1] = float("nan")
    assert not sentinel.check(1, torch.tensor(1.0)) and model.weight.grad is None
    assert sentinel.last_report is not None and sentinel.last_report.first == {0: "weight"}
    with pytest.raises(numerics.NumericalError, match="2 steps in a row"):
        sentinel.check(2, float("inf"))


def test_import_does_not_load_torch() -> None:
    code = "import sys, ratlib.numerics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------------------------
# The segmentation example: on by default


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_segmentation_example_stops_at_the_first_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """A NaN loss at the 2nd batch: the example raises NumericalError at that step (the default policy) and
    leaves the report in the run folder; nothing waited for the next log_every."""
    pytest.importorskip("nibabel")
    from example_helpers import load_script

    from ratlib.synthetic import make_msd_segmentation

    example = Path(__file__).resolve().parents[1] / "examples" / "segmentation"
    T = load_script(example / "train.py", "segmentation_train")
    su = sys.modules["seg_utils"]
    loss_fn, calls = su.dice_ce_loss, []

    def bad_third(logits, labels):
        calls.append(1)
        loss = loss_fn(logits, labels)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(su, "dice_ce_loss", bad_third)
    if hasattr(su, "LOSSES"):  # train.py picks the loss from this table (model.loss)
        monkeypatch.setitem(su.LOSSES, "dice_ce", bad_third)
    root = make_msd_segmentation(tmp_path / "task", 4, (32, 32, 4), 3, seed=0)
    overrides = ["data.num_workers=0", "training.log_every=100", "smoke=true", f"data.root={root}"]
    overrides.append(f"training.numerics.policy={policy}")
    cfg = load_config(example / "config.yaml", overrides=overrides, schema=T.SegmentationConfig)
    cpu = T.DistInfo(0, 1, 0, 1, 0, "single", None, torch.device("cpu"), None, None)
    if policy == "skip":  # the step is skipped, counted and tracked; the run goes on
        T.train(cfg, run_dir=tmp_path / "run", info=cpu)
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["numerics_skips"] for r in rows if "epoch" in r] == [1]
        return
    with pytest.raises(numerics.NumericalError, match="non-finite value at step 2") as info:
        T.train(cfg, run_dir=tmp_path / "run", info=cpu)
    assert info.value.report is not None and info.value.report.first == {0: "loss"}
    assert info.value.report.samples[0]  # the slice indices of the faulty batch
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "numerics.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["tensors"] == {"0": ["loss"]}


@pytest.mark.parametrize("checksums", [False, True], ids=["blake2b-cpu", "checksums-gpu-way"])
def test_digests_see_one_bit_and_a_swap(checksums: bool) -> None:
    base = [torch.randn(1000), torch.ones(3, dtype=torch.bool), torch.randn(7).bfloat16(), torch.zeros(2, 2)]
    same = numerics._digests([t.clone() for t in base], checksums=checksums)
    assert same.shape == (4, 2) and same.dtype == torch.int64
    assert torch.equal(same, numerics._digests(base, checksums=checksums))
    flipped = base[0].clone()
    flipped.view(torch.int32)[517] ^= 1 << 3
    swapped = base[0].clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    for other in (flipped, swapped):
        assert not torch.equal(numerics._digests([other], checksums=checksums)[0], same[0])


def test_grad_scaler_overflow_is_left_to_the_scaler() -> None:
    """Under a fp16 GradScaler an overflowing gradient is the scaler's to skip; a non-finite loss is still ours."""
    model = nn.Linear(3, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    sentinel = numerics.Sentinel(model, grad_scaler=scaler)
    model(torch.ones(2, 3)).sum().backward()
    model.weight.grad[0, 0] = float("inf")
    assert sentinel.check(0, torch.tensor(1.0)) and sentinel.last_report is None
    with pytest.raises(numerics.NumericalError, match="non-finite value at step 1") as info:
        sentinel.check(1, torch.tensor(float("nan")))
    assert info.value.report is not None and info.value.report.first == {0: "loss"}
