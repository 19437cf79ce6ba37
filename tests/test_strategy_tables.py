"""The hand tables the strategies take their expected values from, checked against the library and, where
it is installed, against SLURM's own ``scontrol show hostnames``."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratlib.coco_paths import KINDS, SPLITS, CocoSplit, annotation_filename
from ratlib.launch import detect_launch_env, expand_slurm_nodelist
from ratlib.testing._coco_strategies import COCO_FILES
from ratlib.testing._launch_strategies import SLURM_PORTS


def test_coco_file_table_covers_every_split_and_agrees_with_the_library() -> None:
    assert set(COCO_FILES) == {(name, year) for name, years in SPLITS.items() for year in years}
    for (name, year), (folder, files) in COCO_FILES.items():
        split = CocoSplit(name, year)
        assert split.image_folder == folder, (split, folder)
        for kind in KINDS:
            if kind in files:
                assert annotation_filename(split, kind=kind) == files[kind], (split, kind)
            else:  # a kind COCO does not publish for this split is refused, not invented
                with pytest.raises(ValueError):
                    annotation_filename(split, kind=kind)


def _slurm_env(job: int, step: int | None) -> dict[str, str]:
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "gpu01",
        "SLURM_JOB_ID": str(job),
    }
    return env if step is None else {**env, "SLURM_STEP_ID": str(step)}


@pytest.mark.parametrize("job,step,port", SLURM_PORTS)
def test_slurm_port_follows_the_documented_rule(job: int, step: int | None, port: int) -> None:
    assert detect_launch_env(_slurm_env(job, step)).master_port == port
    assert detect_launch_env({**_slurm_env(job, step), "MASTER_PORT": "29400"}).master_port == 29400  # it wins


def test_slurm_ports_differ_across_steps_of_one_job() -> None:
    ports = [detect_launch_env(_slurm_env(123456, step)).master_port for step in range(6)]
    assert len(set(ports)) == 6 and all(15000 <= p < 35000 for p in ports), ports


# ----------------------------------------------------------------------------------------------
# Host lists: ratlib against scontrol


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory: pytest.TempPathFactory):
    """``scontrol show hostnames`` as a function; scontrol needs a slurm.conf even for this offline command."""
    exe = shutil.which("scontrol")
    if exe is None:
        pytest.skip("scontrol is not installed (optional: apt-get install slurm-client); hand tables still run")
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text(
        "ClusterName=ratlib\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost\n"
    )

    def hostnames(nodelist: str) -> list[str]:
        out = subprocess.run(
            [exe, "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            env={"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin"},
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    return hostnames


HAND_LISTS = {
    "gpu01": ["gpu01"],
    "gpu[01-03,07],cpu3": ["gpu01", "gpu02", "gpu03", "gpu07", "cpu3"],
    "n[8-10]": ["n8", "n9", "n10"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "rack[1-2]-n[1,3]": ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"],
    "node-[1-2]-ib": ["node-1-ib", "node-2-ib"],  # a suffix: ratlib reads it, scontrol 22.05 refuses it
}
SCONTROL_REFUSES = {"node-[1-2]-ib"}


@pytest.mark.parametrize("nodelist", sorted(HAND_LISTS))
def test_hand_host_lists(nodelist: str) -> None:
    assert expand_slurm_nodelist(nodelist) == HAND_LISTS[nodelist]


def test_hand_host_lists_agree_with_scontrol(scontrol) -> None:
    for nodelist, hosts in HAND_LISTS.items():
        if nodelist not in SCONTROL_REFUSES:
            assert scontrol(nodelist) == hosts, nodelist


def _brackets(draw: st.DrawFn) -> str:
    """``[...]`` of 1-3 zero-padded numbers or ranges."""
    width = draw(st.integers(1, 3))
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        lo = draw(st.integers(0, 150))
        hi = lo + draw(st.integers(0, 4))
        parts.append(str(lo).zfill(width) if lo == hi else f"{str(lo).zfill(width)}-{str(hi).zfill(width)}")
    return f"[{','.join(parts)}]"


@st.composite
def _nodelists(draw: st.DrawFn) -> str:
    """Compressed lists: 1-3 groups of prefix[ranges and numbers], sometimes a second bracket (rack[1-2]-n[1,3]),
    or a plain host. No suffix after a bracket alone: scontrol refuses those."""
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        prefix = draw(st.sampled_from(["gpu", "n", "node-", "dgx-a"]))
        if draw(st.integers(0, 3)) == 0:
            groups.append(prefix + str(draw(st.integers(0, 999))))
            continue
        groups.append(prefix + _brackets(draw) + (f"-n{_brackets(draw)}" if draw(st.integers(0, 3)) == 0 else ""))
    return ",".join(groups)


@settings(max_examples=40, deadline=None)
@given(_nodelists())
def test_expand_slurm_nodelist_agrees_with_scontrol(scontrol, nodelist: str) -> None:
    assert expand_slurm_nodelist(nodelist) == scontrol(nodelist)


def test_first_host_of_the_strategy_is_scontrols_first(scontrol) -> None:
    from ratlib.testing._launch_strategies import _hostlist

    @settings(max_examples=20, deadline=None)
    @given(st.integers(1, 4).flatmap(_hostlist))
    def check(case: tuple[str, str]) -> None:
        text, first = case
        assert scontrol(text)[0] == first, text

    check()
