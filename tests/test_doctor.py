"""`ratlib doctor`: configs, data paths, package layout, environment; exit codes, JSON and --fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ratlib.config_defaults import Finding, check_config, load_config
from ratlib.doctor import diagnose, fix_config, missing_init_files
from ratlib.synthetic import make_coco_detection

BAD = "# ablation: lr sweep\ntraining:\n  optimizer:\n    lr: 1e-4\n    weigth_decay: 0.1\n"
BIG = (
    "model:\n  feature_dims: 1024  # wide\n  num_blocks: 12\ntraining:\n  batch_size: 80\n"
    "  mixed_precision: false\ndata:\n  root: /no/such/data\n"
)
NO_TRAINING = (
    "# keep this comment\nmodel:\n  name: unet   # and this one\n  feature_dims: [16, 32]\noutput_dir: runs/x\n"
)


PROJ_CONFIG = """
from ratlib.config_defaults import ExperimentConfig, Finding, register_check


class Config(ExperimentConfig):
    pass


def size_rule(cfg, world_size):
    dims, blocks = cfg.model.model_extra.get("feature_dims", 0), cfg.model.model_extra.get("num_blocks", 0)
    if (max(dims) if isinstance(dims, list) else dims) > 512 or blocks > 8:
        return [Finding("warning", "model", "too big for plain data parallelism", "enable DeepSpeed ZeRO")]
    return []


