"""The docs cannot drift: every Python block a user would copy runs, every example command runs as a smoke run,
and every relative link resolves.

A block or command that cannot run as written has a marker right before its fence (or, for one shell line,
right before the fence of its block) with the reason: ``<!-- not-run: needs a GPU -->``. A page whose blocks
build on each other has ``<!-- run-together -->`` anywhere on it: its blocks run in order in one process. A
fragment that uses the reader's own names gets them from a hidden ``<!-- setup: code -->`` before its fence;
``<!-- slow; setup: ... -->`` marks a block that trains for a while as ``slow``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").glob("*/README.md")],
    key=lambda p: str(p),
)
EXAMPLE_PAGES = [
    ROOT / "README.md",
    *(p for p in PAGES if p.parent.name == "examples" or p.parent.parent.name == "examples"),
]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
# Hidden set-up a fragment needs (the reader's own names: a loader, a model, a file to load); ``REPO`` is the
# repository's folder. It runs before the block, in the same process.
SETUP = re.compile(r"<!--(?:\s*slow;)?\s*setup:\s*(.+?)\s*-->")
BLOCK_TIMEOUT = 120


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason from a not-run marker, None when it must run
    setup: str = ""  # the code of a setup marker
    slow: bool = False  # its marker starts with "slow;": it trains for a while

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, each with the not-run reason written on the line before its fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker, setup = NOT_RUN.search(before), SETUP.search(before)
        code = "\n".join(lines[start + 1 : j])
        found.append(
            Block(
                page,
                start + 1,
                m.group(1),
                code,
                marker and marker.group(1),
                setup.group(1) if setup else "",
                "<!-- slow;" in before,
            )
        )
        i = j + 1
    return found


def python_blocks() -> list[Block]:
    return [b for p in PAGES for b in blocks(p) if b.lang == "python"]


def run_python(code: str, cwd: Path, timeout: float = BLOCK_TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _together(page: Path) -> bool:
    return "<!-- run-together -->" in page.read_text(encoding="utf-8")


def _python_cases() -> list:
    cases = []
    for page in PAGES:
        page_blocks = [b for b in blocks(page) if b.lang == "python"]
        if not page_blocks:
            continue
        if _together(page):
            marks = [pytest.mark.slow] if any(b.slow for b in page_blocks) else []
            cases.append(pytest.param(page_blocks, id=str(page.relative_to(ROOT)), marks=marks))
        else:
            cases.extend(pytest.param([b], id=b.id, marks=[pytest.mark.slow] if b.slow else []) for b in page_blocks)
    return cases


@pytest.mark.parametrize("group", _python_cases())
def test_python_block_runs(group: list[Block], tmp_path: Path) -> None:
    """Each unmarked block runs in a fresh process in an empty folder (a run-together page: in order, in one)."""
    runnable = [b for b in group if b.not_run is None]
    if not runnable:
        pytest.skip("; ".join(f"{b.id}: {b.not_run}" for b in group))
    code = f"REPO = {str(ROOT)!r}\n" + "\n\n".join(f"{b.setup}\n{b.code}" for b in runnable)
    proc = run_python(code, tmp_path, timeout=600 if any(b.slow for b in runnable) else BLOCK_TIMEOUT)
    assert proc.returncode == 0, (
        f"{', '.join(b.id for b in runnable)} failed (rc {proc.returncode}); fix the docs, or mark the block "
        f"with <!-- not-run: why --> before its fence\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
        f"{proc.stderr[-3000:]}"
    )


def test_every_marker_gives_a_reason() -> None:
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if "not-run" in line:
                assert NOT_RUN.search(line), f"{page.relative_to(ROOT)}:{n}: a not-run marker needs a reason"


def test_the_python_blocks_are_found() -> None:
    """The parser sees the blocks (a broken fence rule would make every other test here pass vacuously)."""
    found = python_blocks()
    assert len(found) >= 40, len(found)
    assert sum(b.not_run is None for b in found) >= 10


# --- relative links -----------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def test_the_readme_install_list_names_every_extra() -> None:
    """Every extra of pyproject.toml has its ``pip install "ratlib[NAME]"`` line in the README."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([\w-]+)\s*=", section, flags=re.M)
    assert "plot" in extras, extras
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [e for e in extras if e != "tracking-test" and f'pip install "ratlib[{e}]"' not in readme]
    assert not missing, f"README.md's install list leaves out the extras {missing}"


# --- the example pages' shell commands, as smoke runs -------------------------------------------------------

