"""Ablation studies over an example's config: every run on every rank, results that survive a crash.

    torchrun --nproc_per_node 2 examples/ablation/run.py --config examples/ablation/ablation.yaml
    python examples/ablation/run.py --config ... seeds=[0,1,2] training.num_epochs=4   # study keys, run-wide keys
    torchrun ... examples/ablation/run.py --config ... --resume      # after a crash: only what is not recorded
    torchrun ... examples/ablation/run.py --config ... --resume --retry-failed
    python examples/ablation/run.py --config ... --dry-run           # validate every variant, print the plan

The study file (ablation.yaml) names a base example (segmentation, detection, or a path to a train.py),
variants as a grid over dotted config keys and/or an explicit list, and optionally seeds. The main rank
names every run and its folder, validates every run's config with ``load_config`` before the first one
trains, and hands that plan to the other ranks. Every rank then trains every run in lockstep through the
example's own ``train()`` (imported, in this process). After each run the ranks exchange how it went;
the main rank appends one line to results.jsonl (fsynced) and refreshes summary.md and summary.png.

A run that raises on any rank is recorded as failed (rank, error) and the study goes on: the failing
rank tears down its process group, which makes the others' pending collectives fail at once (gloo), the
ranks exchange their outcomes through the rendezvous store, and all of them start a fresh group for the
next run. A rank that dies, or hangs inside a collective, stops the study at ``distributed.timeout_s``;
everything recorded so far stays, and ``--resume`` runs the rest (docs/examples/ablation.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ratlib import (
    ConfigError,
    DistInfo,
    broadcast_object,
    distributed,
    get_logger,
    get_world_size,
    heartbeat,
    is_main_process,
    load_config,
    preempt,
    setup_logging,
)
from ratlib.comm import ChannelError, StoreChannel
from ratlib.config_defaults import SMOKE_DEFAULTS
from ratlib.io import write_atomic
from ratlib.preempt import PREEMPT_EXIT_CODE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ablation_utils.py sits beside this file
import ablation_utils as au  # noqa: E402
from ablation_utils import StudyError  # noqa: E402

STUDY_SCHEMA = au.StudyConfig  # `ratlib doctor ablation.yaml` validates study files with it

log = get_logger("ablation")
GIB = 1024**3


class StudyStopped(RuntimeError):
    """The ranks lost each other (a rank died or hangs): the study cannot go on in this launch."""


# ----------------------------------------------------------------------------------------------
# The base example: examples/<name>/train.py, imported by path


_EXAMPLES: dict[Path, Example] = {}


@dataclass(frozen=True)
class Example:
    """The base example's one entry, ``EXAMPLE = {"schema": ..., "train": ..., "metric": ..., "mode": ...}``
    in its train.py: its config schema (an ExperimentConfig subclass), ``train(cfg, *, run_dir=None,
    resume=False, info=None) -> dict``, the main metric and "max" or "min"."""

    schema: Any
    train: Any
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
    missing = [k for k in ("schema", "train", "metric") if not isinstance(entry, dict) or k not in entry]
    if missing or entry.get("mode", "max") not in ("max", "min"):
        raise StudyError(
            f"{path} does not follow the ablation contract: its EXAMPLE entry "
            + (f"lacks {', '.join(repr(k) for k in missing)}" if missing else f"has mode={entry.get('mode')!r}")
            + '. An example needs EXAMPLE = {"schema": <its ExperimentConfig subclass>, "train": train, '
            '"metric": "<main metric>", "mode": "max" or "min"}, with train(cfg, *, run_dir=None, resume=False, '
            "info=None) -> dict"
        )
    example = Example(**{k: v for k, v in entry.items() if k in ("schema", "train", "metric", "mode")})
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
# The study: read on every rank (for the process-group settings); planned by the main rank alone


@dataclass
class Study:
    """The study file and the base example, as every rank reads them before the process group exists."""

    cfg: au.StudyConfig
    file: Path
    example_path: Path
    example: Example
    config: str | None  # the base example's config file
    common: list[str]  # run-wide overrides: the study's `overrides` and the command line's config keys
    base_cfg: Any  # the base config with the run-wide overrides: its `distributed` section sets up the group
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
    if dropped and is_main_process():
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
    """What the main rank decided and every rank follows: names, folders, which runs to train."""

    name: str
    example: str
    config: str | None
    common: list[str]
    metric: str
    mode: str
    output_dir: str
    runs: list[au.Run]
    todo: list[int]  # indices into runs
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # this launch's keys in the store

    @property
    def results(self) -> Path:
        return Path(self.output_dir) / "results.jsonl"


def validate_runs(study: Study) -> list[au.Run]:
    """Every run of the study, each config loaded with load_config: all problems in one error, before the
    process group exists and anything trains."""
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
        if len(names) > 1 and is_main_process():
            log.warning(
                "runs %s have the same config: they train the same thing (a grid value equal to the base's?)",
                ", ".join(names),
            )
    return runs


def make_plan(study: Study, *, resume: bool, retry_failed: bool, dry: bool = False) -> Plan:
    """The main rank's decisions: every run's name and folder, and with --resume which runs are left.
    ``dry``: change nothing on disk (--dry-run)."""
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
# How ranks tell each other how a run went, also when the process group is broken: ratlib.comm.StoreChannel
# (an all-gather through the rendezvous store). A rank whose run raised tears its group down
# (release_peers), so the others' pending collective fails at once (gloo) instead of at the timeout; every
# rank then reports its outcome through the channel and, after a failure, all build a fresh group.


def exchange(channel: StoreChannel, key: str, outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's outcome; a rank that died or hangs (or a store that is gone) stops the study."""
    try:
        return channel.all_gather(key, outcome)
    except ChannelError as exc:
        raise StudyStopped(str(exc)) from exc