register_check(size_rule, schema=Config)
"""


def _doctor(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ratlib", "doctor", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def _project(root: Path) -> Path:
    """A small project with every problem the doctor looks for, and things it must leave alone."""
    (root / "experiments" / "ablation").mkdir(parents=True)
    (root / "experiments" / "__init__.py").write_text("")
    (root / "experiments" / "ablation" / "run.py").write_text("x = 1\n")  # in a package, no __init__
    (root / "tools").mkdir()
    (root / "tools" / "a.py").write_text("from . import b\n")  # relative import: meant as a package
    (root / "lib" / "core").mkdir(parents=True)
    (root / "lib" / "core" / "util.py").write_text("")
    (root / "train.py").write_text("import os\nfrom lib.core import util\n")  # namespace package import
    (root / "scripts").mkdir()
    (root / "scripts" / "plain.py").write_text("import helper\n")  # a plain script folder: fine
    (root / "scripts" / "helper.py").write_text("")
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "x.py").write_text("from . import y\n")  # ignored
    (root / ".github" / "workflows").mkdir(parents=True)
    (root / ".github" / "workflows" / "ci.yml").write_text("on: push\n")  # hidden: ignored
    (root / "mkdocs.yml").write_text("site_name: x\n")  # YAML, but not a ratlib config: skipped
    (root / "configs").mkdir()
    (root / "configs" / "bad.yaml").write_text(BAD)
    (root / "configs" / "big.yaml").write_text(BIG)
    (root / "configs" / "no_training.yaml").write_text(NO_TRAINING)
    (root / "proj_config.py").write_text(PROJ_CONFIG)  # the project's schema, which registers its size rule
    return root


def test_fixture_project_findings_lines_and_exit_code(tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    out = _doctor(".", "--json", "--device", "cpu", "--schema", "proj_config:Config", cwd=root)
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    found = {(f["path"], f["line"], f["key"], f["severity"]) for f in report["findings"] if f["severity"] != "info"}
    assert found == {
        ("experiments/ablation", None, "__init__.py", "error"),
        ("tools", None, "__init__.py", "error"),
        ("lib", None, "__init__.py", "warning"),
        ("lib/core", None, "__init__.py", "warning"),
        ("configs/bad.yaml", 5, "training.optimizer.weigth_decay", "error"),
        ("configs/big.yaml", 5, "training.batch_size", "warning"),
        ("configs/big.yaml", 1, "model", "warning"),
        ("configs/big.yaml", 8, "data.root", "error"),
    }
    assert (report["errors"], report["warnings"]) == (4, 4)
    assert sorted(report["configs"]) == ["configs/bad.yaml", "configs/big.yaml", "configs/no_training.yaml"]
    assert report["skipped"] == ["mkdocs.yml"] and "no top-level key of Config" in report["skipped_why"]["mkdocs.yml"]
    why = {f["path"]: f["message"] for f in report["findings"] if f["key"] == "__init__.py"}
    assert "train.py line 2 imports it as 'lib.core'" in why["lib"] and "relative import" in why["tools"]
    assert report["environment"]["packages"]["pydantic"] and report["environment"]["launcher"]["name"] == "single"


def test_text_report_and_strict(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    out = _doctor(str(bad), "--device", "cpu")
    assert out.returncode == 1
    assert (
        f"{bad}:5: ERROR training.optimizer.weigth_decay: unknown key; did you mean "
        "'training.optimizer.weight_decay'? fix or delete the key"
    ) in out.stdout
    assert "checked 1 config(s): 1 error(s), 0 warning(s)" in out.stdout and "environment: python" in out.stdout
    ok = tmp_path / "ok.yaml"
    ok.write_text("training:\n  batch_size: 8\n  mixed_precision: false\n")
    assert _doctor(str(ok), "--device", "cpu").returncode == 0
    warn = tmp_path / "warn.yaml"
    warn.write_text("training:\n  batch_size: 96\n  mixed_precision: false\n")
    assert _doctor(str(warn), "--device", "cpu").returncode == 0
    assert _doctor(str(warn), "--device", "cpu", "--strict").returncode == 1
    missing = _doctor(str(tmp_path / "missing.yaml"), "--device", "cpu")
    assert missing.returncode == 1 and "missing.yaml: ERROR path: does not exist" in missing.stdout


def test_fix_appends_sections_keeps_comments_and_creates_init_files(tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    original = (root / "configs" / "no_training.yaml").read_text()
    out = _doctor(".", "--fix", "--device", "cpu", cwd=root)
    added = "added section(s) training, distributed, tracking, eval, checkpoint, data"
    assert f"fixed: configs/no_training.yaml: {added}" in out.stdout
    fixed = (root / "configs" / "no_training.yaml").read_text()
    assert fixed.startswith(original)  # comments, order and values kept: only appended
    assert "# keep this comment" in fixed and "# and this one" in fixed and "\ntraining:\n  num_epochs: 10\n" in fixed
    assert (root / "configs" / "no_training.yaml.bak").read_text() == original
    assert load_config(root / "configs" / "no_training.yaml") == load_config(
        {"model": {"name": "unet", "feature_dims": [16, 32]}, "output_dir": "runs/x"}
    )
    for folder in ("experiments/ablation", "tools", "lib", "lib/core"):
        assert (root / folder / "__init__.py").exists()
    assert not (root / "scripts" / "__init__.py").exists() and not (root / ".venv" / "lib" / "__init__.py").exists()
    assert (root / "configs" / "bad.yaml").read_text() == BAD  # broken: left alone, and said so
    assert "configs/bad.yaml: INFO --fix: not fixed" in out.stdout
    again = _doctor(".", "--fix", "--json", "--device", "cpu", cwd=root)
    report = json.loads(again.stdout)
    assert [c for c in report["changes"] if "bad.yaml" not in c] == []
    assert {f["path"] for f in report["findings"] if f["severity"] == "error"} == {
        "configs/bad.yaml",
        "configs/big.yaml",
    }


@pytest.mark.parametrize("indent", [2, 4])
def test_fix_fills_sections_missing_inside_the_users_sections(tmp_path: Path, indent: int) -> None:
    # `training:` without `scheduler:` and `deepspeed:`: they go at the end of the user's training block, at its
    # indentation, in schema order; every line the user wrote stays, in order; the config loads the same.
    pad = " " * indent
    original = (
        f"# my experiment\ntraining:\n{pad}num_epochs: 3   # short\n{pad}optimizer:\n{pad}{pad}lr: 1.0e-3\n"
        f"{pad}gradient_clip: 1.0\n\n# the model\nmodel:\n{pad}name: unet\noutput_dir: runs/x\n"
    )
    path = tmp_path / "exp.yaml"
    path.write_text(original)
    before = load_config(path)
    changes = fix_config(path)
    assert changes == [
        f"{path}: added section(s) distributed, tracking, eval, checkpoint, data, training.deepspeed, "
        "training.numerics, training.scheduler with "
        f"their defaults (backup: {path}.bak)"
    ]
    text = path.read_text()
    lines = text.splitlines()
    rest = iter(lines)
    assert all(any(line == mine for line in rest) for mine in original.splitlines())  # in order, untouched
    assert (
        lines.index(f"{pad}gradient_clip: 1.0")
        < lines.index(f"{pad}scheduler:")
        < lines.index(f"{pad}deepspeed:")
        < lines.index("# the model")
    )
    assert f"{pad}{pad}name: cosine" in lines and load_config(path) == before
    assert fix_config(path) == []  # a second run changes nothing


def test_coco_splits_world_size_and_yaml_errors(tmp_path: Path) -> None:
    make_coco_detection(tmp_path / "coco", "val2017", num_images=2)
    det = tmp_path / "det.yaml"
    det.write_text(
        f"training:\n  mixed_precision: false\ndata:\n  root: {tmp_path / 'coco'}\n"
        "  train_split: train2017\n  val_split: val\n"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("training:\n  batch_size: [1\n")
    out = _doctor(str(det), str(broken), "--json", "--device", "cpu", "--world-size", "8")
    findings = json.loads(out.stdout)["findings"]
    assert out.returncode == 1
    errors = [(Path(f["path"]).name, f["line"], f["key"]) for f in findings if f["severity"] == "error"]
    assert errors == [("det.yaml", 5, "data.train_split"), ("broken.yaml", None, "config")]
    assert f"{broken}:3:1: invalid YAML" in findings[-1]["message"]
    assert "global batch 384 = 48 per device x 1 accumulation x 8 rank(s)" in [
        f["message"] for f in findings if f["key"] == "training.batch_size"
    ]


def test_project_schema_and_bad_schema_argument(tmp_path: Path) -> None:
    (tmp_path / "myproj.py").write_text(
        "from pydantic import ConfigDict\nfrom ratlib.config_defaults import ExperimentConfig, ModelConfig\n"
        "class SegModel(ModelConfig):\n    model_config = ConfigDict(extra='forbid')\n    feature_dims: int = 32\n"
        "class SegConfig(ExperimentConfig):\n    model: SegModel = SegModel()\n"
    )
    (tmp_path / "seg.yaml").write_text("training:\n  mixed_precision: false\nmodel:\n  feature_dim: 64\n")
    assert _doctor("seg.yaml", "--device", "cpu", cwd=tmp_path).returncode == 0  # model passes through by default
    out = _doctor("seg.yaml", "--device", "cpu", "--schema", "myproj:SegConfig", cwd=tmp_path)
    assert (
        out.returncode == 1
        and "seg.yaml:4: ERROR model.feature_dim: unknown key; did you mean 'model.feature_dims'?" in out.stdout
    )
    bad = _doctor("seg.yaml", "--schema", "myproj:Nope", cwd=tmp_path)
    assert bad.returncode == 2 and "--schema 'myproj:Nope': cannot load it" in bad.stderr


def test_launcher_environment_errors_are_reported(tmp_path: Path) -> None:
    ok = tmp_path / "ok.yaml"
    ok.write_text("training:\n  mixed_precision: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "OMPI_", "PMI_"))}
    out = _doctor(str(ok), "--json", "--device", "cpu", env={**env, "RANK": "3", "WORLD_SIZE": "2"})
    report = json.loads(out.stdout)
    assert out.returncode == 1 and [f["key"] for f in report["findings"] if f["severity"] == "error"] == ["launcher"]
    assert "error" in report["environment"]["launcher"]


def test_missing_init_files_rules(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "m.py").write_text("")
    (tmp_path / "env1" / "lib").mkdir(parents=True)
    (tmp_path / "env1" / "pyvenv.cfg").write_text("home = /usr\n")  # a virtual environment by another name
    (tmp_path / "env1" / "lib" / "x.py").write_text("from . import y")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "s.py").write_text("import os.path\nfrom json import loads\n")
    assert missing_init_files(tmp_path) == [(pkg / "sub", "error", "it sits inside the package 'pkg'")]


def test_diagnose_in_process_detects_the_device(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  batch_size: 8\n")
    report = diagnose([str(cfg)])
    assert report.configs == [str(cfg)] and "cuda_available" in report.environment
    cuda = report.environment["cuda_available"]
    assert any(r.finding.key == "training.mixed_precision" for r in report.findings) is (not cuda)


def test_ablation_study_files_are_skipped_not_misread(tmp_path: Path) -> None:
    study = tmp_path / "ablation.yaml"
    study.write_text("base: segmentation\nseeds: [0, 1]\ngrid:\n  model.feature_dims: [8, 16]\n")
    (tmp_path / "exp.yaml").write_text("training:\n  lr: 1e-4\n")  # a real config with a misplaced key
    alone = _doctor(str(study))
    assert alone.returncode == 0 and "checked 0 config(s), skipped 1" in alone.stdout, alone.stdout
    assert f"skipped {study}: a study file" in alone.stdout and "no Python file beside it defines" in alone.stdout
    assert "WARNING configs: nothing checked" in alone.stdout
    assert _doctor(str(study), "--strict").returncode == 1
    folder = _doctor(str(tmp_path))
    assert folder.returncode == 1 and "checked 1 config(s), skipped 1" in folder.stdout, folder.stdout
    assert "training.lr" in folder.stdout and "ablation.yaml" not in folder.stdout.split("skipped")[0]


STUDY_RUNNER = """
from pydantic import BaseModel, ConfigDict


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = "segmentation"
    seeds: list[int] = [0]
    grid: dict = {}