COMMAND = re.compile(
    r"^\s*(?:\$\s*)?(?:[A-Z_]+=\S*\s+)*((?:python|torchrun|srun|mpirun|deepspeed)\s.*examples/\S+\.py.*)$"
)
# What makes a documented run a short one: the smoke switch, tiny limits, and outputs in a temp folder.
SMOKE = ["smoke=true", "training.max_steps=2"]
SMOKE_STUDY = [*SMOKE, "seeds=[0]"]  # a study: one seed of each variant is enough to show it runs
# Placeholders the pages use for the reader's own file, and the shipped file that stands in for it.
STAND_INS = {
    "my-study.yaml": "examples/ablation/ablation.yaml",
    "my.yaml": "examples/{example}/config.yaml",
}


def why_not_run(argv: list[str]) -> str | None:
    """The reason a documented command cannot run here as a smoke run, None when it can."""
    if argv[0] in ("srun", "mpirun"):
        return f"needs {argv[0]} on a cluster; tests/launchers runs the real launchers"
    for a in argv:
        if a.startswith("data.root=") and a != "data.root=null":
            return f"needs the real dataset ({a})"
    if "training.deepspeed.enabled=true" in argv:
        return "DeepSpeed builds its CPU op on first use (minutes); tests/launchers runs deepspeed"
    return None


@dataclass
class Command:
    page: Path
    line: int
    argv: list[str]
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _logical_lines(code: str) -> list[tuple[int, str]]:
    """The lines of a shell block with backslash continuations joined, each with the index of its first line."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for k, raw in enumerate(code.splitlines()):
        if not pending:
            first = k
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        out.append((first, pending + raw))
        pending = ""
    return out


def example_commands() -> list[Command]:
    """``python examples/...`` and ``torchrun ... examples/...`` lines of the shell blocks of the example pages.

    A line is marked with ``# not-run: why`` at its end, or its block with a not-run marker before the fence."""
    found = []
    for page in EXAMPLE_PAGES:
        for b in blocks(page):
            if b.lang not in ("bash", "sh", "console", "shell"):
                continue
            for k, raw in _logical_lines(b.code):
                m = COMMAND.match(raw)
                if not m:
                    continue
                text, _, comment = m.group(1).partition("#")
                reason = b.not_run
                if "not-run:" in comment:
                    reason = comment.split("not-run:", 1)[1].strip()
                argv = shlex.split(text)
                found.append(Command(page, b.line + 1 + k, argv, reason or why_not_run(argv)))
    return found


def smoke_argv(cmd: Command, out: Path) -> list[str]:
    """The documented command with ``smoke=true``, tiny limits and its outputs under ``out``."""
    argv = list(cmd.argv)
    venv_bin = Path(sys.executable).parent
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv = [str(venv_bin / "torchrun"), "--standalone", *[a for a in argv[1:] if a != "--standalone"]]
        if "--nproc_per_node" in argv:
            argv[argv.index("--nproc_per_node") + 1] = "2"
    script = next(a for a in argv if a.startswith("examples/"))
    example = script.split("/")[1]
    argv = [STAND_INS.get(a, a).format(example=example) for a in argv if not a.startswith("output_dir=")]
    argv = ["nproc_per_node=2" if a.startswith("nproc_per_node=") else a for a in argv]  # a study's ranks per run
    return [*argv, *(SMOKE_STUDY if example == "ablation" else SMOKE), f"output_dir={out}"]


def _distinct_commands() -> list[Command]:
    """One command per distinct smoke run (``--nproc_per_node 8`` and ``2`` become the same run)."""
    seen, out = set(), []
    for c in example_commands():
        key = tuple(smoke_argv(c, Path("OUT"))) if not c.not_run else c.id
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def test_the_example_commands_are_found() -> None:
    cmds = example_commands()
    assert len(cmds) >= 6, [c.id for c in cmds]
    assert any(c.argv[0] == "torchrun" for c in cmds)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _distinct_commands(), ids=lambda c: c.id)
