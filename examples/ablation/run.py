"""Ablation studies over an example's config: a driver that starts each run as its own job.

    python examples/ablation/run.py --config examples/ablation/ablation.yaml nproc_per_node=2
    python examples/ablation/run.py --config ... seeds=[0,1,2] training.num_epochs=4   # study keys, run-wide keys
    python examples/ablation/run.py --config ... --resume                # after a crash or a stop: what is left
    python examples/ablation/run.py --config ... --resume --retry-failed
    python examples/ablation/run.py --config ... --dry-run               # validate every run, print the plan
    sbatch --nodes 2 --ntasks-per-node 2 --wrap "python examples/ablation/run.py --config ..."  # srun steps

The study file (ablation.yaml) names a base example (segmentation, detection, or a path to a train.py),
variants as a grid over dotted config keys and/or an explicit list, and optionally seeds. This driver is one
process with no process group: it names every run and its folder and validates every run's config with
``load_config`` before the first one starts, then starts each run as its own launch of the example's
train.py: ``torchrun --standalone --nproc_per_node N`` on a machine, or one ``srun`` step over the
allocation's tasks inside a Slurm job. A run's outcome comes from its exit code and its folder (the
example writes outcome.json when it finishes or stops): the driver appends one line to results.jsonl
(fsynced) and refreshes summary.md and summary.png.

A run that raises, is killed, hangs past ``run_timeout_s`` or dies with a fatal (CUDA-style) error is
recorded as failed, with the first rank to fail, its last lines and the log path, and the next run starts
in fresh processes: nothing of a failed run (its CUDA context, its communicator) outlives it. A SIGTERM or
SIGUSR1 to the driver is passed to the running run(s), which stop at one step with their checkpoint; the
driver records nothing for them and exits 75 (and requeues its Slurm job); ``--resume`` continues them from
their checkpoints (docs/examples/ablation.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ratlib import ConfigError, get_logger, get_world_size, load_config, setup_logging
from ratlib.config_defaults import SMOKE_DEFAULTS
from ratlib.io import write_atomic
from ratlib.preempt import PREEMPT_EXIT_CODE, requeue_slurm_job
from ratlib.tracking import OUTCOME_FILE, read_outcome

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ablation_utils.py sits beside this file
import ablation_utils as au  # noqa: E402
from ablation_utils import StudyError  # noqa: E402

STUDY_SCHEMA = au.StudyConfig  # `ratlib doctor ablation.yaml` validates study files with it

log = get_logger("ablation")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
KILL_GRACE_S = 40.0  # torchrun gives its workers 30 s after a SIGTERM before it kills them


# ----------------------------------------------------------------------------------------------
# The base example: examples/<name>/train.py, imported by path


_EXAMPLES: dict[Path, Example] = {}


@dataclass(frozen=True)
class Example:
    """The base example's one entry, ``EXAMPLE = {"schema": ..., "metric": ..., "mode": ...}`` in its train.py:
    its config schema (an ExperimentConfig subclass, to validate every run before any starts), the main metric
    and "max" or "min". The driver imports train.py for that entry only; each run runs it as a script."""

    schema: Any
    metric: str
    mode: str = "max"


def load_example(path: Path) -> Example:
    """Import an example's train.py (its folder first on sys.path: it may import a sibling module) and read
    its ``EXAMPLE`` entry."""
    path = path.resolve()
    if path in _EXAMPLES:
        return _EXAMPLES[path]
    sys.path.insert(0, str(path.parent))
    name = f"ablation_base_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:  # a missing extra, most often: the message says which
        del sys.modules[name]
        raise StudyError(
            f"base={path}: importing it failed: {exc} (the detection example needs "
            "'ratlib[detection]', segmentation 'ratlib[medical]')"
        ) from exc
    entry = getattr(module, "EXAMPLE", None)
    missing = [k for k in ("schema", "metric") if not isinstance(entry, dict) or k not in entry]
    if missing or entry.get("mode", "max") not in ("max", "min"):
        raise StudyError(
            f"{path} does not follow the ablation contract: its EXAMPLE entry "
            + (f"lacks {', '.join(repr(k) for k in missing)}" if missing else f"has mode={entry.get('mode')!r}")
            + '. An example needs EXAMPLE = {"schema": <its ExperimentConfig subclass>, "metric": "<main '
            'metric>", "mode": "max" or "min"}, and runs as `train.py --config FILE key=value ... [--resume]`, '
            "writing output_dir/outcome.json (ratlib.tracking.write_outcome) when it finishes or stops"
        )
    example = Example(**{k: v for k, v in entry.items() if k in ("schema", "metric", "mode")})
    _EXAMPLES[path] = example
    return example


@contextlib.contextmanager
def quiet(name: str = "ratlib.config") -> Iterator[None]:
    """load_config logs the keys it took from defaults on every call: once per study is enough."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


