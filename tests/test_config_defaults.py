"""ratlib.config_defaults: defaults, YAML coercion, strict validation, overrides, smoke, checks,
memory estimates, the DeepSpeed bridge and dumping."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from pydantic import ConfigDict
from suite_rules import require

from ratlib.config_defaults import (
    ConfigError,
    ExperimentConfig,
    Finding,
    ModelConfig,
    check_config,
    dump_config,
    load_config,
    register_check,
    to_deepspeed_config,
    unregister_check,
)
from ratlib.memory import MemoryProbe
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


def test_smoke_on_the_command_line_wins_over_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, "training:\n  num_epochs: 10\n  max_steps: 160\ndata:\n  limit: 500\n")
    with caplog.at_level("INFO", logger="ratlib.config"):
        cfg = load_config(path, overrides=["smoke=true"])
    assert (cfg.data.limit, cfg.training.max_steps, cfg.training.num_epochs) == (16, 10, 1)
    assert sorted(cfg.smoke_applied) == ["data.limit", "training.max_steps", "training.num_epochs"]
    assert set(cfg.smoke_applied) <= set(cfg.defaults_applied)
    wins = [r.getMessage() for r in caplog.records if "smoke=true on the command line wins" in r.getMessage()]
    assert len(wins) == 1 and "training.num_epochs=10" in wins[0] and "data.limit=500" in wins[0], wins
    other = load_config(path, overrides=["smoke=true", "training.max_steps=3"])  # an explicit override still wins
    assert (other.training.max_steps, other.training.num_epochs, other.data.limit) == (3, 1, 16)
    in_file = load_config(_write(tmp_path, "smoke: true\ntraining:\n  num_epochs: 10\n", "f.yaml"))
    assert (in_file.training.num_epochs, in_file.training.max_steps, in_file.data.limit) == (10, 10, 16)
    off = load_config(path, overrides=["smoke=false"])
    assert (off.training.num_epochs, off.training.max_steps, off.data.limit) == (10, 160, 500)


def test_an_override_typo_names_the_override_not_a_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "output_dir: runs/x\ntraining:\n  batch_size: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=["training.optimzer.lr=1"])
    text = str(info.value)
    assert "training.optimzer (override 'training.optimzer.lr=1'): unknown key" in text, text
    assert "line 2" not in text
    for source in (None, {"training": {"batch_size": 8}}):
        with pytest.raises(ConfigError) as info:
            load_config(source, overrides=["trainig.max_steps=3"])
        assert "trainig (override 'trainig.max_steps=3'): unknown section" in str(info.value), str(info.value)
    with pytest.raises(ConfigError) as info:  # a key the file has keeps its line
        load_config(_write(tmp_path, "training:\n  optimzer:\n    lr: 1\n", "t.yaml"))
    assert "training.optimzer (line 2): unknown key" in str(info.value)


def test_cross_field_errors_come_with_field_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n  batch_size: yes\n  scheduler:\n    min_lr: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p, _ in info.value.problems] == ["training.batch_size", "training.scheduler.min_lr"]
    assert "training.scheduler.min_lr (line 4): got 1.0; the cosine schedule needs min_lr below" in str(info.value)
    betas = {"training": {"optimizer": {"betas": [0.9, "x"]}, "scheduler": {"min_lr": 1}}}  # a bad list item
    assert [p for p, _ in _problems(betas)] == ["training.optimizer.betas.1", "training.scheduler.min_lr"]
    # a bad key the rule reads: the rule is not judged on a default in its place
    assert [p for p, _ in _problems({"training": {"optimizer": {"lr": -1}, "scheduler": {"min_lr": 1e-3}}})] == [
        "training.optimizer.lr"
    ]
    # a project's model validator comes with field errors of other sections, not of its own
    from pydantic import BaseModel, model_validator

    class Sized(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = 8
        depth: int = 3

        @model_validator(mode="after")
        def _size(self) -> Sized:
            assert self.width * self.depth <= 100, "width x depth must stay <= 100"
            return self

    class Project(ExperimentConfig):
        model: Sized = Sized()

    assert sorted(p for p, _ in _problems({"model": {"width": 50}, "training": {"batch_size": 0}}, schema=Project)) == [
        "model",
        "training.batch_size",
    ]
    assert [p for p, _ in _problems({"model": {"width": 50, "depth": "x"}}, schema=Project)] == ["model.depth"]


class ProjectLoose(ExperimentConfig):
    """A project schema whose model section passes through (for registered checks)."""


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


def _size_rule(cfg: ExperimentConfig, world_size: int) -> list[Finding]:
    """The segmentation example's own size rule, registered by the example (the library has none)."""
    dims, blocks = cfg.model.model_extra.get("feature_dims"), cfg.model.model_extra.get("num_blocks")
    if ((dims or 0) > 512 or (blocks or 0) > 8) and not cfg.training.deepspeed.enabled:
        return [Finding("warning", "model", f"feature_dims={dims}, num_blocks={blocks}", "set zero_stage=2")]
    return []