def test_example_command_smoke_run(cmd: Command, tmp_path: Path) -> None:
    if cmd.not_run:
        pytest.skip(cmd.not_run)
    argv = smoke_argv(cmd, tmp_path / "out")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd.id}: {shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"


# --- docs/hangs.md: the command that dumps every torchrun worker's stacks spares the agent ---------------------

DUMP_TARGET = """
import sys, time
sys.path.insert(0, {root!r})
from ratlib import hang
from ratlib.rank_logger import setup_logging
setup_logging("INFO")
hang.install()
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_hangs_page_dump_command_reaches_the_workers_only(tmp_path: Path) -> None:
    """The documented loop, run on a 2-worker torchrun job: both workers dump, the agent keeps running."""
    text = (ROOT / "docs" / "hangs.md").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("for p in $(pgrep -f train.py)"))
    script = tmp_path / f"dump_target_{os.getpid()}.py"  # a unique name: signal no one else's train.py
    script.write_text(DUMP_TARGET.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    log = tmp_path / "out.log"
    with log.open("w") as out:
        agent = subprocess.Popen(
            [torchrun, "--standalone", "--nproc_per_node", "2", str(script)], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count("ready") < 2:
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        subprocess.run(["bash", "-c", line.replace("train.py", script.name)], check=False, timeout=30)
        deadline = time.monotonic() + 60
        while log.read_text().count("stack dump on SIGUSR2") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert log.read_text().count("stack dump on SIGUSR2") == 2, log.read_text()
        time.sleep(1)
        assert agent.poll() is None, f"the agent died (rc {agent.returncode})\n{log.read_text()}"
    finally:
        agent.terminate()
        agent.wait(timeout=60)


# --- the documentation site (mkdocs.yml; make docs builds it strictly) --------------------------------------


def _site_nav() -> list[str]:
    import yaml

    def paths(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in paths(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in paths(value)]
        return []

    return paths(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])


def test_the_site_nav_has_every_page_of_docs() -> None:
    nav = set(_site_nav())
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md") if "_hooks" not in p.parts}
    assert not pages - nav, f"pages of docs/ missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert {"index.md", "changelog.md"} <= nav  # the README and the CHANGELOG (docs/_hooks/ratlib_site.py)


def test_every_public_module_has_an_api_reference_page() -> None:
    """A module of ratlib whose name has no leading underscore is public: it gets a line in mkdocs.yml's API
    reference (its layer's section), which makes its page from the docstrings."""
    modules = set()
    for path in (ROOT / "ratlib").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if len(parts) > 1 and parts[-1] != "__main__" and not any(p.startswith("_") for p in parts):
            modules.add(".".join(parts))
    referenced = {p[len("reference/") : -len(".md")] for p in _site_nav() if p.startswith("reference/")}
    assert not modules - referenced, (
        f"modules without an API reference line in mkdocs.yml: {sorted(modules - referenced)}"
    )
    assert not referenced - modules, (
        f"API reference lines for modules that do not exist: {sorted(referenced - modules)}"
    )


def test_site_links_go_to_pages_or_to_the_repository() -> None:
    """The hook rewrites links written for GitHub: to the page a file becomes, else to the repository."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install 'ratlib[docs]'")
    import importlib.util

    spec = importlib.util.spec_from_file_location("ratlib_site", ROOT / "docs" / "_hooks" / "ratlib_site.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    config = {"repo_url": "https://github.com/ratlib/ratlib"}
    rewrite = hooks._rewrite
    assert rewrite("docs/comm.md#no-group", "README.md", "index.md", config) == "comm.md#no-group"
    assert rewrite("CHANGELOG.md", "README.md", "index.md", config) == "changelog.md"
    assert rewrite("../examples/detection/README.md", "docs/getting-started.md", "getting-started.md", config) == (
        "examples/detection-readme.md"
    )
    assert rewrite(
        "../../docs/examples/ablation.md", "examples/ablation/README.md", "examples/ablation-readme.md", config
    ) == ("ablation.md")
    assert rewrite("../tests/downstream/", "docs/testing.md", "testing.md", config) == (
        "https://github.com/ratlib/ratlib/tree/main/tests/downstream"
    )
    assert rewrite("https://example.org/x.md", "docs/comm.md", "comm.md", config) == "https://example.org/x.md"


def test_the_declared_oldest_torch_is_the_tested_one() -> None:
    """pyproject.toml's torch floor, its torchvision, ratlib.errors.OLDEST_TORCH and the README's table agree;
    .ci/oldest-torch installs the floor it reads from pyproject.toml."""
    from ratlib.errors import OLDEST_TORCH

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    torch_floor = re.search(r'"torch>=(\d+\.\d+)"', text).group(1)
    vision_floor = re.search(r'"torchvision>=(\d+\.\d+)"', text).group(1)
    assert torch_floor == OLDEST_TORCH
    assert vision_floor == f"0.{int(torch_floor.split('.')[1]) + 15}", (torch_floor, vision_floor)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"| torch | {torch_floor} |" in readme, "README.md's supported-versions table names another torch"
