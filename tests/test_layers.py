"""ratlib's import graph: no circle (imports inside functions included) and every import points down the
layers of DESIGN.md ("Layout and layers"); `import ratlib` and the lowest layers never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ratlib"

# DESIGN.md, "Layout and layers", exactly: a module imports only from its own layer or below. A package's
# modules (ratlib/hang/watchdog.py, ratlib/coco_paths/cli.py, ...) take the layer of their top package.
LAYERS = {
    "errors": 1,
    "launch": 1,
    "rank_logger": 2,
    "io": 2,
    "dist_init": 3,
    "comm": 3,
    "data": 4,
    "checkpoint": 4,
    "memory": 4,
    "hang": 4,
    "preempt": 4,
    "numerics": 4,
    "tracking": 4,
    "coco_paths": 4,
    "config_defaults": 5,
    "strategy": 5,
    "synthetic": 5,
    "doctor": 6,
    "cli": 6,
    "testing": 6,
    "script": 6,  # the command-line entry of a training script (config, logging, group, outcome)
    "__main__": 6,  # `python -m ratlib`: the cli's entry point
}
TOP = 7  # the package itself (ratlib/__init__.py: public names, and the wiring of hooks)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} has no layer: add it to LAYERS here and to DESIGN.md")
    return LAYERS[parts[1]]


def _imports(module: str, path: Path, known: set[str]) -> set[tuple[str, int]]:
    """(imported ratlib module, line) for every import in the file: top level, inside functions, relative,
    absolute, and importlib.import_module("ratlib.x") with a constant name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[tuple[str, int]] = set()

    def add(name: str, line: int) -> None:
        if name == "ratlib" or name.startswith("ratlib."):
            found.add((name, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from ratlib import comm` imports the module ratlib.comm
                sub = f"{target}.{alias.name}"
                add(sub if sub in known else target, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value, node.lineno)
    return found


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in _imports(module, path, known):
            if target not in known:  # `from ratlib import __version__` is an edge to the top (layer TOP): upward
                raise AssertionError(f"{path}:{line} imports {target}, which does not exist")
            if target != module:
                edges[target] = line
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle, as a list of modules from a module back to itself, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = (
        "from . import comm\nfrom .launch import rank_state\nimport ratlib.io\n"
        "def f():\n    from ratlib.hang import install\n    import importlib\n"
        "    importlib.import_module('ratlib.errors')\n"
    )
    tree_file = tmp_path / "rank_logger.py"  # read as ratlib.rank_logger: only its package matters here
    tree_file.write_text(source)
    known = set(_modules())
    got = {name for name, _ in _imports("ratlib.rank_logger", tree_file, known)}
    assert got == {"ratlib.comm", "ratlib.launch", "ratlib.io", "ratlib.hang", "ratlib.errors"}, got


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) is None


def test_no_import_circle_lazy_imports_included() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_imports_point_down_the_layers() -> None:
    modules = _modules()
    upward = [
        f"{modules[module]}:{line}: {module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, edges in _graph().items()
        for target, line in edges.items()
        if _layer(target) > _layer(module)
    ]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def _hidden_lookups(path: Path) -> list[tuple[str, int]]:
    """(ratlib module, line) for every reach through ``sys.modules`` (``sys.modules["ratlib.x"]``,
    ``.get("ratlib.x")``, ``"ratlib.x" in sys.modules``): imports the graph above cannot see."""

    def is_modules(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "modules"

    def name(node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = str(node.values[0].value)
        else:
            return None
        return text if text == "ratlib" or text.startswith("ratlib.") else None

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        key = None
        if isinstance(node, ast.Subscript) and is_modules(node.value):
            key = name(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_modules(node.func.value):
            key = name(node.args[0]) if node.args else None
        elif isinstance(node, ast.Compare) and any(is_modules(c) for c in node.comparators):
            key = name(node.left)
        if key is not None:
            found.append((key, node.lineno))
    return found


def test_the_hidden_import_finder_sees_each_form(tmp_path: Path) -> None:
    source = (
        "import sys\na = sys.modules.get('ratlib.preempt')\nb = sys.modules['ratlib.hang']\n"
        "c = 'ratlib.comm' in sys.modules\nd = sys.modules.get('torch.distributed')\n"
        "e = sys.modules.get(f'ratlib.{x}')\n"
    )
    (tmp_path / "m.py").write_text(source)
    assert _hidden_lookups(tmp_path / "m.py") == [
        ("ratlib.preempt", 2),
        ("ratlib.hang", 3),
        ("ratlib.comm", 4),
        ("ratlib.", 6),
    ]


def test_no_module_reaches_another_through_sys_modules() -> None:
    hidden = [
        f"{path}:{line}: sys.modules lookup of {name}"
        for path in _modules().values()
        for name, line in _hidden_lookups(path)
    ]
    assert not hidden, "use an import, or a hook the other module registers (DESIGN.md):\n" + "\n".join(hidden)


def test_a_package_s_modules_take_the_layer_of_their_top_package() -> None:
    assert _layer("ratlib.hang.watchdog") == LAYERS["hang"] == 4
    assert _layer("ratlib.coco_paths.cli") == LAYERS["coco_paths"] and _layer("ratlib.cli") == 6
    assert _layer("ratlib") == TOP
    packages = {m.split(".")[1] for m in _modules() if m.count(".") >= 2}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_no_module_imports_from_the_package_top() -> None:
    top = [
        f"{_modules()[m]}:{line}: {m}" for m, edges in _graph().items() for t, line in edges.items() if t == "ratlib"
    ]
    assert not top, "imports from `ratlib` (the package top) inside ratlib; import the defining module:\n" + "\n".join(
        top
    )


# a module with no layer fails test_imports_point_down_the_layers, not the collection of this file
LOW = sorted(m for m in _modules() if m != "ratlib" and LAYERS.get(m.split(".")[1], TOP) <= 2) + ["ratlib"]


@pytest.mark.parametrize("module", LOW)
def test_importing_does_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", (out.stdout, out.stderr)
