"""Table tests for launch/slurm_env.py: pure parsers of SLURM variables."""
import re

import pytest

from launch.slurm_env import (SlurmJobEnvironment, expand_nodelist, expand_tasks_per_node,
                              gpus_per_node, hosts_from_slurm, in_slurm_job, parse_gpu_count, torch_env_from_slurm)


@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-04,07],cpu-2", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu-2"]),
    ("node[1-3]-ib", ["node1-ib", "node2-ib", "node3-ib"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[1,3],b[2-3],c", ["a1", "a3", "b2", "b3", "c"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("host-[5]", ["host-5"]),
    ("x,x", ["x"]),
    ("  node[1-2] ", ["node1", "node2"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("node[1-3", "never closed"),
    ("node1-3]", "without"),
    ("node[[1-2]]", "nested"),
    ("node[3-1]", "backwards"),
    ("node[a-b]", "bad range"),
    ("node[]", "bad range"),
    ("node[1-2],,x", "empty entry"),
    ("node[1-2],", "empty entry"),
    ("node 1", "invalid characters"),
])
def test_expand_nodelist_rejects(text, message):
    with pytest.raises(ValueError, match=message) as info:
        expand_nodelist(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, counts", [
    ("4", [4]),
    ("2(x3),1", [2, 2, 2, 1]),
    ("1(x2)", [1, 1]),
    ("3,2(x2)", [3, 2, 2]),
])
def test_expand_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["", "2(x)", "2x3", "a", "2(x0)", "2,,1", "-1"])
def test_expand_tasks_per_node_rejects(text):
    with pytest.raises(ValueError, match="tasks per node"):
        expand_tasks_per_node(text)


@pytest.mark.parametrize("text, count", [
    ("4", 4), ("gpu:4", 4), ("a100:4", 4), ("gpu:a100:4", 4), ("a100:2,v100:2", 4), ("gpu:2(IDX:0-1)", 2),
])
def test_parse_gpu_count(text, count):
    assert parse_gpu_count(text) == count


@pytest.mark.parametrize("text", ["", "gpu", "gpu:", "a100:x"])
def test_parse_gpu_count_rejects(text):
    with pytest.raises(ValueError, match="SLURM_GPUS_PER_NODE"):
        parse_gpu_count(text)


@pytest.mark.parametrize("env, count", [
    ({}, 0),
    ({"SLURM_GPUS_ON_NODE": "2"}, 2),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "gpu:4"}, 8),
])
def test_gpus_per_node(env, count):
    assert gpus_per_node(env) == count


TASK_ENV = {
    "SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "lm", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8", "SLURM_NODEID": "2", "SLURM_JOB_NUM_NODES": "4",
    "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_GPUS_ON_NODE": "2",
    "SLURM_RESTART_COUNT": "3",
}


def test_job_environment_from_task_env():
    job = SlurmJobEnvironment.from_env(TASK_ENV)
    assert job == SlurmJobEnvironment(
        job_id="123", job_name="lm", global_rank=5, local_rank=1, num_tasks=8, node_rank=2, num_nodes=4,
        nodes=("gpu01", "gpu02", "gpu03", "gpu04"), tasks_per_node=(2, 2, 2, 2),
        restart_count=3, gpus_on_node=2)
    assert job.requeue_id == "123"
    with pytest.raises(Exception):
        job.global_rank = 0  # frozen


def test_job_environment_array_and_defaults():
    job = SlurmJobEnvironment.from_env({"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "129",
                                        "SLURM_ARRAY_TASK_ID": "1"})
    assert (job.global_rank, job.local_rank, job.restart_count, job.num_tasks) == (0, 0, 0, None)
    assert job.requeue_id == "129_1"


@pytest.mark.parametrize("env, message", [
    ({}, "SLURM_JOB_ID is not set"),
    ({"SLURM_JOB_ID": "1", "SLURM_PROCID": "x"}, "SLURM_PROCID='x'"),
    ({"SLURM_JOB_ID": "1", "SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "outside SLURM_NTASKS"),
    ({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a[1-2]", "SLURM_TASKS_PER_NODE": "1(x3)"}, "2 nodes"),
    ({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a[1-"}, "never closed"),
    ({"SLURM_JOB_ID": "1", "SLURM_RESTART_COUNT": "-1"}, "SLURM_RESTART_COUNT"),
])
def test_job_environment_rejects(env, message):
    with pytest.raises(ValueError, match=message):
        SlurmJobEnvironment.from_env(env)


@pytest.mark.parametrize("env, hosts", [
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "4(x2)"}, [("n1", 4), ("n2", 4)]),
    ({"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1"}, [("n1", 2), ("n2", 2), ("n3", 1)]),
    # one launcher task per node, 4 GPUs each: one worker per GPU
    ({"SLURM_JOB_NODELIST": "g[1-2]", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "4"},
     [("g1", 4), ("g2", 4)]),
    ({"SLURM_JOB_NODELIST": "g1", "SLURM_GPUS_PER_NODE": "a100:8"}, [("g1", 8)]),
    ({"SLURM_JOB_NODELIST": "c[1-2]", "SLURM_NTASKS_PER_NODE": "3"}, [("c1", 3), ("c2", 3)]),
    ({"SLURM_JOB_NODELIST": "c1"}, [("c1", 1)]),
])
def test_hosts_from_slurm(env, hosts):
    assert hosts_from_slurm({"SLURM_JOB_ID": "7", **env}) == hosts


def test_hosts_from_slurm_needs_nodelist():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        hosts_from_slurm({"SLURM_JOB_ID": "7"})
    assert not in_slurm_job({}) and in_slurm_job({"SLURM_JOB_ID": "7"})


# An srun task of a 2-node step with 2 tasks on the first node and 1 on the second.
SRUN_TASK = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
             "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "gpu[07-08]",
             "SLURM_JOB_NODELIST": "gpu[01-08]", "SLURM_STEP_TASKS_PER_NODE": "2,1",
             "SLURM_TASKS_PER_NODE": "1(x8)", "MASTER_PORT": "40123"}


@pytest.mark.parametrize("changes, expected", [
    ({}, {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "gpu07"}),
    # without the step's own variables: the job's
    ({"SLURM_STEP_NUM_TASKS": None, "SLURM_STEP_NODELIST": None, "SLURM_STEP_TASKS_PER_NODE": None,
      "SLURM_NODEID": "7", "SLURM_PROCID": "7"},
     {"RANK": "7", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "gpu01"}),
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"},
     {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07"}),
])
def test_torch_env_from_an_srun_task(changes, expected):
    env = {k: v for k, v in {**SRUN_TASK, **changes}.items() if v is not None}
    assert torch_env_from_slurm(env) == {**expected, "MASTER_PORT": "40123", "DISTRIB_ENGINE": "torch"}


@pytest.mark.parametrize("changes, message", [
    ({"SLURM_PROCID": None}, "SLURM_PROCID is not set: not inside an srun task"),
    ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID='x' is not a non-negative integer"),
    ({"SLURM_NODEID": "2"}, "do not describe the same nodes"),
    ({"SLURM_STEP_TASKS_PER_NODE": "3"}, "do not describe the same nodes"),
    ({"MASTER_PORT": None}, "MASTER_PORT='' is not a port: export MASTER_PORT="),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a port"),
])
def test_torch_env_from_a_broken_srun_task_is_one_line(changes, message):
    env = {k: v for k, v in {**SRUN_TASK, **changes}.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        torch_env_from_slurm(env)
    assert "\n" not in str(info.value)