def test_check_config_flags_the_old_failures(tmp_path: Path) -> None:
    risky = load_config(
        {
            "training": {"batch_size": 80, "mixed_precision": "bf16"},
            "model": {"feature_dims": 1024, "num_blocks": 12},
            "data": {"root": str(tmp_path / "missing"), "ann_file": str(tmp_path / "nope.json")},
        }
    )
    assert ("warning", "model") not in _keys(check_config(risky, world_size=4, device="cpu"))  # no example rule
    findings = check_config(risky, world_size=4, device="cpu", checks=[_size_rule])
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
    assert ("warning", "training.batch_size") in _keys(  # the default max_batch_size (64) warns about 80
        check_config(load_config({"training": {"batch_size": 80}}), device="cpu")
    )
    # The threshold is inclusive: a batch equal to max_batch_size fits, one above is flagged.
    at_limit = check_config(load_config({"training": {"batch_size": 80}}), max_batch_size=80, device="cpu")
    above = check_config(load_config({"training": {"batch_size": 81}}), max_batch_size=80, device="cpu")
    assert ("warning", "training.batch_size") not in _keys(at_limit) and ("warning", "training.batch_size") in _keys(
        above
    )
    assert ("warning", "training.batch_size") not in _keys(
        check_config(load_config({"training": {"batch_size": 80}}), max_batch_size=96, device="cpu")
    )


def test_registered_checks_run_for_their_schema_only() -> None:
    big = {"model": {"feature_dims": 1024, "num_blocks": 12}}
    register_check(_size_rule, schema=ProjectLoose)
    try:
        assert ("warning", "model") in _keys(check_config(load_config(big, schema=ProjectLoose), device="cpu"))
        assert ("warning", "model") not in _keys(check_config(load_config(big), device="cpu"))  # another schema
        register_check(_size_rule, schema=ProjectLoose)  # again: still one finding, not two
        found = check_config(load_config(big, schema=ProjectLoose), device="cpu")
        assert [f.key for f in found].count("model") == 1
    finally:
        unregister_check(_size_rule)
    assert ("warning", "model") not in _keys(check_config(load_config(big, schema=ProjectLoose), device="cpu"))
    everywhere = register_check(_size_rule)  # no schema: every config; returns the function (a decorator)
    try:
        assert everywhere is _size_rule and ("warning", "model") in _keys(check_config(load_config(big)))
    finally:
        unregister_check(_size_rule)


def test_a_check_registered_again_for_a_reloaded_schema_keeps_the_old_class_too() -> None:
    big = {"model": {"feature_dims": 1024, "num_blocks": 12}}
    Reloaded = type("ProjectLoose", (ExperimentConfig,), {})  # what importlib.reload of its module makes
    register_check(_size_rule, schema=ProjectLoose)
    register_check(_size_rule, schema=Reloaded)
    try:
        for schema in (ProjectLoose, Reloaded):
            found = check_config(load_config(big, schema=schema), device="cpu")
            assert [f.key for f in found].count("model") == 1, schema
    finally:
        unregister_check(_size_rule)
    assert ("warning", "model") not in _keys(check_config(load_config(big, schema=Reloaded), device="cpu"))


