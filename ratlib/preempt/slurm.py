"""Slurm: requeue the job after a stop, and check that ``--signal``'s lead time leaves room for a step and a
checkpoint.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ratlib.preempt.signals import _DEFAULT_SIGNAL_LEAD, NO_REQUEUE_ENV, REQUEUE_COMMAND, _float_or_none, log

__all__ = ["check_lead_time", "requeue_slurm_job"]


def _requeue(pre: Any, command: Sequence[str], env: Mapping[str, str]) -> bool:  # pre: agreement.Preemption
    if pre.progressed:
        return requeue_slurm_job(command=command, environ=env)
    if env.get("SLURM_JOB_ID"):
        log.warning(
            "preemption: no requeue of Slurm job %s: no step done since this start (step %s, restart count %s); "
            "requeueing again would loop",
            env["SLURM_JOB_ID"],
            pre.start_step,
            env.get("SLURM_RESTART_COUNT", "0"),
        )
    return False


def requeue_slurm_job(*, command: Sequence[str] = REQUEUE_COMMAND, environ: Mapping[str, str] | None = None) -> bool:
    """Requeue this Slurm job (``scontrol requeue $SLURM_JOB_ID``); True when Slurm took it.

    Nothing happens outside Slurm, or with ``RATLIB_REQUEUE=0`` in the environment (a driver that owns the job
    sets it for the runs it starts, and requeues once itself). Call it only when the job made progress since it
    started, or a requeued job that stops again at once would loop.
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        log.info("preemption: not under Slurm (no SLURM_JOB_ID): no requeue")
        return False
    if env.get(NO_REQUEUE_ENV) == "0":
        log.info(
            "preemption: %s=0: the process that started this run requeues job %s, not this run", NO_REQUEUE_ENV, job
        )
        return False
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    cmd = [*command, job]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("preemption: requeue failed: %s: %s", shlex.join(cmd), exc)
        return False
    if done.returncode != 0:
        log.error(
            "preemption: requeue failed: %s exited %d: %s (submit with sbatch --requeue; interactive srun "
            "jobs cannot be requeued)",
            shlex.join(cmd),
            done.returncode,
            (done.stderr or done.stdout).strip(),
        )
        return False
    log.warning("preemption: requeued Slurm job %s (restart count so far %s): %s", job, restarts, shlex.join(cmd))
    return True


# ----------------------------------------------------------------------------------------------
# Signal lead time


def _parse_signal_spec(spec: str) -> float | None:
    """Seconds from a Slurm ``--signal`` value ``[{R|B}:]<sig>[@sig_time]``; None when it is not one."""
    spec = spec.strip()
    if not spec:
        return None
    spec = spec.split(":", 1)[1] if ":" in spec else spec
    if "@" not in spec:
        return _DEFAULT_SIGNAL_LEAD
    try:
        return float(spec.rsplit("@", 1)[1])
    except ValueError:
        return None


def check_lead_time(
    step_seconds: float,
    save_seconds: float,
    *,
    lead_seconds: float | None = None,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> float | None:
    """Warn when the signal's lead time is shorter than one step plus one checkpoint write (measured by you).

    The lead time is ``lead_seconds`` if given, else ``RATLIB_SIGNAL_LEAD`` (seconds), else Slurm's
    ``SBATCH_SIGNAL``/``SLURM_SIGNAL`` (the input variables that set ``--signal``; an ``#SBATCH --signal``
    line is not visible inside the job, so pass it yourself then). Kubernetes' terminationGracePeriodSeconds
    and torchrun's 30 s are not visible either. Returns the lead time used, or None when unknown.
    """
    env = os.environ if environ is None else environ
    lead = lead_seconds
    source = "lead_seconds"
    if lead is None:
        for name in ("RATLIB_SIGNAL_LEAD", "SBATCH_SIGNAL", "SLURM_SIGNAL"):
            if env.get(name):
                value = env[name]
                lead = _parse_signal_spec(value) if name != "RATLIB_SIGNAL_LEAD" else _float_or_none(value)
                source = f"{name}={value}"
                if lead is not None:
                    break
    if lead is None:
        log.info("preemption: signal lead time unknown (pass lead_seconds=, or set RATLIB_SIGNAL_LEAD)")
        return None
    need = float(step_seconds) + float(save_seconds)
    if lead < need:
        text = (
            f"preemption: the signal comes {lead:g} s before the kill ({source}), but one step ({step_seconds:.1f} s) "
            f"plus a checkpoint write ({save_seconds:.1f} s) take {need:.1f} s: the checkpoint may be cut off; "
            f"ask for more (e.g. #SBATCH --signal=USR1@{int(need * 2) + 30})"
        )
        (warn or log.warning)(text)
    return float(lead)
