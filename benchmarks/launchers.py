"""The command lines that start N workers for each implementation, and running them.

The Open MPI flags are the project launcher's own (``launch.plan``): "tuned" plain Horovod gets
exactly what ``python -m launch`` gives distrib, so a difference between the two is the library's.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from launch.plan import NO_BINDING, OMPI_MCA

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ROOT_ARGS = ["--allow-run-as-root", "--oversubscribe"]  # root needs the first; 2 slots on 2 cores the second
MPIRUN_ARGS = [*ROOT_ARGS, "--bind-to", "none"]
FORWARDED = ("OMP_NUM_THREADS", "PYTHONPATH", "DISTRIB_REDUCER", "DISTRIB_BUCKET_MB",
             "MASTER_ADDR", "MASTER_PORT", "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD")


class BenchError(RuntimeError):
    """A benchmark worker failed; the message holds its command and the tail of its output."""


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """One intra-op thread per worker, the repository importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.update(extra or {})
    return env


def _forward(env: Dict[str, str]) -> List[str]:
    return [a for k in FORWARDED if k in env for a in ("-x", k)]


def mpirun(np_: int, argv: Sequence[str], env: Dict[str, str]) -> List[str]:
    """Bare mpirun with Open MPI's defaults (busy polling): raw mpi4py references."""
    return ["mpirun", "-np", str(np_), *MPIRUN_ARGS, *_forward(env), PY, *argv]


def launcher_mca(yield_when_idle: bool = True) -> List[str]:
    """The launcher's ``-mca`` flags, optionally without ``mpi_yield_when_idle``."""
    mca = list(OMPI_MCA)
    if not yield_when_idle:
        at = mca.index("mpi_yield_when_idle")
        del mca[at - 1:at + 2]
    return mca


def tuned_mpirun(np_: int, argv: Sequence[str], env: Dict[str, str], yield_when_idle: bool = True) -> List[str]:
    """mpirun with the project launcher's flags (binding, PML, yield), without its worker shim."""
    return ["mpirun", *ROOT_ARGS, "-np", str(np_), *NO_BINDING, *launcher_mca(yield_when_idle),
            *_forward(env), PY, *argv]


def horovodrun(np_: int, argv: Sequence[str]) -> List[str]:
    """Plain ``horovodrun --mpi`` as a Horovod user types it (root needs the mpirun flags)."""
    return [HOROVODRUN, "-np", str(np_), "--mpi",
            "--mpi-args=" + " ".join(ROOT_ARGS), PY, *argv]


def launch(np_: int, argv: Sequence[str], controller: str = "mpi", hosts: Optional[str] = None) -> List[str]:
    """The project launcher, as users start distrib."""
    return [PY, "-m", "launch", "-np", str(np_), "--controller", controller, *(("-H", hosts) if hosts else ()), *argv]


TORCHRUN = str(Path(PY).with_name("torchrun"))
HOROVODRUN = str(Path(PY).with_name("horovodrun"))


def torchrun(np_: int, argv: Sequence[str]) -> List[str]:
    return [TORCHRUN, "--nproc_per_node", str(np_), "--master_port", str(free_port()), *argv]


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
