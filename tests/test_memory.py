"""ratlib.memory: per-rank peak memory, gathered, with the peak rank named and a warning near capacity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ratlib import memory
from ratlib.memory import GIB, MemoryReport, RankMemory, estimate_model_memory, probe_memory


def _touch(megabytes: int) -> np.ndarray:
    block = np.ones(megabytes * 1024 * 1024 // 8)  # written, so resident
    return block


def test_cpu_peak_rss_grows_with_an_allocation_and_resets() -> None:
    memory.reset_peak_memory("cpu")
    before = memory.peak_memory("cpu")
    assert before.kind == "rss" and before.rank == 0 and before.capacity and before.capacity > before.peak > 0
    block = _touch(200)
    grown = memory.peak_memory("cpu")
    assert grown.peak - before.peak > 150 * 1024 * 1024
    del block
    memory.reset_peak_memory("cpu")
    after = memory.peak_memory("cpu")
    if Path("/proc/self/clear_refs").exists():  # Linux: the peak restarts from the current RSS
        assert after.peak < grown.peak - 100 * 1024 * 1024


def test_report_metrics_table_and_warning(caplog: pytest.LogCaptureFixture) -> None:
    ranks = [
        RankMemory(0, "cuda", "cuda:0", 10 * GIB, 12 * GIB, 80 * GIB),
        RankMemory(1, "cuda", "cuda:1", 70 * GIB, 75 * GIB, 80 * GIB),
    ]
    report = MemoryReport(ranks)
    assert report.max.rank == 1 and report.over(0.9) == [ranks[1]]
    metrics = report.to_metrics()
    assert metrics == {
        "peak_memory_kind": "cuda",
        "peak_memory_gib": [12.0, 75.0],
        "peak_memory_allocated_gib": [10.0, 70.0],
        "peak_memory_max_gib": 75.0,
        "peak_memory_max_rank": 1,
    }
    json.dumps(metrics)
    assert "<- peak" in report.table().splitlines()[2]
    with pytest.raises(ValueError, match="warn_fraction=1.5"):
        memory.memory_report("cpu", warn_fraction=1.5)


def test_single_process_report_warns_over_the_fraction(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="ratlib.memory"):
        report = memory.memory_report("cpu", warn_fraction=1e-9)
    assert len(report.ranks) == 1 and report.max.rank == 0
    (record,) = [r for r in caplog.records if r.name == "ratlib.memory"]
    assert "rank 0 peak host memory" in record.getMessage() and "batch_size" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="ratlib.memory"):
        memory.memory_report("cpu", warn_fraction=None)
    assert not caplog.records


def rank_one_allocates_more() -> int:
    from ratlib import distributed, setup_logging

    setup_logging()
    with distributed(device="cpu") as info:
        memory.reset_peak_memory()
        block = _touch(600 if info.rank == 1 else 1)
        report = memory.memory_report(warn_fraction=1e-9)  # every rank passes: the main rank warns per rank
        print("REPORT " + json.dumps(report.to_metrics()), flush=True)
        del block
    return 0


@pytest.mark.distributed
def test_two_ranks_the_gathered_report_names_the_rank_that_allocated_more(run_on_ranks) -> None:
    run = run_on_ranks(rank_one_allocates_more, 2, env={"CUDA_VISIBLE_DEVICES": ""}).check()
    reports = [
        json.loads(line.split("REPORT ", 1)[1])
        for out in run.stdouts
        for line in out.splitlines()
        if line.startswith("REPORT ")
    ]
    assert len(reports) == 2 and reports[0] == reports[1]  # the same report on every rank
    report = reports[0]
    assert report["peak_memory_max_rank"] == 1 and report["peak_memory_kind"] == "rss"
    low, high = report["peak_memory_gib"]
    assert high - low > 0.4  # 600 MB more on rank 1
    warnings = run.outputs[0]
    assert "rank 1 peak host memory" in warnings and "rank 0 peak host memory" in warnings
    assert "peak host memory" not in run.outputs[1]  # only the main rank warns


# ----------------------------------------------------------------------------------------------
# Before training: the model-state estimate and the measured probe (moved from ratlib.config_defaults)


def test_config_defaults_re_exports_the_moved_names() -> None:
    import ratlib
    import ratlib.config_defaults as cd

    for name in ("estimate_model_memory", "probe_memory", "MemoryEstimate", "MemoryProbe", "count_parameters"):
        assert getattr(cd, name) is getattr(memory, name), name
    assert ratlib.estimate_model_memory is memory.estimate_model_memory


def test_memory_estimate_counts_like_deepspeed() -> None:
    p, n = 1_000_000, 4
    mixed = {
        s: estimate_model_memory(p, world_size=n, precision="mixed", zero_stage=s, largest_layer_params=1000)
        for s in range(4)
    }
    # DeepSpeed's estimate_zero2_model_states_mem_needs (no offload): 4P + 16P/N
    assert mixed[1].total_bytes == 4 * p + 16 * p // n
    assert mixed[0].total_bytes == 20 * p
    assert mixed[2].total_bytes == 2 * p + 18 * p // n
    assert mixed[3].total_bytes == 20 * p // n + 4 * 1000
    offloaded = estimate_model_memory(p, world_size=n, precision="mixed", zero_stage=2, offload=True)
    assert (offloaded.optimizer_bytes, offloaded.cpu_bytes) == (0, 16 * p // n)
    fp32 = estimate_model_memory(p)  # plain PyTorch AdamW: weights 4 + gradients 4 + two moments 8
    assert (fp32.params_bytes, fp32.gradients_bytes, fp32.optimizer_bytes) == (4 * p, 4 * p, 8 * p)
    assert estimate_model_memory(p, optimizer="sgd", momentum=0.0).total_bytes == 8 * p
    assert "0.01 GiB per GPU" in str(fp32)
    with pytest.raises(ValueError, match="zero_stage=5"):
        estimate_model_memory(p, zero_stage=5)


def test_memory_estimate_of_a_module_on_the_meta_device() -> None:
    import torch  # a hard dependency: no skip

    with torch.device("meta"):
        emb = torch.nn.Embedding(100, 16)
        head = torch.nn.Linear(16, 100, bias=False)
        head.weight = emb.weight  # tied: counted once
        model = torch.nn.Sequential(emb, torch.nn.Linear(16, 32), head)
    est = estimate_model_memory(model, world_size=2, zero_stage=3)
    assert (est.num_params, est.largest_layer_params) == (1600 + 16 * 32 + 32, 1600)
    assert est.params_bytes == 4 * est.num_params / 2 + 8 * 1600


# ----------------------------------------------------------------------------------------------
# GPU: the measured probe


@pytest.mark.gpu
def test_probe_memory_extrapolates_a_measured_peak() -> None:
    import torch

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 1, 1),
        )

    def batch(b: int) -> torch.Tensor:
        return torch.randn(b, 3, 128, 128)

    probe = probe_memory(net(), batch, batch_sizes=(4, 8))
    assert probe.bytes_per_sample > 0 and probe.max_batch_size > 8
    measured = probe_memory(net(), batch, batch_sizes=(4, 32))
    assert math.isclose(probe.predict(32), measured.peak_bytes[1], rel_tol=0.15), (probe, measured)
    with pytest.raises(ValueError, match="batch_sizes="):
        probe_memory(net(), batch, batch_sizes=(4, 4))
