"""The command lines that start 1 or N workers for each implementation, and running them.

distrib jobs go through the project launcher (``python -m launch``) when it exists, else
straight through mpirun / horovodrun with the same controller.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MPIRUN_ARGS = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
FORWARDED = ("OMP_NUM_THREADS", "PYTHONPATH", "DISTRIB_REDUCER", "DISTRIB_BUCKET_MB",
             "MASTER_ADDR", "MASTER_PORT", "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD")


class BenchError(RuntimeError):
    """A benchmark worker failed; the message holds its command and the tail of its output."""


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """One intra-op thread per worker, the repository importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.update(extra or {})
    return env


def has_project_launcher() -> bool:
    return (REPO / "launch" / "__main__.py").is_file()


def mpirun(np_: int, argv: Sequence[str], env: Dict[str, str]) -> List[str]:
    fwd = [a for k in FORWARDED if k in env for a in ("-x", k)]
    return ["mpirun", "-np", str(np_), *MPIRUN_ARGS, *fwd, PY, *argv]


def horovodrun(np_: int, argv: Sequence[str], controller: str) -> List[str]:
    if controller == "gloo":
        return [str(Path(PY).with_name("horovodrun")), "-np", str(np_), "--gloo", PY, *argv]
    return [str(Path(PY).with_name("horovodrun")), "-np", str(np_), "--mpi",
            "--mpi-args=" + " ".join(MPIRUN_ARGS), PY, *argv]


def distrib_cmd(np_: int, argv: Sequence[str], controller: str, env: Dict[str, str]) -> List[str]:
    """The project launcher, or (until it exists) the same controller started directly."""
    if has_project_launcher():
        return [PY, "-m", "launch", "-np", str(np_), "--controller", controller, *argv]
    return mpirun(np_, argv, env) if controller == "mpi" else horovodrun(np_, argv, controller)


def horovod_cmd(np_: int, argv: Sequence[str], controller: str, env: Dict[str, str]) -> List[str]:
    """A plain Horovod job on the same controller as distrib's."""
    return mpirun(np_, argv, env) if controller == "mpi" else horovodrun(np_, argv, controller)


def torchrun_cmd(np_: int, argv: Sequence[str]) -> List[str]:
    return [str(Path(PY).with_name("torchrun")), "--nproc_per_node", str(np_),
            "--master_port", str(free_port()), *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: Sequence[str], env: Dict[str, str], timeout: float = 300) -> float:
    """Run a job to completion; returns its wall time in seconds; raises BenchError on failure."""
    t = time.time()
    try:
        proc = subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.time() - t
