"""ratlib.config_defaults: defaults, YAML coercion, strict validation, overrides, smoke, checks,
memory estimates, the DeepSpeed bridge and dumping."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from pydantic import ConfigDict

from ratlib.config_defaults import (
    ConfigError,
    ExperimentConfig,
    MemoryProbe,
    ModelConfig,
    check_config,
    dump_config,
    estimate_model_memory,
    load_config,
    to_deepspeed_config,
)
from ratlib.synthetic import make_coco_detection
from ratlib.testing.strategies import configs


def _problems(source, **kwargs) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(source, **kwargs)
    return info.value.problems


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# Defaults, YAML and overrides


def test_complete_defaults_for_a_config_without_training_section() -> None:
    cfg = load_config({"model": {"name": "unet"}})
    t = cfg.training
    assert (t.num_epochs, t.batch_size, t.gradient_accumulation_steps) == (10, 48, 1)
    assert (t.optimizer.name, t.optimizer.lr, t.optimizer.weight_decay) == ("adamw", 1e-4, 0.01)
    assert (t.scheduler.name, t.scheduler.min_lr, t.mixed_precision, t.gradient_clip) == ("cosine", 1e-6, True, 1.0)
    assert (t.compile, t.channels_last, t.deepspeed.enabled, t.max_steps, t.memory_warning_fraction) == (
        False,
        None,
        False,
        None,
        0.9,
    )
    assert (cfg.output_dir, cfg.smoke, cfg.distributed.backend, cfg.data.root, cfg.data.limit) == (
        "runs/default",
        False,
        None,
        None,
        None,
    )
    assert cfg.model.model_extra == {"name": "unet"}  # project section passes through
    assert "training.batch_size" in cfg.defaults_applied and "training.optimizer.lr" in cfg.defaults_applied
    assert not any(p.startswith("model") for p in cfg.defaults_applied)
    assert load_config(None) == ExperimentConfig()


def test_empty_yaml_sections_take_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "training:\n  # batch_size: 8\ndata:\n"))
    assert cfg.training.batch_size == 48 and cfg.data.num_workers == 2


@pytest.mark.parametrize(
    "text,path,expected",
    [
        ("training:\n  optimizer:\n    lr: 1e-4\n", ("training", "optimizer", "lr"), 1e-4),
        ("training:\n  optimizer:\n    lr: 1E-4\n", ("training", "optimizer", "lr"), 1e-4),
        ("training:\n  optimizer:\n    lr: 5e3\n", ("training", "optimizer", "lr"), 5000.0),
        ("training:\n  optimizer:\n    weight_decay: .5\n", ("training", "optimizer", "weight_decay"), 0.5),
        ("training:\n  batch_size: '32'\n", ("training", "batch_size"), 32),
        ("training:\n  batch_size: 1_024\n", ("training", "batch_size"), 1024),
        ("training:\n  gradient_clip: null\n", ("training", "gradient_clip"), None),
        ("training:\n  gradient_clip: ~\n", ("training", "gradient_clip"), None),
        ("training:\n  gradient_clip:\n", ("training", "gradient_clip"), None),
        ("smoke: yes\n", ("smoke",), True),
        ("training:\n  compile: no\n", ("training", "compile"), False),
        ("training:\n  mixed_precision: off\n", ("training", "mixed_precision"), False),
        ("training:\n  mixed_precision: bf16\n", ("training", "mixed_precision"), "bf16"),
        ("model:\n  dropout: 1e-4\n", ("model", "dropout"), 1e-4),  # the numeric fix reaches project sections
    ],
)
def test_yaml_edge_cases(tmp_path: Path, text: str, path: tuple[str, ...], expected: object) -> None:
    value = load_config(_write(tmp_path, text)).model_dump()
    for key in path:
        value = value[key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "text,key,fragment",
    [
        ("training:\n  gradient_clip: 'null'\n", "training.gradient_clip", "got 'null'; expected a number > 0 or null"),
        ("output_dir: no\n", "output_dir", "got False; expected a string (YAML reads yes/no"),
        ("training:\n  batch_size: yes\n", "training.batch_size", "got True; expected an integer > 0"),
        ("training:\n  seed: 1.5\n", "training.seed", "got 1.5; expected an integer >= 0"),
        ("training:\n  optimizer:\n    lr: .nan\n", "training.optimizer.lr", "expected a number > 0"),
    ],
)
def test_yaml_values_that_must_be_rejected(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    ((path, message),) = _problems(_write(tmp_path, text))
    assert path == key and fragment in message


def test_unknown_key_names_path_line_and_closest(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "training:\n  batch_size: 8\n  optimizer:\n    learning_rate: 1e-3\n    weigth_decay: 0.1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"invalid config {path}: 2 problems")
    assert "training.optimizer.learning_rate (line 4): unknown key; did you mean 'training.optimizer.lr'?" in text
    assert (
        "training.optimizer.weigth_decay (line 5): unknown key; did you mean 'training.optimizer.weight_decay'?" in text
    )
    assert "docs/config_defaults.md" in text


@pytest.mark.parametrize(
    "data,key,message",
    [
        ({"trainig": {"batch_size": 4}}, "trainig", "unknown section; did you mean 'training'?"),
        ({"epochs": 3}, "epochs", "unknown top-level key with value 3; did you mean 'training.num_epochs'?"),
        ({"training": {"betas": [0.9, 0.9]}}, "training.betas", "did you mean 'training.optimizer.betas'?"),
        ({"training": {"batch_size": "abc"}}, "training.batch_size", "got 'abc'; expected an integer > 0"),
        ({"training": {"batch_size": 0}}, "training.batch_size", "got 0; expected an integer > 0"),
        ({"training": {"optimizer": {"lr": 0}}}, "training.optimizer.lr", "got 0; expected a number > 0"),
        ({"training": {"optimizer": {"lr": -1e-3}}}, "training.optimizer.lr", "got -0.001; expected a number > 0"),
        (
            {"training": {"optimizer": {"name": "adamx"}}},
            "training.optimizer.name",
            "expected 'adamw', 'adam' or 'sgd'",
        ),
        (
            {"training": {"optimizer": {"betas": [0.9, "x"]}}},
            "training.optimizer.betas.1",
            "got 'x'; expected a number",
        ),
        ({"training": {"deepspeed": {"zero_stage": 4}}}, "training.deepspeed.zero_stage", "expected 0, 1, 2 or 3"),
        (
            {"training": {"mixed_precision": "bf32"}},
            "training.mixed_precision",
            "got 'bf32'; expected true, false, 'bf16' or 'fp16'",
        ),
        (
            {"training": {"optimizer": {"lr": 1e-6}, "scheduler": {"min_lr": 1e-6}}},
            "training.scheduler.min_lr",
            "needs min_lr below training.optimizer.lr=1e-06",
        ),
        ({"training": 5}, "training", "got 5; expected a mapping (section)"),
        ({"distributed": {"backend": "mpi"}}, "distributed.backend", "expected 'gloo', 'nccl' or null"),
        ({"data": {"limit": 0}}, "data.limit", "got 0; expected an integer > 0 or null"),
    ],
)
def test_every_error_kind(data: dict, key: str, message: str) -> None:
    ((path, text),) = _problems(data)
    assert path == key and message in text, text


def test_all_problems_reported_together_in_file_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "trainig: {}\ntraining:\n  batch_size: 0\n  optimizer: {lr: abc}\ndistributed:\n  timeout_s: -1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=["training.num_epochs=0"])
    assert [p for p, _ in info.value.problems] == [
        "trainig",
        "training.batch_size",
        "training.optimizer.lr",
        "distributed.timeout_s",
        "training.num_epochs",
    ]
    text = str(info.value)
    assert "training.optimizer.lr (line 4): got 'abc'" in text  # flow style keeps its line
    assert "training.num_epochs (override 'training.num_epochs=0'): got 0" in text


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n  batch_size: 8\n  optimizer: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:1: invalid YAML: .*fix the syntax there"):
        load_config(path)
    path = _write(tmp_path, "training:\n  batch_size: 8\n\tseed: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3:1: invalid YAML"):
        load_config(path)


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n  optimizer:\n    lr: 1e-3\n    lr: 1e-4\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:5: invalid YAML: .*key 'lr' is given twice \(first on line 3\)"):
        load_config(path)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="the top level is a list"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_overrides_are_yaml_values() -> None:
    cfg = load_config(
        {"training": {"batch_size": 8}},
        overrides=[
            "training.optimizer.lr=3e-4",
            "training.batch_size=4",
            "model.feature_dims=[16, 32]",
            "training.gradient_clip=null",
            "training.mixed_precision=fp16",
            "data.root=/data/coco",
            "model.depth=3",
        ],
    )
    assert cfg.training.optimizer.lr == 3e-4 and cfg.training.batch_size == 4
    assert cfg.model.model_extra == {"feature_dims": [16, 32], "depth": 3}
    assert cfg.training.gradient_clip is None and cfg.training.mixed_precision == "fp16"
    assert cfg.data.root == "/data/coco"
    assert "training.optimizer.lr" not in cfg.defaults_applied and "training.seed" in cfg.defaults_applied


@pytest.mark.parametrize(
    "override,message",
    [
        ("lr", "expected dotted.key=value"),
        ("training..lr=1", "expected dotted.key=value"),
        ("training.optimizer.lr=[1", "is not valid YAML"),
        ("training.batch_size.x=1", "training.batch_size is 48, not a section"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config({"training": {"batch_size": 48}}, overrides=[override])
    with pytest.raises(ConfigError, match="is one string"):
        load_config(None, overrides="training.batch_size=4")  # type: ignore[arg-type]
    assert (
        _problems(None, overrides=["training.optimizr.lr=1"])[0][1] == "unknown key; did you mean 'training.optimizer'?"
    )


def test_smoke_fills_unset_keys_and_records_them() -> None:
    cfg = load_config(None, overrides=["smoke=true"])
    assert (cfg.data.limit, cfg.training.max_steps, cfg.training.num_epochs) == (16, 10, 1)
    assert cfg.smoke_applied == ["data.limit", "training.max_steps", "training.num_epochs"]
    assert set(cfg.smoke_applied) <= set(cfg.defaults_applied)
    explicit = load_config({"smoke": True, "data": {"limit": 3}, "training": {"max_steps": None}})
    assert explicit.data.limit == 3 and explicit.training.max_steps is None and explicit.training.num_epochs == 1
    assert explicit.smoke_applied == ["training.num_epochs"]
    assert load_config({"smoke": False}).data.limit is None


class StrictModel(ModelConfig):
    model_config = ConfigDict(extra="forbid")
    feature_dims: int = 32
    num_blocks: int = 4


class ProjectConfig(ExperimentConfig):
    model: StrictModel = StrictModel()


def test_project_schema_validates_its_sections() -> None:
    cfg = load_config({"model": {"feature_dims": "64"}}, schema=ProjectConfig)
    assert isinstance(cfg, ProjectConfig) and cfg.model.feature_dims == 64 and cfg.model.num_blocks == 4
    assert "model.num_blocks" in cfg.defaults_applied and "model.feature_dims" not in cfg.defaults_applied
    assert _problems({"model": {"feture_dims": 8}}, schema=ProjectConfig) == [
        ("model.feture_dims", "unknown key; did you mean 'model.feature_dims'?")
    ]


def test_defaults_are_logged_once_on_the_main_rank() -> None:
    code = (
        "from ratlib.rank_logger import setup_logging\nfrom ratlib.config_defaults import load_config\n"
        "setup_logging()\nload_config({'training': {'batch_size': 4}}, overrides=['smoke=true'])"
    )
    for rank, expected in (("0", 1), ("1", 0)):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "RANK": rank, "WORLD_SIZE": "2"},
        )
        logs = out.stdout + out.stderr
        assert logs.count("key(s) from defaults") == expected, logs
        assert logs.count("smoke mode set data.limit=16") == expected


# ----------------------------------------------------------------------------------------------
# Properties, with the strategy downstream projects use


@settings(max_examples=100, deadline=None)
@given(configs(valid=True))
def test_any_valid_config_loads_and_round_trips(case) -> None:
    cfg = load_config(case.data)
    assert cfg.training.batch_size >= 1 and isinstance(cfg.training.optimizer.lr, float)
    with tempfile.TemporaryDirectory() as tmp:
        path = dump_config(cfg, Path(tmp) / "config.yaml")
        assert path is not None and load_config(path) == cfg


@settings(max_examples=150, deadline=None)
@given(configs(valid=False))
def test_any_single_corruption_is_rejected_at_exactly_its_key(case) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(case.data)
    assert [p for p, _ in info.value.problems] == [case.key], str(info.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(schema=ProjectConfig, valid=False))
def test_strategy_follows_a_project_schema(case) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(case.data, schema=ProjectConfig)
    assert [p for p, _ in info.value.problems] == [case.key], str(info.value)


# ----------------------------------------------------------------------------------------------
# check_config and memory


def _keys(findings) -> set[tuple[str, str]]:
    return {(f.severity, f.key) for f in findings}


def test_check_config_flags_the_old_failures(tmp_path: Path) -> None:
    risky = load_config(
        {
            "training": {"batch_size": 80, "mixed_precision": "bf16"},
            "model": {"feature_dims": 1024, "num_blocks": 12},
            "data": {"root": str(tmp_path / "missing"), "ann_file": str(tmp_path / "nope.json")},
        }
    )
    findings = check_config(risky, world_size=4, device="cpu")
    assert {
        ("warning", "training.batch_size"),
        ("warning", "model"),
        ("error", "data.root"),
        ("error", "data.ann_file"),
        ("info", "training.mixed_precision"),
    } <= _keys(findings)
    batch = next(f for f in findings if f.severity == "warning" and f.key == "training.batch_size")
    assert "training.batch_size=40 and training.gradient_accumulation_steps=2 (global batch 320)" in batch.advice
    info = next(f for f in findings if f.severity == "info" and f.key == "training.batch_size")
    assert info.message == "global batch 320 = 80 per device x 1 accumulation x 4 rank(s)"
    model = next(f for f in findings if f.key == "model")
    assert "zero_stage=2" in model.advice
    clean = load_config({"training": {"mixed_precision": False}})
    assert [f for f in check_config(clean, device="cpu") if f.severity != "info"] == []
    assert check_config(load_config({"training": {"batch_size": 80}}), max_batch_size=96, device="cpu") == check_config(
        load_config({"training": {"batch_size": 80}}), max_batch_size=96, device="cpu"
    )
    assert ("warning", "training.batch_size") not in _keys(
        check_config(load_config({"training": {"batch_size": 80}}), max_batch_size=96, device="cpu")
    )


def test_check_config_resolves_coco_splits(tmp_path: Path) -> None:
    make_coco_detection(tmp_path / "coco", "val2017", num_images=2)
    cfg = load_config({"data": {"root": str(tmp_path / "coco"), "train_split": "train2017", "val_split": "val"}})
    errors = [f for f in check_config(cfg, device="cpu") if f.severity == "error"]
    assert [f.key for f in errors] == ["data.train_split"] and "ratlib coco" in errors[0].advice


def test_check_config_with_a_model_size_and_a_probe() -> None:
    cfg = load_config({"training": {"batch_size": 64, "mixed_precision": "bf16"}})
    big = 2_000_000_000  # 2B parameters, 16 bytes each in plain fp32 AdamW: 30 GiB of model states
    (finding,) = [f for f in check_config(cfg, 8, model=big, device="cuda", device_memory_gib=40) if f.key == "model"]
    assert finding.severity == "warning" and "ZeRO stage 1" in finding.advice and "zero_stage=1" in finding.advice
    assert not [
        f for f in check_config(cfg, 8, model=10_000_000, device="cuda", device_memory_gib=40) if f.key == "model"
    ]
    probe = MemoryProbe(batch_sizes=(2, 4), peak_bytes=(6 * 2**30, 8 * 2**30), capacity_bytes=40 * 2**30, fraction=0.9)
    assert probe.max_batch_size == 32 and probe.predict(64) == 68 * 2**30
    (finding,) = [
        f
        for f in check_config(cfg, probe=probe, device="cuda", device_memory_gib=40)
        if f.key == "training.batch_size" and f.severity != "info"
    ]
    assert finding.severity == "error" and "about 68.0 GiB by the measured probe; 32 fits" in finding.message
    assert "training.batch_size=32 and training.gradient_accumulation_steps=2" in finding.advice


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
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        emb = torch.nn.Embedding(100, 16)
        head = torch.nn.Linear(16, 100, bias=False)
        head.weight = emb.weight  # tied: counted once
        model = torch.nn.Sequential(emb, torch.nn.Linear(16, 32), head)
    est = estimate_model_memory(model, world_size=2, zero_stage=3)
    assert (est.num_params, est.largest_layer_params) == (1600 + 16 * 32 + 32, 1600)
    assert est.params_bytes == 4 * est.num_params / 2 + 8 * 1600


# ----------------------------------------------------------------------------------------------
# DeepSpeed bridge


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_to_deepspeed_config_batch_invariant_and_zero(world: int, stage: int) -> None:
    cfg = load_config(
        {
            "training": {
                "batch_size": 6,
                "gradient_accumulation_steps": 3,
                "mixed_precision": "fp16",
                "deepspeed": {"enabled": True, "zero_stage": stage, "offload": True},
            }
        }
    )
    ds = to_deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == 6 * 3 * world
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == (stage >= 1) and ("offload_param" in zero) == (stage == 3)
    assert ds["gradient_clipping"] == 1.0 and "scheduler" not in ds


def test_to_deepspeed_config_optimizers_schedulers_and_errors() -> None:
    ds = to_deepspeed_config(load_config(None), 2)
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
    }
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    adam = to_deepspeed_config(load_config({"training": {"optimizer": {"name": "adam"}}}), 1, device="cpu")
    assert adam["optimizer"]["type"] == "Adam" and adam["optimizer"]["params"]["adam_w_mode"] is False
    assert adam["optimizer"]["params"]["torch_adam"] is True
    sgd = to_deepspeed_config(load_config({"training": {"optimizer": {"name": "sgd"}, "gradient_clip": None}}), 1)
    assert sgd["optimizer"] == {"type": "SGD", "params": {"lr": 1e-4, "momentum": 0.9, "weight_decay": 0.01}}
    assert sgd["zero_allow_untested_optimizer"] is True and sgd["gradient_clipping"] == 0.0
    cosine = load_config({"training": {"num_epochs": 5, "scheduler": {"warmup_epochs": 0.5}}})
    sched = to_deepspeed_config(cosine, 4, steps_per_epoch=100)["scheduler"]
    assert sched == {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": 500,
            "warmup_num_steps": 50,
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": pytest.approx(0.01),
            "warmup_type": "linear",
        },
    }
    no_warmup = load_config({"training": {"scheduler": {"warmup_epochs": 0}}})
    params = to_deepspeed_config(no_warmup, 1, steps_per_epoch=10)["scheduler"]["params"]
    assert (params["warmup_num_steps"], params["warmup_min_ratio"]) == (1, 1.0)  # DeepSpeed refuses 0 steps
    capped = load_config({"training": {"max_steps": 30}})
    assert to_deepspeed_config(capped, 1, steps_per_epoch=100)["scheduler"]["params"]["total_num_steps"] == 30
    constant = load_config({"training": {"scheduler": {"name": "constant", "warmup_epochs": 1}}})
    assert to_deepspeed_config(constant, 1, steps_per_epoch=10)["scheduler"]["params"]["warmup_num_steps"] == 10
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="world_size="):
            to_deepspeed_config(cosine, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        to_deepspeed_config(cosine, 1, steps_per_epoch=0)


def test_deepspeed_accepts_the_config_when_installed() -> None:
    ds_config = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed is not installed here")
    for stage in (0, 1, 2, 3):
        cfg = load_config(
            {
                "training": {
                    "batch_size": 4,
                    "gradient_accumulation_steps": 2,
                    "deepspeed": {"enabled": True, "zero_stage": stage},
                }
            }
        )
        # Without a process group DeepSpeedConfig checks the batch invariant at world size 1; the 2-rank
        # case is checked by deepspeed.initialize in the test below.
        parsed = ds_config.DeepSpeedConfig(to_deepspeed_config(cfg, 1, steps_per_epoch=10))
        assert parsed.train_batch_size == 8 and parsed.zero_optimization_stage == stage


def _deepspeed_three_steps(stage: int) -> None:
    """Rank target: deepspeed.initialize with our config on CPU (gloo), three optimizer steps, torn down as
    docs/dist_init.md tells DeepSpeed users to (without it a rank could abort at exit, issue 18)."""
    import deepspeed
    import torch

    from ratlib import distributed

    with distributed(device="cpu"):
        deepspeed.init_distributed(dist_backend="gloo")  # adopts ratlib's group
        steps = _three_steps(stage)  # the engine is freed on return, before the teardown
    # Issue 18: a group alive at exit (DeepSpeed kept a WORLD copy) could abort the rank in finalization.
    from deepspeed.utils import groups

    assert not torch.distributed.is_initialized() and groups._WORLD_GROUP is None, "a group outlived the teardown"
    print(f"stage {stage}: {steps} steps")


def _three_steps(stage: int) -> int:
    import deepspeed
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    cfg = load_config(
        {"training": {"batch_size": 4, "mixed_precision": False, "deepspeed": {"enabled": True, "zero_stage": stage}}}
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=to_deepspeed_config(cfg, 2, steps_per_epoch=3, device="cpu"),
    )
    for _ in range(3):
        loss = engine(torch.randn(4, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == 3, engine.global_steps
    return int(engine.global_steps)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_initialize_on_two_cpu_ranks(stage: int, run_on_ranks) -> None:
    pytest.importorskip("deepspeed", reason="deepspeed is not installed here")
    run = run_on_ranks(_deepspeed_three_steps, 2, args=(stage,), env={"DS_ACCELERATOR": "cpu"}, timeout=300)
    assert run.ok, str(run)
    assert all(f"stage {stage}: 3 steps" in out for out in run.stdouts)


# ----------------------------------------------------------------------------------------------
# dump_config


def test_dump_config_round_trip_atomic_and_main_rank_only(tmp_path: Path) -> None:
    cfg = load_config(
        {"training": {"batch_size": 7, "mixed_precision": "bf16"}, "model": {"feature_dims": 48}, "smoke": True},
        schema=ProjectConfig,
    )
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path, schema=ProjectConfig) == cfg
    assert yaml.safe_load(path.read_text())["training"]["optimizer"]["lr"] == 1e-4
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]  # no temporary file left
    code = (
        "from ratlib.config_defaults import load_config, dump_config\n"
        f"print(dump_config(load_config(None), {str(tmp_path / 'other.yaml')!r}))"
    )
    for env in ({"RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}):
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "OMPI_"))}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**clean, **env}
        )
        assert out.stdout.strip() == "None" and not (tmp_path / "other.yaml").exists(), out.stderr


def test_dump_config_leaves_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("old\n")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        dump_config(load_config(None), target)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ----------------------------------------------------------------------------------------------
# GPU: the measured probe


@pytest.mark.gpu
def test_probe_memory_extrapolates_a_measured_peak() -> None:
    import torch

    from ratlib.config_defaults import probe_memory

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


def test_a_projects_own_validator_messages_reach_the_user() -> None:
    # A project's field and model validators know what is wrong; the error must carry their words, with the
    # key and the value, not a generic "expected a mapping" / "expected an integer".
    from pydantic import BaseModel, field_validator, model_validator

    class Model(BaseModel):
        model_config = ConfigDict(extra="forbid")
        feature_dims: int = 8
        num_blocks: int = 3

        @field_validator("num_blocks")
        @classmethod
        def _depth(cls, v: int) -> int:
            if v > 6:
                raise ValueError("num_blocks above 6 pools a 64-pixel slice to nothing")
            return v

        @model_validator(mode="after")
        def _size(self) -> Model:
            assert self.feature_dims * self.num_blocks <= 100, "feature_dims x num_blocks must stay <= 100"
            return self

    class Project(ExperimentConfig):
        model: Model = Model()

    with pytest.raises(ConfigError) as err:
        load_config({}, overrides=["model.num_blocks=7"], schema=Project)
    assert "model.num_blocks (override 'model.num_blocks=7'): num_blocks above 6 pools" in str(err.value)
    assert "(got 7)" in str(err.value) and "expected an integer" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config({"model": {"feature_dims": 50}}, schema=Project)
    assert "model: feature_dims x num_blocks must stay <= 100" in str(err.value)
    assert "expected a mapping" not in str(err.value)
