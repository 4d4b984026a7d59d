"""distrib.init() tunes Horovod's cycle time only where a cycle is cheap: MPI on one host."""
import pytest

from distrib.context import SINGLE_HOST_MPI_CYCLE_MS, horovod_env_defaults

FAST = {"HOROVOD_CYCLE_TIME": SINGLE_HOST_MPI_CYCLE_MS}


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, FAST),        # mpirun, one host
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, {}),          # mpirun, two hosts
    ({"SLURM_NNODES": "1"}, FAST),                                                   # srun per task, one node
    ({"SLURM_NNODES": "2"}, {}),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
      "HOROVOD_CYCLE_TIME": "5"}, {}),                                               # the user's choice wins
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
      "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1"}, {}),                             # Gloo controller
    ({}, {}),                                                                        # a single process
])
def test_cycle_time_default(env, expected):
    assert horovod_env_defaults(env) == expected
