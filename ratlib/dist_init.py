"""Launcher detection, process-group set-up and teardown, rank helpers.

SKELETON laid down by the foundation issue (#2): ``LaunchEnv``, ``DistInitError`` and a
torchrun-only ``detect_launch_env``. Issue #4 completes this module.
Torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["DistInitError", "LaunchEnv", "detect_launch_env"]


class DistInitError(RuntimeError):
    """Process-group set-up failed; the message names the launcher, variables, rank, cause and fix."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process, parsed from environment variables (no torch)."""

    launcher: str  # "torchrun", "slurm", "openmpi", "mpich", "single", ...
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    variables: Mapping[str, str] = field(default_factory=dict)  # the variables read, for messages

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], name: str, launcher: str) -> int:
    raw = environ[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise DistInitError(f"{launcher}: {name}={raw!r} is not an integer; unset it or fix the launcher") from None
    if value < 0:
        raise DistInitError(f"{launcher}: {name}={raw!r} is negative; unset it or fix the launcher")
    return value


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse the launcher's variables from ``environ`` (default ``os.environ``). Pure, torch-free."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, world = _int(env, "RANK", launcher), _int(env, "WORLD_SIZE", launcher)
        local_rank = _int(env, "LOCAL_RANK", launcher) if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE", launcher) if "LOCAL_WORLD_SIZE" in env else world
        port = _int(env, "MASTER_PORT", launcher) if "MASTER_PORT" in env else None
        read = {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in env}
        return LaunchEnv(launcher, rank, world, local_rank, local_world, 0, env.get("MASTER_ADDR"), port, read)
    return LaunchEnv("single")
