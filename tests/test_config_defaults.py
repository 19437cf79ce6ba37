"""ratlib.config_defaults: defaults, coercion, strict validation, overrides, checks, DeepSpeed bridge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from pydantic import ConfigDict

from ratlib.config_defaults import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    check_config,
    dump_config,
    load_config,
    to_deepspeed_config,
)
from ratlib.testing.strategies import configs


def test_complete_defaults_for_a_config_without_training_section() -> None:
    cfg = load_config({"model": {"name": "unet"}})
    t = cfg.training
    assert (t.num_epochs, t.batch_size, t.optimizer.name, t.optimizer.lr, t.optimizer.weight_decay) == (
        10, 48, "adamw", 1e-4, 0.01)
    assert (t.scheduler.name, t.scheduler.min_lr, t.mixed_precision, t.gradient_clip) == ("cosine", 1e-6, True, 1.0)
    assert t.compile is False and t.channels_last is None and t.deepspeed.enabled is False
    assert cfg.model.model_extra == {"name": "unet"}  # project section passes through
    assert "training.batch_size" in cfg.defaults_applied and "model" not in cfg.defaults_applied


def test_yaml_string_floats_are_coerced(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("training:\n  optimizer:\n    lr: 1e-4\n  scheduler:\n    min_lr: 1e-6\n")
    assert yaml.safe_load(path.read_text())["training"]["optimizer"]["lr"] == "1e-4"  # the YAML 1.1 trap
    cfg = load_config(path)
    assert cfg.training.optimizer.lr == 1e-4 and isinstance(cfg.training.optimizer.lr, float)
    assert "training.optimizer.lr" not in cfg.defaults_applied


def test_unknown_key_names_path_line_and_closest(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("training:\n  batch_size: 8\n  optimizer:\n    weigth_decay: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "training.optimizer.weigth_decay (line 4): unknown key; did you mean 'training.optimizer.weight_decay'?" \
        in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("data,message", [
    ({"trainig": {"batch_size": 4}}, "trainig: unknown section; did you mean 'training'?"),
    ({"training": {"batch_size": "abc"}}, "training.batch_size: Input should be a valid integer"),
    ({"training": {"batch_size": 0}}, "training.batch_size: Input should be greater than 0"),
    ({"training": {"optimizer": {"name": "adamx"}}}, "training.optimizer.name: Input should be 'adamw', 'adam' or 'sgd'"),
    ({"epochs": 3}, "epochs: unknown top-level key with value 3"),
])
def test_bad_values(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(data)
    assert message in str(info.value)


def test_overrides() -> None:
    cfg = load_config({"training": {"batch_size": 8}}, overrides=["training.optimizer.lr=3e-4", "training.batch_size=4",
                                                                  "model.feature_dims=[16, 32]", "smoke=true"])
    assert cfg.training.optimizer.lr == 3e-4 and cfg.training.batch_size == 4
    assert cfg.model.model_extra["feature_dims"] == [16, 32]
    assert cfg.data.limit == 16 and cfg.training.max_steps == 10 and cfg.training.num_epochs == 1
    assert "data.limit=16 (smoke)" in cfg.defaults_applied
    explicit = load_config({"smoke": True, "data": {"limit": 3}})
    assert explicit.data.limit == 3
    for bad, message in (("lr", "not of the form dotted.key=value"), ("training..lr=1", "not of the form"),
                         ("training.optimizr.lr=1", "did you mean 'training.optimizer'")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides=[bad])
    with pytest.raises(ConfigError, match="is one string"):
        load_config(None, overrides="training.batch_size=4")  # type: ignore[arg-type]


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="holds a list at the top level"):
        load_config(bad)


class StrictModel(ModelConfig):
    model_config = ConfigDict(extra="forbid")
    feature_dims: int = 32
    num_blocks: int = 4


class ProjectConfig(ExperimentConfig):
    model: StrictModel = StrictModel()


def test_project_schema_validates_its_sections() -> None:
    cfg = load_config({"model": {"feature_dims": "64"}}, schema=ProjectConfig)
    assert cfg.model.feature_dims == 64 and cfg.model.num_blocks == 4
    assert "model.num_blocks" in cfg.defaults_applied
    with pytest.raises(ConfigError, match="model.feture_dims: unknown key; did you mean 'model.feature_dims'"):
        load_config({"model": {"feture_dims": 8}}, schema=ProjectConfig)


@settings(max_examples=80, deadline=None)
@given(configs(valid=True))
def test_any_valid_config_loads(case) -> None:
    cfg = load_config(case.data)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.training.batch_size >= 1 and isinstance(cfg.training.optimizer.lr, float)


@settings(max_examples=80, deadline=None)
@given(configs(valid=False))
def test_any_corrupted_config_is_rejected_at_its_key(case) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(case.data)
    assert case.key in str(info.value)


@settings(max_examples=30, deadline=None)
@given(configs(schema=ProjectConfig, valid=False))
def test_strategy_follows_a_project_schema(case) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(case.data, schema=ProjectConfig)
    assert case.key in str(info.value)


def test_check_config_findings(tmp_path: Path) -> None:
    risky = load_config({"training": {"batch_size": 80, "mixed_precision": "bf16"},
                         "model": {"feature_dims": 1024, "num_blocks": 12},
                         "data": {"root": str(tmp_path / "missing"), "ann_file": str(tmp_path / "nope.json")}})
    found = {(f.severity, f.key) for f in check_config(risky, device="cpu")}
    assert ("warning", "training.batch_size") in found and ("warning", "model") in found
    assert ("error", "data.root") in found and ("error", "data.ann_file") in found
    assert ("info", "training.mixed_precision") in found
    oom = load_config({"training": {"batch_size": 64}, "model": {"feature_dims": 64}, "data": {"image_size": 512}})
    (finding,) = [f for f in check_config(oom, device="cuda", device_memory_gib=24) if f.key == "training.batch_size"]
    assert "GiB of activations" in finding.message and "gradient_accumulation_steps" in finding.advice
    assert not [f for f in check_config(load_config({"training": {"mixed_precision": False}}), device="cpu")]
    ds = load_config({"training": {"deepspeed": {"enabled": True}}})
    if "deepspeed" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            assert any(f.key == "training.deepspeed.enabled" and f.severity == "error" for f in check_config(ds))


@pytest.mark.parametrize("world", [1, 2, 8])
def test_to_deepspeed_config(world: int) -> None:
    cfg = load_config({"training": {"batch_size": 6, "gradient_accumulation_steps": 3, "mixed_precision": "fp16",
                                    "deepspeed": {"enabled": True, "zero_stage": 3, "offload": True}}})
    ds = to_deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 1e-4
    sgd = to_deepspeed_config(load_config({"training": {"optimizer": {"name": "sgd"}}}), world)
    assert "optimizer" not in sgd and sgd["bf16"]["enabled"]
    with pytest.raises(ValueError, match="world_size=0"):
        to_deepspeed_config(cfg, 0)


def test_deepspeed_accepts_the_config_when_installed() -> None:
    ds_config = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed is not installed here")
    cfg = load_config({"training": {"batch_size": 4}})
    ds_config.DeepSpeedConfig(to_deepspeed_config(cfg, 1))


def test_dump_config_round_trip_and_main_rank_only(tmp_path: Path) -> None:
    cfg = load_config({"training": {"batch_size": 7}, "model": {"x": 1}})
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert path is not None and load_config(path).training.batch_size == 7
    assert not list((tmp_path / "run").glob(".*tmp*"))
    code = ("from ratlib.config_defaults import load_config, dump_config\n"
            f"print(dump_config(load_config(None), {str(tmp_path / 'other.yaml')!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "RANK": "1", "WORLD_SIZE": "2"})
    assert out.stdout.strip() == "None" and not (tmp_path / "other.yaml").exists()


def test_defaults_are_logged_once_on_the_main_rank() -> None:
    code = ("from ratlib.rank_logger import setup_logging\nfrom ratlib.config_defaults import load_config\n"
            "setup_logging()\nload_config({'training': {'batch_size': 4}})")
    for rank, expected in (("0", 1), ("1", 0)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "RANK": rank, "WORLD_SIZE": "2"})
        assert out.stderr.count("value(s) from defaults") == expected
