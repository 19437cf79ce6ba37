"""The error rule (DESIGN.md, "Style we follow"): every exception ratlib raises on purpose is a RatlibError that
also derives from the builtin it refines, and its message comes from ``ratlib.errors.message``.

Checked on ratlib's source with ``ast``, so a new ``raise ValueError(...)`` fails here, not in a review.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ratlib
from ratlib.errors import RatlibError

ROOT = Path(ratlib.__file__).parent

BUILTIN_EXCEPTIONS = {
    name
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, BaseException) and not name.startswith("_")
}

# (file relative to ratlib/, enclosing class.function, builtin): the places that must raise a builtin. Keep it short.
ALLOWED = {
    # PEP 562 module __getattr__ must raise AttributeError: hasattr(), getattr(default) and import rely on it.
    ("__init__.py", "__getattr__", "AttributeError"),
    ("config_defaults/__init__.py", "forward_moved", "AttributeError"),  # moved names, forwarded for one release
    ("config_defaults/training.py", "__getattr__", "AttributeError"),
    # the same protocol for a logger adapter forwarding unknown names to a custom logger class.
    ("rank_logger/__init__.py", "_CustomRankLogger.__getattr__", "AttributeError"),
    # SystemExit is how a command line ends with its exit code (python -m ratlib, ratlib.cli, the checkpoint CLI).
    ("__main__.py", "<module>", "SystemExit"),
    ("cli.py", "<module>", "SystemExit"),
    ("checkpoint/__main__.py", "<module>", "SystemExit"),
    # Preemption.exit() ends the process with the documented exit code after the checkpoint.
    ("preempt/agreement.py", "Preemption.exit", "SystemExit"),
}


def _raises(path: Path) -> list[tuple[str, str, int, ast.expr]]:
    """(enclosing qualified function, exception name, line, the raise's argument 0 or None) for every raise."""
    found: list[tuple[str, str, int, ast.expr]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                call = child.exc
                func = call.func if isinstance(call, ast.Call) else call
                name = func.id if isinstance(func, ast.Name) else ast.unparse(func)
                found.append((".".join(scope) or "<module>", name, child.lineno, call))
            visit(child, scope)

    visit(ast.parse(path.read_text(encoding="utf-8")), [])
    return found


def _sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_bare_builtin_exception_is_raised() -> None:
    bad = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for func, name, line, _ in _raises(path):
            if name in BUILTIN_EXCEPTIONS and (rel, func, name) not in ALLOWED:
                bad.append(f"ratlib/{rel}:{line} in {func}: raise {name}")
    assert not bad, (
        "raise a RatlibError subclass that also derives from the builtin (e.g. class FooError(RatlibError, "
        "ValueError)), with the message from ratlib.errors.message(); or, if the builtin is required, add it to "
        "ALLOWED with the reason:\n" + "\n".join(bad)
    )


def _is_text(node: ast.expr) -> bool:
    """A message written in place: a string, an f-string, a concatenation or a join of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _is_text(node.left) or _is_text(node.right)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("join", "format")


def test_ratlib_errors_are_worded_by_message() -> None:
    """A RatlibError raised with a literal or f-string message bypasses message(): one wording everywhere."""
    errors = {
        name
        for module in _modules()
        for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, RatlibError)
    }
    bad = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "config_defaults/run_folder.py":  # being moved by another change (see ALLOWED)
            continue
        for func, name, line, call in _raises(path):
            if name.split(".")[-1] in errors and isinstance(call, ast.Call) and call.args and _is_text(call.args[0]):
                bad.append(
                    f"ratlib/{rel}:{line} in {func}: {name}(<text>): use message(problem, got=, expected=, fix=)"
                )
    assert not bad, "\n".join(bad)


def _modules() -> list[object]:
    """Every ratlib module that imports in this environment (optional extras may be missing)."""
    found = []
    for info in pkgutil.walk_packages([str(ROOT)], prefix="ratlib."):
        if info.name.endswith("__main__"):
            continue
        try:
            found.append(importlib.import_module(info.name))
        except ImportError:
            continue
    return found


def test_every_ratlib_error_also_derives_from_the_builtin_it_refines() -> None:
    classes = {
        obj
        for module in _modules()
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, RatlibError) and obj is not RatlibError and obj.__module__.startswith("ratlib.")
    }
    expected = {
        "CocoSplitError": ValueError,
        "CocoSplitTypeError": TypeError,
        "CollectiveArgumentError": ValueError,
        "CollectiveTypeError": TypeError,
        "CheckpointArgumentError": ValueError,
        "DistInitArgumentError": ValueError,
        "HangInstallError": ValueError,
        "LogLevelError": ValueError,
        "MemoryReportError": ValueError,
        "MissingDependencyError": ImportError,
        "RankRunError": ValueError,
        "RankRunFailedError": AssertionError,
        "RankScriptNotFoundError": FileNotFoundError,
        "SlurmListError": ValueError,
        "StrategyArgumentError": ValueError,
        "SyntheticArgumentError": ValueError,
        "SyntheticOverwriteError": FileExistsError,
    }
    by_name = {cls.__name__: cls for cls in classes}
    for name, builtin in expected.items():
        if name in ("StrategyArgumentError",) and name not in by_name:
            pytest.importorskip("hypothesis")
        assert issubclass(by_name[name], builtin), f"{name} must stay a {builtin.__name__}: user code catches it so"
    for cls in classes:
        refined = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)]
        assert refined, f"{cls.__module__}.{cls.__name__} derives from no builtin exception besides Exception"


def test_ratlib_error_is_importable_from_ratlib_without_torch() -> None:
    code = (
        "import sys\n"
        "from ratlib import RatlibError\n"
        "import ratlib.errors\n"
        "assert RatlibError is ratlib.errors.RatlibError\n"
        "assert 'torch' not in sys.modules, 'from ratlib import RatlibError imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RatlibError" in ratlib.__all__ and "RatlibError" in dir(ratlib)
