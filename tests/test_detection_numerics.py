"""examples/detection with ratlib.numerics on (its default, policy "raise"), end to end on 2 gloo ranks: a NaN put
into one named parameter's gradient on rank 1 at one step stops every rank at that step, and the report in the run
folder (numerics.jsonl) names that rank, that step and that parameter.

The fault goes in through the example's own model builder (``detection_utils.build_model``), wrapped in the rank
process: a gradient hook on one parameter of rank 1's model. It fires before DDP's all-reduce (which would spread
the NaN to rank 0), as a faulty kernel or a bad sample on one rank would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from example_helpers import load_script, one_thread  # noqa: F401  (fixture)

from ratlib.config_defaults import load_config
from ratlib.synthetic import make_coco_detection
from ratlib.testing.ranks import run_on_ranks

TRAIN_PY = Path(__file__).resolve().parents[1] / "examples" / "detection" / "train.py"
T = load_script(TRAIN_PY, "detection_train")
du = sys.modules["detection_utils"]
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # ranks on CPU and gloo, also on a GPU machine
BAD_STEP = 2  # the optimiser step (1-based, as the example counts it) whose backward makes the NaN
BAD_RANK = 1

TINY = [
    "model.name=fasterrcnn_tiny",
    "model.min_size=128",
    "model.max_size=128",
    "model.width=8",
    "training.batch_size=2",
    "training.mixed_precision=false",
    "training.num_epochs=1",
    "training.log_every=1",
    "data.num_workers=0",
    "eval.every_epochs=100",
]


def nan_on_rank_1(run: str, root: str) -> int:
    """One rank: train with a NaN in rank 1's gradient of one parameter at the ``BAD_STEP``-th backward. Writes
    what it raised (or that it finished) to ``run/rank{R}.json``."""
    from ratlib import distributed, numerics

    torch.set_num_threads(1)
    build = du.build_model
    chosen: dict[str, str] = {}

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        name, param = [(n, p) for n, p in model.named_parameters() if p.requires_grad][-1]
        chosen["name"] = name
        backwards = []

        def poison(grad: torch.Tensor) -> torch.Tensor:
            backwards.append(1)
            if len(backwards) == BAD_STEP and torch.distributed.get_rank() == BAD_RANK:
                return grad * float("nan")
            return grad

        param.register_hook(poison)
        return model

    du.build_model = build_model
    out: dict = {}
    cfg = load_config(None, overrides=[*TINY, f"output_dir={run}", f"data.root={root}"], schema=T.DetectionConfig)
    with distributed(device="cpu") as info:
        try:
            T.train(cfg, run_dir=run, info=info)
            out["finished"] = True
        except numerics.NumericalError as exc:
            out = {"raised": type(exc).__name__, "report": exc.report.to_dict() if exc.report else None}
        out["parameter"] = chosen.get("name")
        (Path(run) / f"rank{info.rank}.json").write_text(json.dumps(out))
    return 0


@pytest.mark.slow  # 9 s on 2 idle cores, 75 s at load 7: two ranks import torchvision and build Faster R-CNN
@pytest.mark.distributed
@pytest.mark.usefixtures("one_thread")
def test_nan_in_one_ranks_gradient_stops_every_rank_and_is_named(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    make_coco_detection(root, "train2017", num_images=16, seed=0)
    make_coco_detection(root, "val2017", num_images=4, seed=0)
    run = tmp_path / "run"
    run_on_ranks(nan_on_rank_1, 2, args=(str(run), str(root)), env=NO_GPU, timeout=300).check()

    outcomes = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
    parameter = outcomes[0]["parameter"]
    assert parameter and outcomes[1]["parameter"] == parameter
    for outcome in outcomes:  # every rank raised, at the same step, with the same report
        assert outcome.get("raised") == "NumericalError", outcome
        assert outcome["report"] == outcomes[0]["report"]
    report = outcomes[0]["report"]
    assert report["step"] == BAD_STEP and report["ranks"] == [BAD_RANK]
    assert report["tensors"] == {str(BAD_RANK): [parameter]}  # named on rank 1 only: seen before the all-reduce
    assert len(report["samples"][str(BAD_RANK)]) == 2  # the image ids of rank 1's batch

    (record,) = [json.loads(line) for line in (run / "numerics.jsonl").read_text().splitlines()]
    assert record == report
    # no rank stepped at the faulty step: the per-step rows end at the step before it
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, BAD_STEP))