# ----------------------------------------------------------------------------------------------
# The study: read, every run validated, and planned, before anything starts


@dataclass
class Study:
    """The study file and the base example."""

    cfg: au.StudyConfig
    file: Path
    example_path: Path
    example: Example
    config: str | None  # the base example's config file
    common: list[str]  # run-wide overrides: the study's `overrides` and the command line's config keys
    base_cfg: Any  # the base config with the run-wide overrides
    runs: list[au.Run] = field(default_factory=list)  # every run, validated (validate_runs)


def read_study(config: str, overrides: Sequence[str]) -> Study:
    study_items = [o for o in overrides if o.partition("=")[0].strip().split(".")[0] in au.STUDY_KEYS]
    with quiet():
        cfg = load_config(config, overrides=study_items, schema=au.StudyConfig)
    file = Path(config)
    path = au.example_path(cfg.base, file)
    example = load_example(path)
    _, run_items = au.split_overrides(overrides, example.schema.model_fields)
    base_config = cfg.config
    if base_config is None:
        beside = path.parent / "config.yaml"
        base_config = str(beside) if beside.is_file() else None
    else:
        base_config = str(au.resolve_input(base_config, file))
    flat = au.flatten(cfg.overrides)
    study_overrides, dropped = au.smoke_common(flat, run_items, SMOKE_DEFAULTS)
    if dropped:
        log.info(
            "smoke=true: leaving out the study's %s (smoke sets these keys)",
            ", ".join(f"{k}={au.json_value(flat[k])}" for k in dropped),
        )
    common = [f"{k}={au.json_value(v)}" for k, v in study_overrides.items()] + run_items
    with quiet():
        base_cfg = load_config(base_config, overrides=common, schema=example.schema)
    return Study(cfg, file, path, example, base_config, common, base_cfg)


@dataclass
class Plan:
    """Names, folders, which runs to train."""

    name: str
    example: str
    config: str | None
    common: list[str]
    metric: str
    mode: str
    output_dir: str
    runs: list[au.Run]
    todo: list[int]  # indices into runs
    parallel: int = 1  # runs at once
    run_timeout_s: float | None = None  # a run's deadline

    @property
    def results(self) -> Path:
        return Path(self.output_dir) / "results.jsonl"


def validate_runs(study: Study) -> list[au.Run]:
    """Every run of the study, each config loaded with load_config: all problems in one error, before anything
    trains."""
    runs = au.make_runs(study.cfg)
    problems = []
    with quiet():
        for run in runs:
            try:
                cfg = load_config(
                    study.config, overrides=run.override_strings(study.common), schema=study.example.schema
                )
                run.config_hash = au.config_hash(cfg)
            except ConfigError as exc:
                problems.append(
                    f"run {run.run} ({au.overrides_text(run.overrides)}):\n    " + str(exc).replace("\n", "\n    ")
                )
    if problems:
        raise StudyError(
            f"{len(problems)} of {len(runs)} runs have an invalid config; nothing was trained:\n  "
            + "\n  ".join(problems)
        )
    same: dict[str, list[str]] = {}
    for run in runs:
        same.setdefault(run.config_hash, []).append(run.run)
    for names in same.values():
        if len(names) > 1:
            log.warning(
                "runs %s have the same config: they train the same thing (a grid value equal to the base's?)",
                ", ".join(names),
            )
    return runs