# ----------------------------------------------------------------------------------------------
# One run, on every rank


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).strip().splitlines()[:3]) or type(exc).__name__
    return text[:500]


def train_run(example: Example, plan: Plan, run: au.Run, info: DistInfo, channel: StoreChannel) -> dict[str, Any]:
    """Load the run's config and train it through the example's train(); never raises (but on Ctrl-C)."""
    from ratlib import memory

    start = time.perf_counter()
    memory.reset_peak_memory(info.device)
    outcome: dict[str, Any] = {"run": run.run, "rank": info.rank, "ok": True, "final": {}, "error": None}
    failed = False
    try:
        with quiet():
            cfg = load_config(plan.config, overrides=run.override_strings(plan.common), schema=example.schema)
        metrics = example.train(cfg, run_dir=run.dir, resume=run.resume, info=info)
        outcome["final"] = au.numbers(metrics or {})
    except SystemExit as exc:  # preempted (ratlib.preempt): the run's checkpoint is written; record nothing
        if exc.code == PREEMPT_EXIT_CODE:
            log.warning(
                "study preempted during run %s: its checkpoint is saved and nothing is recorded for it; run the "
                "same command with --resume to continue it from there",
                run.run,
            )
        raise
    except Exception as exc:  # recorded; the study goes on
        failed = True
        outcome["ok"] = False
        outcome["error"] = {
            "rank": info.rank,
            "type": type(exc).__name__,
            "message": _message(exc),
            "order": channel.add(f"run{run.index}/failures"),  # 1: the first rank to fail is the cause
        }
        log.error("run %s raised on rank %d", run.run, info.rank, exc_info=exc, main_process_only=False)
    if failed:  # after the except block: the traceback, and the model in its frames, are gone by now
        channel.release_peers()
    outcome["wall_time_s"] = round(time.perf_counter() - start, 3)
    peak = memory.peak_memory(info.device)
    outcome["peak_memory_gib"], outcome["peak_memory_kind"] = round(peak.peak / GIB, 4), peak.kind
    return outcome


