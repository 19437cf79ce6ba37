"""Hypothesis strategy over launcher environments (see ``ratlib.testing.strategies``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

# launcher -> (rank var, world var, local rank var, local world var)
_NAMES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


@dataclass(frozen=True)
class LaunchCase:
    """An environment and what ``detect_launch_env`` must make of it.

    Valid: ``launcher``, ``rank``, ``world_size``, ``local_rank``, ``local_world_size`` are expected.
    Invalid: ``bad_variable`` names the variable the ``DistInitError`` must mention.
    """

    environ: dict[str, str]
    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    bad_variable: str | None = None
    note: str = field(default="", compare=False)


@st.composite
def _valid(draw: st.DrawFn, launchers: tuple[str, ...]) -> LaunchCase:
    launcher = draw(st.sampled_from(launchers))
    if launcher == "single":
        return LaunchCase({}, "single")
    nodes = draw(st.integers(1, 4))
    per_node = draw(st.integers(1, 8))
    world = nodes * per_node
    rank = draw(st.integers(0, world - 1))
    node, local_rank = divmod(rank, per_node)
    rank_v, world_v, local_v, local_world_v = _NAMES[launcher]
    env = {rank_v: str(rank), world_v: str(world), local_v: str(local_rank),
           "MASTER_ADDR": draw(st.sampled_from(["127.0.0.1", "node01", "10.1.2.3"])),
           "MASTER_PORT": str(draw(st.integers(1024, 65535)))}
    if local_world_v:
        env[local_world_v] = str(per_node)
    if launcher == "torchrun":
        env["GROUP_RANK"] = str(node)
        env["TORCHELASTIC_RUN_ID"] = "none"
    if launcher == "slurm":
        env.update({"SLURM_NODEID": str(node), "SLURM_JOB_ID": str(draw(st.integers(1, 10**7))),
                    "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
                    "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]" if nodes > 1 else "gpu01"})
        if draw(st.booleans()):  # torchrun inside a SLURM allocation: torchrun's variables win
            env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                        "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node), "TORCHELASTIC_RUN_ID": "x"})
            env["SLURM_PROCID"], env["SLURM_NTASKS"] = "0", "1"  # what an sbatch step around torchrun shows
            launcher = "torchrun"
    return LaunchCase(env, launcher, rank, world, local_rank, per_node)


@st.composite
def _invalid(draw: st.DrawFn, launchers: tuple[str, ...]) -> LaunchCase:
    base = draw(_valid(tuple(name for name in launchers if name != "single") or ("torchrun",)))
    env = dict(base.environ)
    rank_v, world_v, local_v, local_world_v = _NAMES[base.launcher]
    kind = draw(st.sampled_from(["rank_too_big", "negative", "not_int", "local_too_big", "half_set"]))
    if kind == "local_too_big" and not local_world_v:
        kind = "rank_too_big"
    if kind == "rank_too_big":
        env[rank_v] = str(base.world_size + draw(st.integers(0, 5)))
        bad = rank_v
    elif kind == "negative":
        bad = draw(st.sampled_from([rank_v, world_v]))
        env[bad] = str(-draw(st.integers(1, 9)))
    elif kind == "not_int":
        bad = draw(st.sampled_from([rank_v, world_v, local_v]))
        env[bad] = draw(st.sampled_from(["", "abc", "1.5", "0x2", "two"]))
    elif kind == "local_too_big":
        env[local_v] = str(base.local_world_size + draw(st.integers(0, 3)))
        bad = local_v
    else:
        del env[world_v]
        bad = world_v
    return LaunchCase(env, base.launcher, bad_variable=bad, note=kind)


def launch_envs(valid: bool = True, launchers: tuple[str, ...] | None = None) -> st.SearchStrategy[LaunchCase]:
    """Environments of every launcher ratlib recognises (torchrun, slurm, openmpi, mpich, single).

    ``valid=True``: consistent environments with the expected rank, world size and launcher.
    ``valid=False``: one corruption each (rank >= world size, a negative or non-integer value, a local
    rank outside the local world size, a half-set launcher) with the variable to be rejected for.
    """
    chosen = launchers or ("torchrun", "slurm", "openmpi", "mpich", "single")
    return _valid(chosen) if valid else _invalid(chosen)
