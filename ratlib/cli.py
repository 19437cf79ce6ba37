"""The ``ratlib`` command (also ``python -m ratlib``): ``env``, ``doctor``, ``coco``.

Each subcommand's work lives in its module; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

_PACKAGES = ("torch", "torchvision", "pycocotools", "deepspeed", "nibabel", "numpy", "pydantic", "PyYAML", "tqdm")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_env() -> dict[str, Any]:
    """Versions, accelerators and the launcher environment, as a JSON-able dict."""
    from ratlib.launch import DistInitError, detect_launch_env

    info: dict[str, Any] = {
        "ratlib": _version("ratlib"),  # the installed distribution's (cli never imports the package top)
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
    }
    torch_info: dict[str, Any] = {"cuda": None, "nccl": None, "cuda_available": False, "gpus": []}
    if info["packages"]["torch"] is not None:
        try:
            import torch

            torch_info["cuda"] = torch.version.cuda
            torch_info["cuda_available"] = torch.cuda.is_available()
            if torch.cuda.is_available():
                try:
                    torch_info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
                except Exception:  # NCCL missing from this build
                    torch_info["nccl"] = None
                for i in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(i)
                    torch_info["gpus"].append(
                        {"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
                    )
        except Exception as exc:  # a broken torch install is worth reporting, not crashing on
            torch_info["error"] = f"{type(exc).__name__}: {exc}"
    info["torch"] = torch_info
    try:
        launch = detect_launch_env()
        info["launch"] = {
            "launcher": launch.launcher,
            "rank": launch.rank,
            "world_size": launch.world_size,
            "local_rank": launch.local_rank,
            "local_world_size": launch.local_world_size,
            "node_rank": launch.node_rank,
            "master_addr": launch.master_addr,
            "master_port": launch.master_port,
            "job_key": launch.job_key,  # set when the rendezvous is derived from the job (docs/launchers.md)
            "variables": dict(launch.variables),
        }
    except DistInitError as exc:
        info["launch"] = {"error": str(exc)}
    return info


def _print_env(info: dict[str, Any]) -> None:
    rows = [("ratlib", info["ratlib"]), ("python", info["python"]), ("platform", info["platform"])]
    rows += [(name, ver or "not installed") for name, ver in info["packages"].items()]
    t = info["torch"]
    rows += [
        ("torch CUDA", t.get("cuda") or "none (CPU build)"),
        ("CUDA available", str(t.get("cuda_available"))),
        ("NCCL", t.get("nccl") or "n/a"),
    ]
    if t.get("error"):
        rows.append(("torch error", t["error"]))
    gpus = t.get("gpus") or []
    rows.append(("GPUs", str(len(gpus))))
    rows += [(f"  cuda:{g['index']}", f"{g['name']} ({g['memory_gib']} GiB)") for g in gpus]
    launch = info["launch"]
    if "error" in launch:
        rows.append(("launcher", f"ERROR: {launch['error']}"))
    else:
        rows.append(("launcher", launch["launcher"]))
        for key in ("rank", "world_size", "local_rank", "local_world_size", "node_rank", "master_addr", "master_port"):
            rows.append((f"  {key}", str(launch[key])))
        if launch.get("job_key"):
            rows.append(("  rendezvous", f"derived from job {launch['job_key']} (docs/launchers.md)"))
        for key, value in launch["variables"].items():
            rows.append((f"  ${key}", value))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _cmd_env(args: argparse.Namespace) -> int:
    """Exit 1 when the launcher variables are invalid (the launcher ERROR row): scripts can test it."""
    info = collect_env()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_env(info)
    return 1 if "error" in info["launch"] else 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ratlib.doctor import cli_main

    return cli_main(args)


def _cmd_coco(args: argparse.Namespace) -> int:
    from ratlib.coco_paths.cli import cli_main

    return cli_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``ratlib`` command's parser: ``env``, ``doctor`` and ``coco``."""
    parser = argparse.ArgumentParser(prog="ratlib", description="Rank-safe training utilities for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("env", help="versions, GPUs and the launcher environment detected")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("doctor", help="preflight checks over configs, data, package layout and environment")
    p.add_argument("paths", nargs="+", metavar="PATH", help="config files or project folders")
    p.add_argument("--json", action="store_true", help="print findings as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument(
        "--fix",
        action="store_true",
        help="append missing config sections with defaults (writes FILE.bak first), create missing __init__.py",
    )
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="ranks the run will use (global batch, ZeRO)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device the run will use; auto: this machine's (imports torch)",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="GPU memory of the training machines, when checking from a machine without them",
    )
    p.add_argument(
        "--schema",
        default=None,
        metavar="MODULE:CLASS",
        help="validate with a project's ExperimentConfig subclass, e.g. myproj.config:SegConfig",
    )
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("coco", help="resolve COCO annotation and image paths, or say what is there")
    p.add_argument("root", help="dataset root")
    p.add_argument("split", help="split, any spelling: train, train2017, 2017_train, instances_val2017.json, ...")
    p.add_argument("--year", default=None, help="year when the split has none (2014 or 2017)")
    p.add_argument("--kind", default="instances", help="instances, person_keypoints, captions, panoptic, image_info")
    p.add_argument("--layout", default="auto", help="auto, coco, roboflow, detectron2")
    p.add_argument("--check", action="store_true", help="also validate the annotation file's contents")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=_cmd_coco)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ratlib`` command (``argv``: its arguments, default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