def test_check_config_findings_of_cpu_deepspeed_warmup_and_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # an import that fails, whatever is installed
    cfg = load_config(
        {
            "training": {
                "compile": True,
                "num_epochs": 2,
                "scheduler": {"warmup_epochs": 2},
                "deepspeed": {"enabled": True, "zero_stage": 0, "offload": True},
            },
            "data": {"num_workers": (os.cpu_count() or 1) + 1},
        }
    )
    found = {f.key: f for f in check_config(cfg, device="cpu")}
    assert found["training.compile"].severity == "info" and "CPU" in found["training.compile"].message
    assert found["training.deepspeed.enabled"].severity == "error"
    assert "not installed" in found["training.deepspeed.enabled"].message
    assert (
        found["training.deepspeed.offload"].severity == "warning"
        and "stage 1" in found["training.deepspeed.offload"].message
    )
    assert "warmup_epochs=2.0 is not below num_epochs=2" in found["training.scheduler.warmup_epochs"].message
    assert f"more than the {os.cpu_count()} CPUs" in found["data.num_workers"].message
    calm = load_config({"training": {"num_epochs": 3, "scheduler": {"warmup_epochs": 2}}, "data": {"num_workers": 0}})
    keys = {f.key for f in check_config(calm, device="cuda", device_memory_gib=80)}
    assert not keys & {
        "training.compile",
        "training.deepspeed.enabled",
        "training.scheduler.warmup_epochs",
        "data.num_workers",
    }


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
    ds_config = require("deepspeed.runtime.config")
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
    require("deepspeed")
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


AMBIGUOUS = [
    *("1e5", "1E5", "1e-4", "5e3", ".5", "-.5", "+.5E3", "+1", "-1", "0", "007", "1.", "1_000", "1:20"),
    *("0x10", "0o17", "0b101", ".inf", "-.Inf", "+.INF", ".nan", ".NaN", "inf", "nan", "Infinity"),
    *("yes", "Yes", "YES", "no", "No", "on", "On", "OFF", "off", "y", "Y", "n", "N", "true", "True", "FALSE"),
    *("tRuE", "nO", "null", "Null", "NULL", "~", "", "=", "<<"),
    *("2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5", "12:30:00"),
]


@pytest.mark.parametrize("text", AMBIGUOUS)
def test_dump_config_quotes_strings_that_look_like_something_else(tmp_path: Path, text: str) -> None:
    cfg = load_config({"output_dir": text, "model": {"name": text, "tags": [text]}, "extra": {text: 1}})
    path = dump_config(cfg, tmp_path / "config.yaml")
    back = load_config(path)
    assert back == cfg and back.output_dir == text and back.model.model_extra["name"] == text
    assert back.model.model_extra["tags"] == [text] and back.model_dump()["extra"] == {text: 1}
    assert yaml.safe_load(path.read_text())["output_dir"] == text  # other YAML readers agree


def test_dump_config_writes_plain_strings_unquoted(tmp_path: Path) -> None:
    path = dump_config(load_config({"output_dir": "runs/x1", "model": {"name": "unet"}}), tmp_path / "c.yaml")
    text = path.read_text()
    assert "output_dir: runs/x1\n" in text and "name: unet\n" in text and "output_dir: '1e5'" not in text
    assert "output_dir: '1e5'\n" in dump_config(load_config({"output_dir": "1e5"}), tmp_path / "d.yaml").read_text()


def test_dump_config_leaves_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("old\n")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        dump_config(load_config(None), target)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


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


def test_a_global_batch_leaves_accumulation_to_the_sampler_and_deepspeed_off() -> None:
    cfg = load_config({"training": {"global_batch_size": 64, "batch_size": 8}})
    assert cfg.training.global_batch_size == 64 and cfg.training.gradient_accumulation_steps == 1
    with pytest.raises(
        ConfigError, match=r"training.gradient_accumulation_steps: got 2; with training.global_batch_size=64"
    ):
        load_config({"training": {"global_batch_size": 64, "gradient_accumulation_steps": 2}})
    with pytest.raises(ConfigError, match="DeepSpeed needs the same micro-batch on every rank"):
        load_config({"training": {"global_batch_size": 64, "deepspeed": {"enabled": True}}})


def test_eval_and_checkpoint_sections_have_defaults_and_bounds() -> None:
    """``eval`` and ``checkpoint`` are ratlib's sections (the examples' loops read them): defaults, and a value
    out of range names the key."""
    cfg = load_config({})
    assert (cfg.eval.batch_size, cfg.eval.every_epochs, cfg.checkpoint.keep) == (None, 1, 3)
    cfg = load_config({"eval": {"batch_size": 8, "every_epochs": 2}, "checkpoint": {"keep": None}})
    assert (cfg.eval.batch_size, cfg.eval.every_epochs, cfg.checkpoint.keep) == (8, 2, None)
    with pytest.raises(ConfigError, match="checkpoint.keep"):
        load_config({"checkpoint": {"keep": 0}})
    with pytest.raises(ConfigError, match="every_epoch"):
        load_config({"eval": {"every_epoch": 2}})  # a typo: the closest key is named