def make_record(plan: Plan, run: au.Run, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """The results.jsonl line for one run, from every rank's outcome and the run's metrics.jsonl."""
    ok = all(o["ok"] for o in outcomes)
    rows = au.read_metric_rows(run.dir)
    best = au.best_row(rows, plan.metric, plan.mode) if ok else None
    final = outcomes[0]["final"] if ok else {}
    peaks = [o["peak_memory_gib"] for o in outcomes]  # what the runner saw on each rank
    for row in rows:  # and what the example recorded per epoch (it resets the peak each epoch)
        for r, value in enumerate(row.get("peak_memory_gib") or []):
            if r < len(peaks) and isinstance(value, (int, float)):
                peaks[r] = max(peaks[r], float(value))
    errors = sorted((o["error"] for o in outcomes if o["error"]), key=lambda e: e["order"])
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
        "wall_time_s": outcomes[0]["wall_time_s"],
        "peak_memory_gib": peaks,
        "peak_memory_max_gib": max(peaks),
        "peak_memory_max_rank": peaks.index(max(peaks)),
        "peak_memory_kind": outcomes[0]["peak_memory_kind"],
        "error": ({k: v for k, v in errors[0].items() if k != "order"} if errors else None),
        "errors": errors,
        "resumed": run.resume,
        "world_size": len(outcomes),
        "dir": run.dir,
        "config_hash": run.config_hash,
        "finished_at": au.now(),
    }


# ----------------------------------------------------------------------------------------------
# Summary (main rank)


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
    # DeepSpeed's launcher adds --local_rank=N; ratlib reads LOCAL_RANK from the environment, which wins.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="study keys (seeds=[0,1], output_dir=...) or config keys for every run (training.num_epochs=2)",
    )
    args = parser.parse_intermixed_args(argv)
    resume = args.resume or args.retry_failed
    setup_logging()

    # 1. Every rank reads the study, imports the example and validates every run (no collective yet).
    try:
        study = read_study(args.config, args.overrides)
        study.runs = validate_runs(study)  # every run, on every rank: a typo ends the study before the group exists
        if args.dry_run:
            return dry_run(study, resume=resume, retry_failed=args.retry_failed)
    except (ConfigError, StudyError) as exc:
        if is_main_process():
            log.error("%s", exc)
        return 2
    if get_world_size() > 1:
        # torch._dynamo keeps references to the process group that exists when it is first imported (DDP
        # imports it); a group held like that cannot be torn down to release the other ranks after a failure.
        # So import it before there is a group (DDP would import it anyway).
        with contextlib.suppress(ImportError):
            import torch._dynamo  # noqa: F401

    # The study owns the stop handlers, so a signal between two runs (or after a run's last agreement, in its
    # evaluation) is kept for the agreement after that run instead of meeting the default action.
    pre = preempt.install() if getattr(study.base_cfg.training, "preemption", False) else None
    try:
        code = study_on_ranks(study, args, resume, pre)
        if code == 0 and pre is not None and pre.requested and pre.stop_step is None:
            log.warning("%s after the last run: the study is complete; exiting normally", pre.signal)
        return code
    finally:
        if pre is not None:
            preempt.uninstall()


