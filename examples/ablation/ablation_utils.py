"""The parts of the ablation driver that are not its flow: the study file, variant names, the results
file, what a failed run's logs say, and the summary. ``run.py`` beside this file is the flow; read that first.

Nothing here touches torch or a process group: the driver is one process that starts each run as its own job.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from ratlib import get_logger
from ratlib.io import append_jsonl as _append_line

log = get_logger("ablation")

EXAMPLES = Path(__file__).resolve().parents[1]  # examples/: `base: segmentation` is examples/segmentation/train.py
RESERVED = {"logs", "results.jsonl", "summary.md", "summary.png"}  # files of the study folder itself
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,=+-]*$")
NAME_MAX = 100


class StudyError(ValueError):
    """A problem with the study (its file, its variants, its folder): printed without a traceback."""


# ----------------------------------------------------------------------------------------------
# The study file


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # null: made from the overrides, e.g. "lr=0.001,num_blocks=2"
    overrides: dict[str, Any] = {}  # dotted keys (or nested sections) of the base example's config


class StudyConfig(BaseModel):
    """examples/ablation/ablation.yaml. Paths to files (``base``, ``config``) are relative to the study
    file; ``output_dir`` is relative to where you run."""

    model_config = ConfigDict(extra="forbid")
    name: str = "ablation"
    base: str = "segmentation"  # segmentation, detection, or a path to a train.py that follows the contract
    config: str | None = None  # the base example's config; null: config.yaml beside its train.py, if any
    output_dir: str = "runs/ablation"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cpu: the runs see no GPU (CUDA_VISIBLE_DEVICES=)
    launcher: Literal["auto", "torchrun", "srun"] = "auto"  # auto: srun inside a Slurm allocation, else torchrun
    nproc_per_node: int = Field(default=1, ge=1)  # torchrun's ranks per run; srun: the allocation's tasks
    parallel: int = Field(
        default=1, ge=1
    )  # torchrun: runs at once, each on its own GPUs (nproc_per_node of them) and port
    run_timeout_s: float | None = Field(
        default=None, gt=0
    )  # a run still going after this long is killed and recorded failed
    metric: str | None = None  # null: the metric of the example's EXAMPLE entry
    mode: Literal["max", "min"] | None = None  # null: the mode of the example's EXAMPLE entry
    seeds: list[int] | None = Field(
        default=None, min_length=1
    )  # each variant once per seed (training.seed); null: once
    include_base: bool = True  # run the base config itself as variant "base"
    overrides: dict[str, Any] = {}  # applied to every run, the base included
    grid: dict[str, Any] = {}  # dotted key -> list of values; every combination is a variant
    variants: list[VariantSpec] = []


STUDY_KEYS = tuple(StudyConfig.model_fields)


def flatten(d: Mapping[str, Any], prefix: str = "", *, stop_at_lists: bool = False) -> dict[str, Any]:
    """``{"training": {"optimizer": {"lr": 1}}}`` -> ``{"training.optimizer.lr": 1}``; dotted keys stay."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + ".", stop_at_lists=stop_at_lists))
        else:
            out[path] = value
    return out