def make_plan(study: Study, *, resume: bool, retry_failed: bool, dry: bool = False) -> Plan:
    """Every run's name and folder, and with --resume which runs are left. ``dry``: change nothing on disk."""
    s = study.cfg
    runs = copy.deepcopy(study.runs) if study.runs else validate_runs(study)
    metric = s.metric or study.example.metric
    mode = s.mode or study.example.mode
    plan = Plan(
        s.name,
        str(study.example_path),
        study.config,
        study.common,
        metric,
        mode,
        s.output_dir,
        runs,
        [r.index for r in runs],
        s.parallel,
        s.run_timeout_s,
    )
    records = au.latest_records(au.read_jsonl(plan.results))
    existing = [r.run for r in runs if Path(r.dir).exists()]
    if not resume and (records or existing) and dry:
        log.warning("%s already holds a study: a real run needs --resume; showing what --resume would do", s.output_dir)
        resume = True
    if not resume:
        if records or existing:
            raise StudyError(
                f"{s.output_dir} already holds a study ({len(records)} recorded runs, "
                f"{len(existing)} run folders): pass --resume to continue it (and --retry-failed to "
                "run failed runs again), or choose another output_dir"
            )
        return plan
    changed = [
        f"{r.run} (recorded {records[r.run].get('config_hash')}, now {r.config_hash})"
        for r in runs
        if r.run in records and records[r.run].get("config_hash") != r.config_hash
    ]
    if changed:
        raise StudyError(
            f"--resume: the config of {len(changed)} recorded run(s) differs from the study file now: "
            f"{', '.join(changed)}. Put the study file back as it was, or start a new output_dir"
        )
    todo, done, failed = [], [], []
    for run in runs:
        status = records.get(run.run, {}).get("status")
        if status == "finished":
            done.append(run.run)
        elif status == "failed" and not retry_failed:
            failed.append(run.run)
        else:
            if status == "failed" and Path(run.dir).exists():  # a clean folder for the new attempt
                aside = _free_name(Path(run.dir), ".failed")
                if not dry:
                    Path(run.dir).rename(aside)
                log.info(
                    "--retry-failed: %s the failed attempt of %s to %s",
                    "would move" if dry else "moved",
                    run.run,
                    aside,
                )
            else:
                run.resume = Path(run.dir).exists()  # interrupted: continue from its checkpoint
            todo.append(run.index)
    plan.todo = todo
    log.info(
        "--resume: %d of %d runs recorded as finished%s; %d to run%s",
        len(done),
        len(runs),
        f", {len(failed)} failed and not retried (--retry-failed runs them): {', '.join(failed)}" if failed else "",
        len(todo),
        f" ({sum(runs[i].resume for i in todo)} continue from their checkpoint)" if todo else "",
    )
    return plan


def _free_name(path: Path, suffix: str) -> Path:
    k = 1
    while path.with_name(f"{path.name}{suffix}{k}").exists():
        k += 1
    return path.with_name(f"{path.name}{suffix}{k}")


# ----------------------------------------------------------------------------------------------
# Starting runs: torchrun on a machine, srun steps inside a Slurm allocation


def launched_as_a_rank() -> bool:
    """Whether this process is one rank of a launch (torchrun, an srun step, mpirun) instead of a shell. In an
    sbatch script or salloc shell SLURM_NTASKS describes the allocation, not this process."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and not env.get("SLURM_STEP_ID") and "LOCAL_RANK" not in env:
        return False
    return get_world_size() > 1


def pick_launcher(choice: str) -> str:
    """``auto``: srun inside a Slurm allocation (an sbatch script or salloc shell, not inside a step), else
    torchrun."""
    if choice != "auto":
        return choice
    inside = os.environ.get("SLURM_JOB_ID") and not os.environ.get("SLURM_STEP_ID") and shutil.which("srun")
    return "srun" if inside else "torchrun"


def run_command(plan: Plan, run: au.Run, launcher: str, nproc: int) -> list[str]:
    """The command of one run: the example's train.py, as a script, under the launcher."""
    script = [plan.example, *(["--config", plan.config] if plan.config else []), *run.override_strings(plan.common)]
    if run.resume:
        script.append("--resume")
    if launcher == "srun":
        # the allocation's tasks; --kill-on-bad-exit: a rank that dies ends the step instead of leaving the others
        # in a collective until the group's timeout; --label: each line names its rank (for a failure's lines)
        return ["srun", "--kill-on-bad-exit=1", "--label", sys.executable, *script]
    # --tee with --log-dir: each rank's stdout and stderr also go to a file of its own (a failure's lines)
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "--max-restarts=0", "--tee=3", f"--log-dir={Path(run.dir) / 'logs' / 'torchrun'}", *script,
    ]  # fmt: skip


@dataclass
class Launch:
    """One run in flight."""

    run: au.Run
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    deadline: float | None
    slot: int
    timed_out: float | None = None


