"""Device and thread selection: the GPU paths tested with a faked device count."""
import pytest
import torch

from distrib.context import Context, DistribSetupError, select_device, threads_per_worker


@pytest.mark.parametrize("local_rank,count,env,expected", [
    (0, 0, {}, "cpu"),
    (3, 0, {"CUDA_VISIBLE_DEVICES": "0,1"}, "cpu"),
    (0, 4, {}, "cuda:0"),
    (3, 4, {}, "cuda:3"),
    (1, 8, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, "cuda:1"),
    # scheduler gave each process its own single GPU (e.g. srun --gpus-per-task=1)
    (3, 1, {"CUDA_VISIBLE_DEVICES": "3"}, "cuda:0"),
    (2, 1, {}, "cuda:0"),
])
def test_select_device(local_rank, count, env, expected):
    assert select_device(local_rank, count, env) == torch.device(expected)


def test_more_workers_than_gpus_is_a_clear_error():
    with pytest.raises(DistribSetupError, match="local rank 4 has no GPU: this node shows 4 GPUs"):
        select_device(4, 4, {})


@pytest.mark.parametrize("cpus,local,env,expected", [
    (2, 2, {}, 1), (16, 4, {}, 4), (2, 4, {}, 1), (8, 1, {}, 8), (8, 2, {"OMP_NUM_THREADS": "3"}, 3),
    (8, 2, {"OMP_NUM_THREADS": "junk"}, 4),
])
def test_threads_per_worker(cpus, local, env, expected):
    assert threads_per_worker(cpus, local, env) == expected


def test_context_validates_ranks():
    cpu = torch.device("cpu")
    assert Context(0, 2, 0, 2, 0, 1, cpu, "mpi").is_main
    assert not Context(1, 2, 1, 2, 0, 1, cpu, "mpi").is_main
    with pytest.raises(ValueError, match="rank 2 is outside a world of size 2"):
        Context(2, 2, 0, 2, 0, 1, cpu, "mpi")
    with pytest.raises(ValueError, match="local rank 2 is outside local size 2"):
        Context(1, 2, 2, 2, 0, 1, cpu, "mpi")