def split_overrides(items: Sequence[str], config_keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """Command-line ``key=value`` items: those whose first key is a study key (``seeds=[0,1]``,
    ``output_dir=...``) change the study; those that name a section of the base config
    (``training.num_epochs=1``) apply to every run. Anything else is an error with the closest key."""
    study, runs, bad = [], [], []
    config_keys = set(config_keys)
    for item in items:
        first = item.partition("=")[0].strip().split(".")[0]
        if "=" not in item:
            bad.append(f"{item!r}: expected key=value, e.g. seeds=[0,1] or training.num_epochs=2")
        elif first in STUDY_KEYS:
            study.append(item)
        elif first in config_keys:
            runs.append(item)
        else:
            close = difflib.get_close_matches(first, [*STUDY_KEYS, *sorted(config_keys)], n=1)
            bad.append(
                f"{item!r}: {first!r} is neither a study key ({', '.join(STUDY_KEYS)}) nor a section of the "
                f"base config" + (f"; did you mean {close[0]!r}?" if close else "")
            )
    if bad:
        raise StudyError("command-line overrides:\n  " + "\n  ".join(bad))
    return study, runs


def smoke_common(
    study_overrides: dict[str, Any], cli_items: Sequence[str], smoke_keys: Iterable[str]
) -> tuple[dict[str, Any], list[str]]:
    """``smoke=true`` on the command line is a quick pass over every variant: the study's run-wide
    ``overrides`` of the keys smoke fills (``training.num_epochs: 10``, ...) would otherwise win over it
    (smoke only fills keys that are not set), so they are left out. Keys given on the command line stay.
    Returns the overrides to apply and the keys left out."""
    given = {item.partition("=")[0].strip(): item.partition("=")[2].strip() for item in cli_items}
    if "smoke" not in given or yaml.safe_load(given["smoke"] or "null") is not True:
        return study_overrides, []
    smoke_set = set(smoke_keys)
    dropped = [k for k in study_overrides if k in smoke_set and k not in given]
    return {k: v for k, v in study_overrides.items() if k not in dropped}, dropped


def resolve_input(path: str, study_file: Path | None) -> Path:
    """A file named in the study: relative to the study file's folder, else to the working folder."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if study_file is not None and (study_file.parent / p).exists():
        return study_file.parent / p
    return p


def example_path(base: str, study_file: Path | None) -> Path:
    """``segmentation`` / ``detection`` -> examples/<name>/train.py; anything else is a path to a train.py."""
    if "/" not in base and "\\" not in base and not base.endswith(".py"):
        path = EXAMPLES / base / "train.py"
        if not path.is_file():
            known = sorted(p.parent.name for p in EXAMPLES.glob("*/train.py"))
            raise StudyError(
                f"base={base!r}: no example of that name (known: {', '.join(known)}); or give the path "
                "to a train.py that follows the ablation contract (docs/examples/ablation.md)"
            )
        return path
    path = resolve_input(base, study_file)
    if not path.is_file():
        raise StudyError(
            f"base={base!r}: {path} does not exist (relative paths start at the study file's folder, "
            "then at the working folder)"
        )
    return path


# ----------------------------------------------------------------------------------------------
# Variants and their names


def format_value(value: Any) -> str:
    """A value as it appears in a name: 0.001, 3e-05, true, 16_32 (lists), null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(format_value(v) for v in value)
    if isinstance(value, Mapping):
        return "_".join(f"{k}-{format_value(v)}" for k, v in value.items())
    return str(value)


def short_keys(keys: Iterable[str]) -> dict[str, str]:
    """Each dotted key by its last part (``training.optimizer.lr`` -> ``lr``), or in full where two keys of
    the study share a last part."""
    keys = list(dict.fromkeys(keys))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def variant_name(overrides: Mapping[str, Any], shorts: Mapping[str, str]) -> str:
    """A readable, stable folder name: ``feature_dims=16,num_blocks=2``. Only the overrides decide it."""
    text = ",".join(f"{shorts.get(k, k)}={format_value(v)}" for k, v in overrides.items()) or "base"
    text = re.sub(r"[^A-Za-z0-9._,=+-]", "-", text)
    if len(text) > NAME_MAX:  # still stable: the tail is a hash of the whole
        text = text[: NAME_MAX - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


def json_value(value: Any) -> str:
    """A value as a ``load_config`` override (YAML): JSON is YAML, and quoting keeps strings strings."""
    return json.dumps(value)


@dataclass
class Run:
    """One training run of the study: a variant, with a seed when the study repeats over seeds."""

    index: int  # position in the study (0-based)
    run: str  # unique id: the variant's name, plus "/seed{S}" with seeds
    name: str  # the variant's name
    seed: int | None
    overrides: dict[str, Any]  # the variant's own overrides (not the study-wide ones)
    dir: str  # the run folder
    config_hash: str = ""
    resume: bool = False  # continue from the run folder's checkpoint (an interrupted run, --resume)

    def override_strings(self, common: Sequence[str]) -> list[str]:
        seed = [f"training.seed={self.seed}"] if self.seed is not None else []
        return [
            *common,
            *(f"{k}={json_value(v)}" for k, v in self.overrides.items()),
            *seed,
            f"output_dir={json_value(self.dir)}",
        ]


def expand_variants(study: StudyConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) of every variant: the base, the grid's combinations, then the explicit list."""
    grid = flatten(study.grid)
    problems = [
        f"grid.{k}: expected a non-empty list of values, got {v!r}"
        for k, v in grid.items()
        if not isinstance(v, list) or not v
    ]
    explicit = [flatten(v.overrides) for v in study.variants]
    shorts = short_keys([*grid, *(k for o in explicit for k in o)])
    out: list[tuple[str, dict[str, Any], str]] = []
    if study.include_base:
        out.append(("base", {}, "the base"))
    if grid and not problems:
        for values in itertools.product(*grid.values()):
            overrides = dict(zip(grid, values))
            out.append((variant_name(overrides, shorts), overrides, "grid"))
    for i, (spec, overrides) in enumerate(zip(study.variants, explicit)):
        if spec.name is not None and not NAME_OK.match(spec.name):
            problems.append(
                f"variants[{i}].name={spec.name!r}: use letters, digits and . _ , = + - (it is a "
                "folder name), starting with a letter or digit"
            )
        out.append((spec.name or variant_name(overrides, shorts), overrides, f"variants[{i}]"))
    seen: dict[str, str] = {}
    for name, overrides, where in out:
        for key in overrides:
            if key == "output_dir":
                problems.append(f"{where} ({name}): output_dir cannot vary: the driver sets it per run")
        if name in seen:
            problems.append(
                f"{where}: the name {name!r} is already used by {seen[name]}; give variants distinct names or overrides"
            )
        elif name.lower() in RESERVED:
            problems.append(f"{where}: the name {name!r} is reserved for the study's own files; choose another")
        seen.setdefault(name, where)
    if study.seeds and any("training.seed" in o for _, o, _ in out):
        problems.append("seeds is set, and a variant sets training.seed as well: use one of them")
    if len(set(study.seeds or [])) != len(study.seeds or []):
        problems.append(f"seeds={study.seeds}: a seed is given twice")
    if not out:
        problems.append("nothing to run: include_base is false and there is no grid and no variants")
    if problems:
        raise StudyError("invalid study:\n  " + "\n  ".join(problems))
    return [(name, overrides) for name, overrides, _ in out]


def make_runs(study: StudyConfig) -> list[Run]:
    """Every run of the study, in order, with its folder under ``output_dir``."""
    runs: list[Run] = []
    root = Path(study.output_dir)
    for name, overrides in expand_variants(study):
        for seed in study.seeds or [None]:
            run = name if seed is None else f"{name}/seed{seed}"
            runs.append(Run(len(runs), run, name, seed, overrides, str(root / run)))
    return runs


def config_hash(cfg: BaseModel) -> str:
    """A fingerprint of a run's resolved config (without output_dir and distributed), to tell on --resume
    whether a recorded run is the one the study file describes now."""
    data = cfg.model_dump(mode="json")
    data.pop("output_dir", None)
    data.pop("distributed", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# results.jsonl: one line per finished (or failed) run, appended by the main rank


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """One line of results.jsonl through ``ratlib.io.append_jsonl`` (one write, fsynced), NaN and infinities
    as null. A line cut short by a crash in an earlier launch is closed first, so this one starts on a line
    of its own."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "ab") as f:
                f.write(b"\n")
    _append_line(path, _finite(dict(record)))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a results file; a line that is not JSON (a write cut short) is skipped with a warning.
    Unlike ``ratlib.io.read_jsonl`` (which refuses a broken line that is not the last), a study's file may
    hold a cut-off line from each launch that was killed, and every whole line after it still counts."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (a write cut short by a crash?); skipped", path, number)
            continue
        if isinstance(record, dict) and "run" in record:
            records.append(record)
    return records


def latest_records(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each run (a retried run's new record replaces its failed one)."""
    return {r["run"]: dict(r) for r in records}


def _finite(value: Any) -> Any:
    """NaN and infinities as null: strict JSON readers (jq, JavaScript) refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# A run's metrics.jsonl (written by the example)


def read_metric_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch rows (the tracker's per-step rows, without "epoch", are left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "epoch" in row:
                rows.append(row)
    return rows


def best_row(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The epoch row with the best ``metric`` (the first of equals)."""
    scored = [r for r in rows if _number(r.get(metric))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return dict(pick(scored, key=lambda r: r[metric]))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numbers(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if _number(v)}


# ----------------------------------------------------------------------------------------------
# What a failed run left: which rank failed first, how, and its last lines


_TORCHRUN_ROOT = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
_SRUN_TASK = re.compile(r"srun: error: \S+: tasks? (\d+)[-\d,]*: (.+)")
_EXCEPTION = re.compile(r"^(?:\S+\s)?([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Fault)\w*): (.*)$")
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
_LAUNCHER_NOISE = ("torch.distributed.elastic", "ChildFailedError", "torchrun", "====", "srun: error")


def _tail(lines: Sequence[str], n: int = 8) -> list[str]:
    return [line.rstrip()[:300] for line in lines if line.strip()][-n:]


def _rank_log_error(run_dir: Path, rank: int | None) -> tuple[int | None, list[str]]:
    """The last ERROR/CRITICAL record of the failing rank's log (rank{R}.log), or of the first rank log that has
    one when the rank is unknown: its rank and lines (a traceback included)."""
    logs = sorted((run_dir / "logs").glob("rank*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if rank is not None:
        logs = [p for p in logs if p.stem == f"rank{rank}"]
    for path in logs:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        starts = [
            i for i, line in enumerate(lines) if _LOG_RECORD.match(line) and (" ERROR " in line or " CRITICAL " in line)
        ]
        if starts:
            first = starts[-1]
            end = next((j for j in range(first + 1, len(lines)) if _LOG_RECORD.match(lines[j])), len(lines))
            return int(re.sub(r"\D", "", path.stem)), lines[first:end]
    return rank, []


def _rank_output(run_dir: Path, text: str, rank: int | None) -> list[str]:
    """The failing rank's own stderr: torchrun's per-rank file (``--tee`` with ``--log-dir``), srun's lines
    labelled ``R: `` (``--label``); else the launch's output without the launcher's own report."""
    if rank is not None:
        files = list((run_dir / "logs" / "torchrun").glob(f"*/attempt_*/{rank}/stderr.log"))
        if files:
            newest = max(files, key=lambda p: p.stat().st_mtime)
            return newest.read_text(encoding="utf-8", errors="replace").splitlines()
        labelled = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith(f"{rank}: ")]
        if labelled:
            return labelled
    return [line for line in text.splitlines() if not any(noise in line for noise in _LAUNCHER_NOISE)]


def describe_failure(
    run_dir: str | Path, launch_log: str | Path, returncode: int | None, *, timed_out: float | None = None
) -> dict[str, Any]:
    """The ``error`` of a failed run's record: ``rank`` (the first to fail, when the launcher or a log names it),
    ``type``, ``message``, ``lines`` (the error's last lines), ``exit_code`` and ``log`` (the launch's output).

    The launcher names the first rank to fail (torchrun's "Root Cause" block, srun's "task N:" lines); that
    rank's own log (``run_dir/logs/rank{R}.log``) gives the exception; a rank killed by a signal or gone through
    ``os._exit`` has none, and the launch's last lines stand in.
    """
    try:
        text = Path(launch_log).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    rank, how = None, None
    root = _TORCHRUN_ROOT.search(text)
    task = _SRUN_TASK.search(text)
    if root:
        rank, code = int(root.group(1)), int(root.group(2))
        how = f"rank {rank} exited with code {code}" if code >= 0 else f"rank {rank} was killed by signal {-code}"
    elif task:
        rank, how = int(task.group(1)), f"task {task.group(1)}: {task.group(2).strip()}"
    rank, record = _rank_log_error(Path(run_dir), rank)
    own = _rank_output(Path(run_dir), text, rank)
    lines = _tail(record, 12) if record else _tail(own, 12)
    found = next((m for line in reversed(record or own) if (m := _EXCEPTION.match(line.strip()))), None)
    if timed_out is not None:
        kind, msg = "Timeout", f"still running after run_timeout_s={timed_out:g} s: killed (a hang?)"
    elif found:
        kind, msg = found.group(1).rsplit(".", 1)[-1], found.group(2)
    else:
        kind = "Exit"
        msg = how or (f"exit code {returncode}" if returncode is None or returncode >= 0 else f"signal {-returncode}")
    return {
        "rank": rank,
        "type": kind,
        "message": msg[:500],
        "how": how,
        "lines": lines,
        "exit_code": returncode,
        "log": str(launch_log),
    }


# ----------------------------------------------------------------------------------------------
# Summary: summary.md (a table) and summary.png (a chart)


@dataclass
class Row:
    name: str
    overrides: dict[str, Any]
    values: list[float] = field(default_factory=list)  # the main metric of each finished run (one per seed)
    best: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    planned: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)  # failed runs' records

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def summary_rows(records: Mapping[str, Mapping[str, Any]], runs: Sequence[Run], metric: str, mode: str) -> list[Row]:
    """One row per variant over its runs (seeds), sorted best first; variants with no finished run last."""
    rows: dict[str, Row] = {}
    for run in runs:
        row = rows.setdefault(run.name, Row(run.name, run.overrides))
        row.planned += 1
    for rec in records.values():
        row = rows.setdefault(rec["name"], Row(rec["name"], rec.get("overrides", {})))
        if rec.get("status") == "failed":
            row.failed.append(dict(rec))
            continue
        value = (rec.get("final") or {}).get(metric)
        if _number(value):
            row.values.append(float(value))
        best = (rec.get("best") or {}).get(metric)
        if _number(best):
            row.best.append(float(best))
        if _number(rec.get("wall_time_s")):
            row.times.append(float(rec["wall_time_s"]))
        if _number(rec.get("peak_memory_max_gib")):
            row.peaks.append(float(rec["peak_memory_max_gib"]))
    sign = -1 if mode == "max" else 1
    return sorted(rows.values(), key=lambda r: (r.mean is None, sign * r.mean if r.mean is not None else 0))


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _delta(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    diff = value - base
    rel = f" ({diff / abs(base):+.1%})" if base else ""
    return f"{diff:+.4f}{rel}"


def overrides_text(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "(base config)"


def summary_table(rows: Sequence[Row], metric: str, mode: str, base: str | None = "base") -> str:
    """The markdown table: variants sorted by the main metric, deltas against the base."""
    base_row = next((r for r in rows if r.name == base), None)
    base_mean = base_row.mean if base_row is not None else None
    seeds = any(r.planned > 1 or len(r.values) > 1 for r in rows)
    head = [
        "#",
        "variant",
        "overrides",
        metric + (" (mean ± sd)" if seeds else ""),
        "Δ vs base",
        f"best {metric}",
        "runs",
        "time (s)",
        "peak mem (GiB)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        value = _fmt(r.mean) + (f" ± {_fmt(r.sd)}" if r.sd is not None else "")
        if r.mean is None:
            value = "failed" if r.failed else "not run yet"
        name = f"**{r.name}**" if r.name == base else r.name
        done = f"{len(r.values)}/{max(r.planned, len(r.values) + len(r.failed))}"
        if r.failed:
            done += f" ({len(r.failed)} failed)"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(i) if r.mean is not None else "",
                    name,
                    overrides_text(r.overrides).replace("|", "\\|"),
                    value,
                    "" if r.name == base else _delta(r.mean, base_mean),
                    _fmt(max(r.best) if mode == "max" else min(r.best)) if r.best else "-",
                    done,
                    _fmt(statistics.fmean(r.times), 1) if r.times else "-",
                    _fmt(max(r.peaks), 2) if r.peaks else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def summary_markdown(
    rows: Sequence[Row], *, title: str, metric: str, mode: str, header: Sequence[str], base: str | None = "base"
) -> str:
    failures = [(r.name, rec) for r in rows for rec in r.failed]
    parts = [f"# Ablation: {title}", "", *header, "", summary_table(rows, metric, mode, base), ""]
    if failures:
        parts += ["## Failed runs", ""]
        for _name, rec in failures:
            err = rec.get("error") or {}
            rank = err.get("rank")
            parts.append(
                f"- `{rec['run']}`: rank {'?' if rank is None else rank}: {err.get('type', 'Error')}: "
                f"{err.get('message', '')}".rstrip()
                + (f" (output: `{err['log']}`)" if err.get("log") else "")
            )
        parts.append("")
    return "\n".join(parts)


def summary_png(
    rows: Sequence[Row], path: Path, *, title: str, metric: str, mode: str, base: str | None = "base"
) -> bool:
    """The main metric per variant, best on top: the mean (a dot), mean ± sd and each seed's value when the
    variants are repeated over seeds, the base's value as a dashed line. False without matplotlib (the
    ``plot`` extra). Points, not bars: the axis need not start at zero."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in rows if r.mean is not None]
    fig, ax = plt.subplots(figsize=(7.5, 1.3 + 0.38 * max(1, len(shown))))
    ys = list(range(len(shown)))[::-1]
    seeds = any(len(r.values) > 1 for r in shown)
    for y, r in zip(ys, shown):
        color = "tab:orange" if r.name == base else "tab:blue"
        if r.sd is not None:
            ax.errorbar(r.mean, y, xerr=r.sd, fmt="none", ecolor=color, capsize=4, linewidth=1.5)
        if len(r.values) > 1:
            ax.scatter(r.values, [y] * len(r.values), color="black", s=9, alpha=0.6, zorder=3)
        ax.scatter([r.mean], [y], color=color, s=48, zorder=4, edgecolors="white", linewidths=0.5)
        ax.annotate(
            f"{r.mean:.4f}",
            (r.mean, y),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=7,
            color="0.3",
        )
    base_row = next((r for r in shown if r.name == base), None)
    if base_row is not None:
        ax.axvline(base_row.mean, color="tab:orange", linestyle="--", linewidth=1, label=f"base {base_row.mean:.4f}")
        ax.legend(loc="best", fontsize=7, frameon=False)
    ax.set_yticks(ys, [r.name for r in shown], fontsize=8)
    ax.set_ylim(-0.7, len(shown) - 0.3)
    ax.set_xlabel(
        f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)"
        + ("; mean ± sd over seeds, small dots: each seed" if seeds else ""),
        fontsize=8,
    )
    failed = [r.name for r in rows if r.mean is None and r.failed]
    ax.set_title(
        f"{title}: {metric} per variant" + (f" ({len(failed)} failed, not shown)" if failed else ""), fontsize=10
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
