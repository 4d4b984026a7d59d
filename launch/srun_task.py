"""``python -m launch.srun_task script.py [args]``: one srun task becomes a torch-engine worker.

    export MASTER_PORT="$(python -m launch.srun_task --free-port)"   # in the batch script, on node 1
    srun --mpi=none python -m launch.srun_task train.py --steps 100

Sets torchrun's variables from the task's SLURM ones (:func:`launch.slurm_env.torch_env_from_slurm`)
and ``DISTRIB_ENGINE=torch``, then becomes ``python script.py args`` (exec: Slurm's signals, such
as SIGUSR2 before the time limit, reach the script itself). For Horovod, srun starts the script
directly (``srun --mpi=pmix python script.py``): its MPI controller learns its place from PMIx.
A bad or missing variable is one line on stderr and exit status 2.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from launch.slurm_env import torch_env_from_slurm
from launch.torch_spawn import free_port

PROG = "python -m launch.srun_task"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--free-port"]:
        print(free_port())
        return 0
    if not argv or argv[0].startswith("-"):
        sys.stderr.write(f"{PROG}: error: give the training script: {PROG} script.py [args], or --free-port\n")
        return 2
    try:
        variables = torch_env_from_slurm(os.environ)
    except ValueError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    os.environ.update(variables)
    os.execv(sys.executable, [sys.executable, *argv])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
