"""`ratlib doctor`: configs, data paths, package layout; exit codes and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ratlib.doctor import missing_init_files
from ratlib.synthetic import make_coco_detection


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ratlib", "doctor", *args], capture_output=True, text=True)


def test_project_with_problems(tmp_path: Path) -> None:
    (tmp_path / "experiments" / "ablation").mkdir(parents=True)
    (tmp_path / "experiments" / "__init__.py").write_text("")
    (tmp_path / "experiments" / "ablation" / "run.py").write_text("x = 1\n")  # package folder without __init__
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "a.py").write_text("from . import b\n")  # relative import: meant as a package
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "plain.py").write_text("print(1)\n")  # a plain script folder: fine
    (tmp_path / "bad.yaml").write_text("training:\n  optimizer:\n    lr: 1e-4\n    weigth_decay: 0.1\n")
    (tmp_path / "big.yaml").write_text("training:\n  batch_size: 80\nmodel:\n  feature_dims: 1024\n  num_blocks: 12\n"
                                       "data:\n  root: /no/such/data\n")
    out = _doctor(str(tmp_path), "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    by_key = {(Path(f["path"]).name, f["key"], f["severity"]) for f in report["findings"]}
    assert ("ablation", "__init__.py", "error") in by_key and ("tools", "__init__.py", "error") in by_key
    assert not any(p == "scripts" for p, _, _ in by_key)
    assert ("bad.yaml", "config", "error") in by_key
    assert ("big.yaml", "training.batch_size", "warning") in by_key and ("big.yaml", "model", "warning") in by_key
    assert ("big.yaml", "data.root", "error") in by_key
    text = _doctor(str(tmp_path / "bad.yaml")).stdout
    assert "did you mean 'training.optimizer.weight_decay'" in text and "1 error(s)" in text


def test_clean_config_passes_and_strict_fails_on_warnings(tmp_path: Path) -> None:
    ok = tmp_path / "ok.yaml"
    ok.write_text("training:\n  batch_size: 8\n  mixed_precision: false\n")
    assert _doctor(str(ok)).returncode == 0
    warn = tmp_path / "warn.yaml"
    warn.write_text("training:\n  batch_size: 96\n  mixed_precision: false\n")
    assert _doctor(str(warn)).returncode == 0
    assert _doctor(str(warn), "--strict").returncode == 1
    assert _doctor(str(tmp_path / "missing.yaml")).returncode == 1


def test_coco_data_paths_are_resolved(tmp_path: Path) -> None:
    make_coco_detection(tmp_path / "coco", "val2017", num_images=2)
    cfg = tmp_path / "det.yaml"
    cfg.write_text(f"training:\n  mixed_precision: false\ndata:\n  root: {tmp_path / 'coco'}\n"
                   "  train_split: train2017\n  val_split: val\n")
    out = _doctor(str(cfg), "--json")
    findings = json.loads(out.stdout)["findings"]
    assert out.returncode == 1
    assert [f["key"] for f in findings if f["severity"] == "error"] == ["data.train_split"]


def test_missing_init_files_rules(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "m.py").write_text("")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "x.py").write_text("from . import y")
    assert missing_init_files(tmp_path) == [pkg / "sub"]