def study_on_ranks(study: Study, args: argparse.Namespace, resume: bool, pre: preempt.Preemption | None) -> int:
    """Steps 2 to 4 of main(), inside the process group."""
    d = study.base_cfg.distributed
    with distributed(
        d.backend,
        timeout=d.timeout_s,
        connect_timeout=d.connect_timeout_s,
        stall_timeout=d.stall_timeout_s,
        device=study.cfg.device,
    ) as info:
        # 2. The main rank decides names, folders and what is left to run; the others receive the plan.
        plan, error = None, None
        if info.is_main:
            try:
                plan = make_plan(study, resume=resume, retry_failed=args.retry_failed)
            except (ConfigError, StudyError, OSError) as exc:
                error = str(exc)
        plan, error = broadcast_object((plan, error))
        if error is not None:
            if info.is_main:
                log.error("%s", error)
            return 2
        assert plan is not None
        out = Path(plan.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        setup_logging(log_dir=out / "logs")  # every rank: logs/rank{R}.log, all runs
        if info.is_main:
            write_atomic(
                out / "study.yaml", yaml.safe_dump(study.cfg.model_dump(mode="json"), sort_keys=False).encode()
            )
            log.info(
                "study %s: %d runs of %s (%d to run), %d rank(s) on %s; output %s",
                plan.name,
                len(plan.runs),
                plan.example,
                len(plan.todo),
                info.world_size,
                info.device,
                out,
            )
        channel = StoreChannel(f"ratlib-ablation/{plan.nonce}", timeout_s=d.timeout_s)

        # 3. Every rank trains every run, in lockstep; the main rank records each one as it ends.
        try:
            for k, index in enumerate(plan.todo, 1):
                run = plan.runs[index]
                heartbeat(0)
                log.info(
                    "[%d/%d] %s: %s -> %s%s",
                    k,
                    len(plan.todo),
                    run.run,
                    au.overrides_text(run.overrides),
                    run.dir,
                    " (continuing from its checkpoint)" if run.resume else "",
                )
                outcome = train_run(study.example, plan, run, info, channel)
                outcomes = exchange(channel, f"run{index}", outcome)
                if {o["run"] for o in outcomes} != {run.run}:
                    raise StudyStopped(f"ranks are out of step: {[o['run'] for o in outcomes]}")
                if not all(o["ok"] for o in outcomes):
                    channel.rebuild_group()
                    log.info("fresh process group after the failed run %s", run.run)
                heartbeat(0)
                if info.is_main:
                    record = make_record(plan, run, outcomes)
                    au.append_jsonl(plan.results, record)
                    report(record, k, len(plan.todo))
                    write_summary(plan, info.world_size)
                if pre is not None and k < len(plan.todo) and pre.agree(k):  # a signal that came after the run's
                    log.warning(  # last agreement (its evaluation, the record): stop before the next run
                        "study preempted after run %s (%d of %d runs of this launch done and recorded); run the "
                        "same command with --resume to run the rest",
                        run.run,
                        k,
                        len(plan.todo),
                    )
                    pre.exit()
        except StudyStopped as exc:
            log.error(
                "study stopped: %s. Every run recorded so far is in %s; run the same command with --resume to go on",
                exc,
                plan.results,
                main_process_only=False,
            )
            return 1

        # 4. The summary.
        if info.is_main:
            table, png = write_summary(plan, info.world_size, final=True)
            print(f"\n{table}\n", flush=True)
            print(f"results: {plan.results}\nsummary: {out / 'summary.md'}", flush=True)
            print(
                f"plot:    {out / 'summary.png'}"
                if png
                else "plot:    skipped: matplotlib is not installed (pip install 'ratlib[plot]')",
                flush=True,
            )
            print(
                f"runs:    {out}/<variant>/ (config.yaml, metrics.jsonl, checkpoints/); logs: {out / 'logs'}",
                flush=True,
            )
            print(f"curves:  tensorboard --logdir {out}   (one TensorBoard run per variant)", flush=True)
    return 0


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
                "train() returned %s, without the main metric %r: set `metric:` in the study file",
                sorted(record["final"]),
                record["metric"],
            )
    else:
        err = record["error"]
        log.warning(
            "[%d/%d] %s failed on rank %d: %s: %s (recorded; going on)",
            k,
            n,
            record["run"],
            err["rank"],
            err["type"],
            err["message"],
        )


def dry_run(study: Study, *, resume: bool, retry_failed: bool) -> int:
    """Validate every run and print the plan (main rank; no process group, nothing trained)."""
    if not is_main_process():
        return 0
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