def start_run(plan: Plan, run: au.Run, *, launcher: str, nproc: int, slot: int, device: str) -> Launch:
    """Start one run in its own session, its output into logs/<run>.log (appended across launches)."""
    Path(run.dir).mkdir(parents=True, exist_ok=True)
    (Path(run.dir) / OUTCOME_FILE).unlink(missing_ok=True)  # what this launch writes is its own
    log_path = Path(plan.output_dir) / "logs" / f"{run.run.replace('/', '.')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["RATLIB_REQUEUE"] = "0"  # the driver owns the Slurm job: it requeues, not the run
    # torchrun passes these on to its workers (SIGUSR1 would otherwise end torchrun and orphan them)
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif plan.parallel > 1 and launcher == "torchrun":  # each run in flight on its own GPUs
        visible = env.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(plan.parallel * nproc)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * nproc : (slot + 1) * nproc])
    cmd = run_command(plan, run, launcher, nproc)
    with open(log_path, "ab") as out:
        out.write(f"\n==== {au.now()} {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    now = time.monotonic()
    deadline = now + plan.run_timeout_s if plan.run_timeout_s else None
    return Launch(run, proc, log_path, now, deadline, slot)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_run(launch: Launch) -> None:
    """End a run that is past its deadline: SIGKILL to the launcher and every process below it."""
    if launch.proc.poll() is not None:
        return
    if launch.proc.args[0] == "srun":  # two SIGINTs within a second: srun cancels the step on every node
        for _ in range(2):
            with contextlib.suppress(ProcessLookupError):
                launch.proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launch.proc.wait(KILL_GRACE_S)
    for pid in [*_descendants(launch.proc.pid), launch.proc.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    launch.proc.wait()


class Stop:
    """The driver's SIGTERM/SIGUSR1 handler: remember the signal and pass it to the runs in flight."""

    def __init__(self) -> None:
        self.signum = 0
        self.running: list[Launch] = []
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        for launch in self.running:
            with contextlib.suppress(ProcessLookupError):
                launch.proc.send_signal(signum)  # torchrun and srun pass it on to every rank

    def restore(self) -> None:
        for s, previous in self.previous.items():
            signal.signal(s, previous)


# ----------------------------------------------------------------------------------------------
# One run's record, from its exit code and its folder


def make_record(plan: Plan, run: au.Run, launch: Launch, world_size: int) -> dict[str, Any] | None:
    """The results.jsonl line for a run that ended; None when it stopped with its checkpoint (preempted:
    nothing is recorded, ``--resume`` continues it)."""
    code = launch.proc.returncode
    outcome = read_outcome(run.dir) or {}
    if launch.timed_out is None and outcome.get("status") == "stopped":
        return None
    ok = code == 0 and launch.timed_out is None and outcome.get("status") == "finished"
    rows = au.read_metric_rows(run.dir)
    best = au.best_row(rows, plan.metric, plan.mode) if ok else None
    final = au.numbers(outcome.get("metrics") or {}) if ok else {}
    peaks = [0.0] * world_size  # what the example recorded per epoch (it resets the peak each epoch)
    for row in rows:
        for r, value in enumerate(row.get("peak_memory_gib") or []):
            if r < world_size and isinstance(value, (int, float)):
                peaks[r] = max(peaks[r], float(value))
    error = None
    if not ok:
        error = au.describe_failure(run.dir, launch.log_path, code, timed_out=launch.timed_out)
        if code == 0 and launch.timed_out is None:
            error.update(type="NoOutcome", message=f"exit code 0 but no {OUTCOME_FILE} with status finished")
    return {
        "run": run.run,
        "name": run.name,
        "seed": run.seed,
        "index": run.index,
        "status": "finished" if ok else "failed",
        "overrides": run.overrides,
        "metric": plan.metric,
        "mode": plan.mode,
        "final": final,
        "best": (
            {
                "epoch": best.get("epoch"),
                "step": best.get("step"),
                **{k: v for k, v in au.numbers(best).items() if k in final or k == plan.metric},
            }
            if best
            else {}
        ),
        "started_at": round(time.time() - (time.monotonic() - launch.started), 3),
        "wall_time_s": round(time.monotonic() - launch.started, 3),
        "peak_memory_gib": peaks,
        "peak_memory_max_gib": max(peaks),
        "peak_memory_max_rank": peaks.index(max(peaks)),
        "error": error,
        "exit_code": code,
        "resumed": run.resume,
        "world_size": world_size,
        "dir": run.dir,
        "log": str(launch.log_path),
        "config_hash": run.config_hash,
        "finished_at": au.now(),
    }


# ----------------------------------------------------------------------------------------------
# Summary


def write_summary(plan: Plan, world_size: int, *, final: bool = False) -> tuple[str, bool]:
    """summary.md and summary.png from results.jsonl; returns the table and whether the PNG was written."""
    out = Path(plan.output_dir)
    records = au.latest_records(au.read_jsonl(plan.results))
    rows = au.summary_rows(records, plan.runs, plan.metric, plan.mode)
    finished = sum(r.get("status") == "finished" for r in records.values())
    failed = sum(r.get("status") == "failed" for r in records.values())
    seeds = sorted({r.seed for r in plan.runs if r.seed is not None})
    header = [
        f"- base example: `{plan.example}`, config `{plan.config or '(defaults)'}`",
        f"- main metric: `{plan.metric}` ({'higher' if plan.mode == 'max' else 'lower'} is better); "
        f"{world_size} rank(s)" + (f"; seeds {seeds}" if seeds else ""),
        f"- run-wide overrides: `{' '.join(plan.common)}`" if plan.common else "- run-wide overrides: none",
        f"- {finished} finished, {failed} failed, {len(plan.runs) - finished - failed} not run "
        f"{'(study ended)' if final else 'yet'}; updated {au.now()}; every run: `results.jsonl`",
    ]
    table = au.summary_table(rows, plan.metric, plan.mode)
    text = au.summary_markdown(rows, title=plan.name, metric=plan.metric, mode=plan.mode, header=header)
    write_atomic(out / "summary.md", text.encode())
    png = au.summary_png(rows, out / "summary.png", title=plan.name, metric=plan.metric, mode=plan.mode)
    return table, png


# ----------------------------------------------------------------------------------------------
# main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the study file, e.g. examples/ablation/ablation.yaml")
    parser.add_argument("--resume", action="store_true", help="skip the runs recorded as finished in results.jsonl")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: run failed runs again too")
    parser.add_argument("--dry-run", action="store_true", help="validate every run and print the plan; train nothing")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="study keys (seeds=[0,1], nproc_per_node=2, ...) or config keys for every run (training.num_epochs=2)",
    )
    args = parser.parse_intermixed_args(argv)
    resume = args.resume or args.retry_failed
    setup_logging()
    if launched_as_a_rank():
        log.error(
            "the ablation driver runs as one process and starts each run itself (torchrun, or srun steps under "
            "Slurm): run `python examples/ablation/run.py --config ... nproc_per_node=N`, not under torchrun"
        )
        return 2

    # 1. Read the study, import the example's entry, validate every run, plan.
    try:
        study = read_study(args.config, args.overrides)
        study.runs = validate_runs(study)  # a typo in any run ends the study before anything starts
        if args.dry_run:
            return dry_run(study, resume=resume, retry_failed=args.retry_failed)
        plan = make_plan(study, resume=resume, retry_failed=args.retry_failed)
    except (ConfigError, StudyError, OSError) as exc:
        log.error("%s", exc)
        return 2
    s = study.cfg
    launcher = pick_launcher(s.launcher)
    if launcher == "srun" and s.parallel > 1:
        log.error("parallel=%d: under srun the driver runs one step at a time over the allocation's tasks", s.parallel)
        return 2
    nproc = int(os.environ.get("SLURM_NTASKS", "1")) if launcher == "srun" else s.nproc_per_node
    out = Path(plan.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(log_dir=out / "logs")  # the driver's own log: logs/rank0.log
    write_atomic(out / "study.yaml", yaml.safe_dump(s.model_dump(mode="json"), sort_keys=False).encode())
    log.info(
        "study %s: %d runs of %s (%d to run), each a %s launch of %d rank(s)%s; output %s",
        plan.name,
        len(plan.runs),
        plan.example,
        len(plan.todo),
        launcher,
        nproc,
        f", {s.parallel} at a time" if s.parallel > 1 else "",
        out,
    )

    # 2. Each run its own job; record each as it ends.
    stop = Stop()
    try:
        before = len(au.read_jsonl(plan.results))
        stopped = run_study(plan, launcher, nproc, s.device, stop)
        recorded = len(au.read_jsonl(plan.results)) - before
    finally:
        stop.restore()

    # 3. The summary; a stop exits 75 (and requeues the Slurm job) for --resume to continue.
    table, png = write_summary(plan, nproc, final=not stopped)
    print(f"\n{table}\n", flush=True)
    print(f"results: {plan.results}\nsummary: {out / 'summary.md'}", flush=True)
    print(
        f"plot:    {out / 'summary.png'}"
        if png
        else "plot:    skipped: matplotlib is not installed (pip install 'ratlib[plot]')",
        flush=True,
    )
    print(
        f"runs:    {out}/<variant>/ (config.yaml, metrics.jsonl, checkpoints/, logs/); launch output: {out / 'logs'}",
        flush=True,
    )
    print(f"curves:  tensorboard --logdir {out}   (one TensorBoard run per variant)", flush=True)
    if stopped:
        log.warning(
            "study stopped (%s): %s kept their checkpoints and nothing is recorded for them; run the same command "
            "with --resume to continue",
            signal.Signals(stop.signum).name if stop.signum else "a run was preempted",
            ", ".join(stopped),
        )
        if recorded or any((read_outcome(plan.runs[i].dir) or {}).get("progressed") for i in plan.todo):
            requeue_slurm_job()
        else:  # a requeued job that stops again before any step would loop
            log.warning("no requeue: nothing progressed since this launch started")
        return PREEMPT_EXIT_CODE
    return 0


def run_study(plan: Plan, launcher: str, nproc: int, device: str, stop: Stop) -> list[str]:
    """Start the runs (``parallel`` at a time), record each as it ends; returns the runs that stopped with their
    checkpoint (a signal to the driver or to a rank), after which nothing new starts."""
    todo = [plan.runs[i] for i in plan.todo]
    stopped: list[str] = []
    done = 0
    while (todo and not stop.signum and not stopped) or stop.running:
        while todo and len(stop.running) < plan.parallel and not stop.signum and not stopped:
            run = todo.pop(0)
            slot = min(set(range(plan.parallel)) - {launch.slot for launch in stop.running})
            launch = start_run(plan, run, launcher=launcher, nproc=nproc, slot=slot, device=device)
            stop.running.append(launch)
            log.info(
                "[%d/%d] %s: %s -> %s%s",
                done + len(stop.running),
                len(plan.todo),
                run.run,
                au.overrides_text(run.overrides),
                run.dir,
                " (continuing from its checkpoint)" if run.resume else "",
            )
        time.sleep(0.2)
        for launch in list(stop.running):
            if launch.proc.poll() is None and launch.deadline is not None and time.monotonic() > launch.deadline:
                launch.timed_out = plan.run_timeout_s
                log.warning(
                    "%s is still running after run_timeout_s=%g s: killing it", launch.run.run, launch.timed_out
                )
                kill_run(launch)
            if launch.proc.poll() is None:
                continue
            stop.running.remove(launch)
            done += 1
            record = make_record(plan, launch.run, launch, nproc)
            if record is None:
                stopped.append(launch.run.run)
                log.warning("%s stopped at its checkpoint (preempted); not recorded", launch.run.run)
                continue
            au.append_jsonl(plan.results, record)
            report(record, done, len(plan.todo))
            write_summary(plan, nproc)
    return stopped


def report(record: dict[str, Any], k: int, n: int) -> None:
    if record["status"] == "finished":
        value = record["final"].get(record["metric"])
        shown = f"{record['metric']} {value:.4f}" if value is not None else f"no {record['metric']!r} returned"
        log.info(
            "[%d/%d] %s finished in %.1f s: %s, peak memory %.2f GiB",
            k,
            n,
            record["run"],
            record["wall_time_s"],
            shown,
            record["peak_memory_max_gib"],
        )
        if value is None:
            log.warning(
                "the run's outcome.json has %s, without the main metric %r: set `metric:` in the study file",
                sorted(record["final"]),
                record["metric"],
            )
    else:
        err = record["error"]
        where = f"rank {err['rank']}" if err["rank"] is not None else "an unknown rank"
        log.warning(
            "[%d/%d] %s failed on %s: %s: %s (recorded; going on). Its output: %s",
            k,
            n,
            record["run"],
            where,
            err["type"],
            err["message"],
            err["log"],
        )


def dry_run(study: Study, *, resume: bool, retry_failed: bool) -> int:
    """Validate every run and print the plan (nothing is started)."""
    plan = make_plan(study, resume=resume, retry_failed=retry_failed, dry=True)
    todo = set(plan.todo)
    print(
        f"study {plan.name}: {len(plan.runs)} runs of {plan.example} (config {plan.config or 'defaults'}), "
        f"main metric {plan.metric} ({plan.mode}); every config is valid"
    )
    for run in plan.runs:
        state = ("continue" if run.resume else "run") if run.index in todo else "recorded: skip"
        print(f"  {run.index:>3}  {run.run:<40} {state:<15} {au.overrides_text(run.overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
