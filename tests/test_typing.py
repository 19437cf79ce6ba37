"""ratlib ships py.typed, so users' type checkers read its hints. mypy (the settings in pyproject.toml, with
pydantic's plugin) must find nothing in ratlib/ or in a user's file (tests/typecheck/user_file.py), and the
user's file must also check with no settings and no plugin, as pyright and plain mypy read pydantic models.
The caches stay in .mypy_cache (git-ignored), shared with `make lint`: a warm run takes seconds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from suite_rules import require

ROOT = Path(__file__).resolve().parents[1]
USER_FILE = "tests/typecheck/user_file.py"


def _mypy(*args: str) -> tuple[int, str]:
    require("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True, text=True, timeout=540, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_ratlib_and_a_users_file_type_check() -> None:
    code, out = _mypy()  # files, plugin and strictness from [tool.mypy] in pyproject.toml
    assert code == 0, out
    assert "Success: no issues found" in out, out


def test_a_users_file_type_checks_without_the_pydantic_plugin(tmp_path: Path) -> None:
    # No settings: what a user's mypy without pydantic's plugin sees (pyright reads models the same way,
    # through dataclass_transform). Errors inside ratlib are not the user's and are not reported.
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n", encoding="utf-8")
    code, out = _mypy(
        "--config-file", str(config), "--follow-imports=silent", "--cache-dir", ".mypy_cache/no-plugin", USER_FILE
    )
    assert code == 0, out


def test_the_checker_catches_a_users_mistakes(tmp_path: Path) -> None:
    # The clean runs above mean something only if mistakes in a user's file are errors.
    program = textwrap.dedent(
        """
        from ratlib.config_defaults import TrainingConfig
        from ratlib.rank_logger import rank_zero_only

        TrainingConfig(batch_sise=8)
        TrainingConfig(batch_size="eight")

        @rank_zero_only
        def count() -> int:
            return 1

        total: int = count()
        """
    )
    mistakes = tmp_path / "mistakes.py"
    mistakes.write_text(program, encoding="utf-8")
    code, out = _mypy(str(mistakes))
    errors = [line for line in out.splitlines() if "mistakes.py:" in line and ": error:" in line]
    assert code == 1, out
    assert len(errors) == 3, out
    assert "batch_sise" in errors[0]
    assert "batch_size" in errors[1]
    assert '"int | None"' in errors[2]
