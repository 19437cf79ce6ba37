"""Package layout: Python folders used as packages without an ``__init__.py``, and files that do not parse."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from ratlib.doctor.report import Report, _Severity

__all__ = ["missing_init_files"]

_SKIP = {
    ".git",
    ".venv",
    "venv",
    "env",
    "__pycache__",
    "node_modules",
    ".tox",
    ".nox",
    "build",
    "dist",
    "site-packages",
    ".eggs",
}
# ----------------------------------------------------------------------------------------------
# Package layout


def _walk(root: Path) -> list[tuple[Path, list[str]]]:
    """(folder, file names) under root, skipping hidden folders, virtual environments and build output."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _SKIP and not d.startswith(".") and not (Path(folder, d) / "pyvenv.cfg").exists()
        )
        out.append((Path(folder), sorted(files)))
    return out


def _imports(path: Path) -> tuple[list[tuple[str, int]], bool, str | None]:
    """(absolute module names imported with their lines, uses relative imports, syntax error or None)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), filename=str(path))
    except SyntaxError as exc:
        return [], False, f"line {exc.lineno}: {exc.msg}"
    names: list[tuple[str, int]] = []
    relative = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative = True
            elif node.module:
                names.append((node.module, node.lineno))
                names += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return names, relative, None


def missing_init_files(root: Path) -> list[tuple[Path, _Severity, str]]:
    """Folders of Python modules used as a package but lacking ``__init__.py``, as
    ``(folder, severity, why)``: inside a package (the parent has one) or holding modules with
    relative imports (errors: ``setuptools.find_packages`` leaves them out, ``from . import`` fails
    when run as a script); or imported by dotted name from another file (a warning: it works only
    as an implicit namespace package, which packaging tools and type checkers skip)."""
    root = Path(root)
    tree = _walk(root)
    modules = {folder: [f for f in files if f.endswith(".py")] for folder, files in tree}
    has_init = {folder for folder, files in tree if "__init__.py" in files}
    found: dict[Path, tuple[_Severity, str]] = {}
    for folder, py in modules.items():
        if not py or folder in has_init or folder == root:
            continue
        if folder.parent in has_init:
            found[folder] = ("error", f"it sits inside the package {folder.parent.name!r}")
            continue
        relative = [f for f in py if _imports(folder / f)[1]]
        if relative:
            found[folder] = ("error", f"{relative[0]} uses a relative import ('from . import ...')")
    for folder, py in modules.items():
        for name in py:
            imported, _, _ = _imports(folder / name)
            for module, line in imported:
                parts = module.split(".")
                for base in [folder, *folder.parents]:
                    for depth in range(1, len(parts)):
                        candidate = base.joinpath(*parts[:depth])
                        if (
                            candidate in modules
                            and candidate not in has_init
                            and candidate not in found
                            and (
                                candidate.joinpath(*parts[depth : depth + 1]).with_suffix(".py").exists()
                                or candidate.joinpath(parts[depth]).is_dir()
                            )
                        ):
                            rel = (folder / name).relative_to(root)
                            found[candidate] = (
                                "warning",
                                f"{rel} line {line} imports it as {'.'.join(parts[: depth + 1])!r}",
                            )
                    if base == root:
                        break
    return sorted((folder, sev, why) for folder, (sev, why) in found.items())


def _syntax_errors(root: Path, report: Report) -> None:
    for folder, files in _walk(root):
        for name in files:
            if name.endswith(".py"):
                error = _imports(folder / name)[2]
                if error:
                    report.add(
                        folder / name,
                        "warning",
                        "python",
                        f"cannot be parsed ({error})",
                        "fix the syntax; the package checks skipped this file",
                    )