STUDY_SCHEMA = Study
"""


def test_study_files_are_validated_with_the_schema_of_their_runner(tmp_path: Path) -> None:
    (tmp_path / "run.py").write_text(STUDY_RUNNER)
    study = tmp_path / "study.yaml"
    study.write_text("base: segmentation\nseeds: [0, 1]\ngrid:\n  model.feature_dims: [8, 16]\n")
    ok = _doctor(str(study), "--strict", "--device", "cpu")
    assert ok.returncode == 0 and "checked 1 config(s): 0 error(s), 0 warning(s)" in ok.stdout, ok.stdout
    assert f"study file {study}: validated with the runner's STUDY_SCHEMA (run.Study)" in ok.stdout
    study.write_text("base: segmentation\nseedz: [0, 1]\ngrid:\n  model.feature_dims: [8, 16]\n")
    bad = _doctor(str(study), "--device", "cpu")
    assert bad.returncode == 1 and f"{study}:2: ERROR seedz: unknown key; did you mean 'seeds'?" in bad.stdout
    (tmp_path / "run.py").write_text("import no_such_module_here\nSTUDY_SCHEMA = None\n")
    broken = _doctor(str(study), "--device", "cpu")
    assert "importing" in broken.stdout and "No module named 'no_such_module_here'" in broken.stdout, broken.stdout


def test_the_shipped_ablation_study_is_validated() -> None:
    root = Path(__file__).resolve().parents[1]
    out = _doctor(str(root / "examples" / "ablation" / "ablation.yaml"), "--strict", "--device", "cpu")
    assert out.returncode == 0 and "checked 1 config(s): 0 error(s)" in out.stdout, out.stdout + out.stderr


def test_nothing_checked_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = _doctor(str(tmp_path / "empty"), "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["warnings"] == 1 and report["configs"] == []
    assert [f["key"] for f in report["findings"]] == ["configs"]
    assert _doctor(str(tmp_path / "empty"), "--strict").returncode == 1


FAKE_EXAMPLE = """
from pydantic import ConfigDict
from ratlib.config_defaults import ExperimentConfig, Finding, ModelConfig


