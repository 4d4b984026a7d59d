"""Device and thread selection: the GPU paths tested with a faked device count."""
import pytest
import torch

from distrib.context import (Context, DistribSetupError, select_device, srun_problem_after_init,
                             srun_problem_before_init, threads_per_worker)


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


@pytest.mark.parametrize("local_size", [2, 4, 8])
def test_each_local_rank_pinned_to_its_own_gpu(local_size):
    """One worker per GPU, with or without a CUDA_VISIBLE_DEVICES that lists them all."""
    everything = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(local_size))}
    for env in ({}, everything):
        devices = [select_device(r, local_size, env, local_size=local_size) for r in range(local_size)]
        assert devices == [torch.device("cuda", r) for r in range(local_size)]


def test_visible_devices_subset_renumbers_from_zero():
    # CUDA_VISIBLE_DEVICES=4,5,6,7: CUDA shows 4 devices, numbered 0-3 inside the process
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert [select_device(r, 4, env, local_size=4) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-8d5a0c1e,GPU-1b2c3d4e"}
    assert select_device(1, 2, uuids, local_size=2) == torch.device("cuda", 1)


def test_visible_devices_fewer_than_local_ranks_is_a_clear_error_on_every_rank():
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}  # 4 workers on the node, 2 GPUs left visible
    messages = set()
    for rank in range(4):
        with pytest.raises(DistribSetupError) as info:
            select_device(rank, 2, env, local_size=4)
        messages.add(str(info.value).split(": ", 1)[1])
        assert "\n" not in str(info.value)
    assert messages == {"CUDA sees 2 GPUs (CUDA_VISIBLE_DEVICES='0,1'); start at most 2 workers per node "
                        "(-H host:2, or --ntasks-per-node=2 under Slurm) or list one GPU per worker in "
                        "CUDA_VISIBLE_DEVICES"}
    with pytest.raises(DistribSetupError, match="^local rank 3 has no GPU: CUDA sees 2 GPUs"):
        select_device(3, 2, env, local_size=4)
    with pytest.raises(DistribSetupError, match="^4 workers on this node, more than its GPUs: CUDA sees 2"):
        select_device(0, 2, env, local_size=4)


def test_more_workers_than_gpus_without_visible_devices_fails_on_rank_0_too():
    with pytest.raises(DistribSetupError, match="^8 workers on this node, more than its GPUs: this node shows 4 GPUs; "
                                                r"start at most 4 workers per node \(-H host:4"):
        select_device(0, 4, {}, local_size=8)
    assert select_device(3, 4, {}, local_size=4) == torch.device("cuda", 3)


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


SRUN_TASK = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4"}


@pytest.mark.parametrize("env, size, before, after", [
    ({**SRUN_TASK, "PMIX_RANK": "1"}, 4, None, None),                          # srun --mpi=pmix: fine
    ({**SRUN_TASK, "PMI_RANK": "1"}, 4, None, None),                           # --mpi=pmi2
    (SRUN_TASK, 1, "srun started 4 tasks without an MPI plugin", "Horovod sees a world of 1"),
    ({**SRUN_TASK, "PMIX_RANK": "1"}, 1, None, "srun started 4 tasks but Horovod sees a world of 1"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, 1, None, None),       # srun -n 1, or a batch step
    ({**SRUN_TASK, "OMPI_COMM_WORLD_SIZE": "8"}, 8, None, None),               # mpirun's worker inside a step
    ({**SRUN_TASK, "HOROVOD_RANK": "3"}, 2, None, None),                       # horovodrun --gloo / elastic
    ({"SLURM_STEP_NUM_TASKS": "4"}, 1, None, None),                            # not a task of the step
    ({}, 1, None, None),
])
def test_srun_step_problems(env, size, before, after):
    for found, expected in ((srun_problem_before_init(env), before), (srun_problem_after_init(env, size), after)):
        if expected is None:
            assert found is None
        else:
            assert expected in found and found.endswith("inside the allocation") and "--mpi=pmix" in found


# -- workers that would share one physical GPU (compared by UUID across ranks) --------------------
def _gpu(uuid, host="node1", device="cuda:0"):
    from distrib.context import GpuIdentity
    return GpuIdentity(uuid, "NVIDIA H200", device, host)


@pytest.mark.parametrize("gpus,nccl,env,refused", [
    ([_gpu("GPU-a"), _gpu("GPU-a")], True, {}, "ranks 0, 1 would share one GPU (NVIDIA H200 GPU-a, cuda:0 on node1)"),
    ([_gpu("GPU-a"), _gpu("GPU-b", device="cuda:1")], True, {}, None),
    # each worker sees its own single GPU as cuda:0 (CUDA_VISIBLE_DEVICES per worker): different UUIDs
    ([_gpu("GPU-a"), _gpu("GPU-b")], True, {}, None),
    ([_gpu("GPU-a"), _gpu("GPU-a")], False, {}, None),                        # no NCCL: through host memory
    ([_gpu("GPU-a"), _gpu("GPU-a")], True, {"DISTRIB_SHARE_GPU": "1"}, None),  # asked for explicitly
    ([_gpu("GPU-a"), _gpu("GPU-a")], True, {"DISTRIB_SHARE_GPU": "0"}, "ranks 0, 1 would share one GPU"),
    ([None, None], True, {}, None),                                           # CPU workers
    ([_gpu("GPU-a", "a"), _gpu("GPU-b", "a", "cuda:1"), _gpu("GPU-c", "b"), _gpu("GPU-c", "b"), _gpu("GPU-c", "b")],
     True, {}, "ranks 2, 3, 4 would share one GPU (NVIDIA H200 GPU-c, cuda:0 on b) and NCCL refuses two ranks on "
               "one GPU; start one worker per GPU (b shows the workers 1: -H b:1, or --ntasks-per-node=1 under Slurm)"),
])
def test_workers_sharing_a_gpu_are_refused_in_one_line_with_the_fix(gpus, nccl, env, refused):
    from distrib.context import gpu_sharing_problem
    problem = gpu_sharing_problem(gpus, nccl=nccl, env=env)
    if refused is None:
        assert problem is None
    else:
        assert problem.startswith(refused) and "\n" not in problem
        assert "DISTRIB_SHARE_GPU=1" in problem and "without GPU operations" in problem