class Model(ModelConfig):
    model_config = ConfigDict(extra="forbid")
    feature_dims: int = 16
    num_blocks: int = 4
    norm: str = "batch"


class Config(ExperimentConfig):
    model: Model = Model()


def size_rule(cfg, world_size):
    if cfg.model.feature_dims > 512 or cfg.model.num_blocks > 8:
        return [Finding("warning", "model", f"feature_dims={cfg.model.feature_dims} is too big", "enable DeepSpeed")]
    return []


EXAMPLE = {"schema": Config, "metric": "dice", "mode": "max", "checks": (size_rule,)}
"""


def _wide_segmentation_config(folder: Path) -> Path:
    """The segmentation example's config with ``model.feature_dims: 1024``, in ``folder``."""
    text = (Path(__file__).resolve().parents[1] / "examples" / "segmentation" / "config.yaml").read_text()
    assert "  feature_dims: 8 " in text
    config = folder / "config.yaml"
    config.write_text(text.replace("  feature_dims: 8 ", "  feature_dims: 1024 "))
    return config


def test_a_config_is_checked_with_the_example_beside_it_without_schema(tmp_path: Path) -> None:
    config = _wide_segmentation_config(tmp_path)
    alone = _doctor(str(config), "--device", "cpu")  # no train.py beside it: the model section is not judged
    assert alone.returncode == 0 and "feature_dims=1024 is too big" not in alone.stdout, alone.stdout
    assert alone.stdout.count("INFO model: not checked (feature_dims, norm, num_blocks)") == 1, alone.stdout
    (tmp_path / "train.py").write_text(FAKE_EXAMPLE)
    out = _doctor(str(config), "--device", "cpu")
    assert "WARNING model: feature_dims=1024 is too big. enable DeepSpeed" in out.stdout, out.stdout + out.stderr
    assert f"config {config}: validated with the EXAMPLE of the train.py beside it (train.Config)" in out.stdout
    assert "not checked" not in out.stdout
    (tmp_path / "train.py").write_text(
        FAKE_EXAMPLE.replace("from pydantic", "import no_such_module_here\nfrom pydantic")
    )
    broken = _doctor(str(config), "--device", "cpu", "--json")
    report = json.loads(broken.stdout)
    infos = [f["message"] for f in report["findings"] if f["severity"] == "info" and f["key"] == "schema"]
    assert broken.returncode == 0 and len(infos) == 1 and "No module named 'no_such_module_here'" in infos[0], infos


def test_check_config_applies_extra_rules_after_the_built_in_ones() -> None:
    rule = lambda cfg, world_size: [Finding("warning", "model", f"world {world_size}", "none")]  # noqa: E731
    findings = check_config(load_config({}), world_size=2, device="cpu", checks=(rule,))
    assert findings[-1] == Finding("warning", "model", "world 2", "none")


def test_zz_the_segmentation_example_s_size_rule_applies_without_schema(tmp_path: Path) -> None:
    """Against the real examples/segmentation (train.py's EXAMPLE names its schema and size rule). Last in the file:
    it imports the example, and with it torch."""
    real = Path(__file__).resolve().parents[1] / "examples" / "segmentation"
    for name in ("train.py", "seg_utils.py"):
        (tmp_path / name).write_text((real / name).read_text())
    config = _wide_segmentation_config(tmp_path)
    out = _doctor(str(config), "--device", "cpu")
    assert "WARNING model: feature_dims=1024 and num_blocks=3 are past the size" in out.stdout, out.stdout + out.stderr
