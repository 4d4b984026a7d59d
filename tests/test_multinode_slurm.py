"""Slurm across two hosts: a slurmd on node1 and node2 of the namespace cluster (tests/nodes.py,
tests/slurm_cluster.py's MultiNodeSlurm). Each node has 1 CPU and 1 fake GPU, so a 2-node job
runs one task per node, and Horovod's traffic crosses the link between the hosts."""
import json
from pathlib import Path

import pytest

from tests.helpers import SCRIPTS, TINY_LM_MODEL
from tests.nodes import nodes  # noqa: F401 - the session's cluster
from tests.slurm_cluster import REPO, slurm_nodes  # noqa: F401 - Slurm on node1, node2
from tests.test_launch_run import ranks_reporting, torch_workers

pytestmark = [pytest.mark.timeout(400), pytest.mark.slurm, pytest.mark.multiprocess]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=00:10:00"]
TINY_LM = [*TINY_LM_MODEL, "--warmup", "2", "--log-every", "1", "--eval-every", "0"]


@pytest.fixture
def shared(nodes, request):
    path = nodes.root / "work" / request.node.name
    path.mkdir(parents=True)
    return path


def records(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def steps(run_dir: Path) -> list:
    return [r["step"] for r in records(run_dir) if "step" in r and "event" not in r]


def test_multi_node_sbatch_trains_across_two_hosts_and_a_preempted_job_resumes(slurm_nodes, shared):
    """`sbatch --nodes=2 slurm/multi_node.sbatch`: train_lm on node1 and node2 with srun --mpi=pmix.
    USR2 to every process of the job mid-run: it checkpoints, rank 0 requeues it, and the
    requeued 2-node job resumes; every step exactly once, world size 2 throughout."""
    log, run_dir, total = shared / "job.out", shared / "run", 150
    job_id = slurm_nodes.sbatch(REPO / "slurm" / "multi_node.sbatch", "--steps", str(total), *TINY_LM,
                                sbatch_args=[*TWO_NODES, f"--output={log}"],
                                env={"RUN_DIR": str(run_dir), "CHECKPOINT_EVERY": "50"})
    slurm_nodes.wait_until(lambda: len(steps(run_dir)) >= 3, 200, "3 training steps", job_id, log)
    slurm_nodes.scancel(job_id, "--signal=USR2", "--full")
    slurm_nodes.wait_requeued(job_id)
    job = slurm_nodes.wait(job_id, timeout=250, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", "0:0", 1), text
    assert f"job {job_id} (restart 0) on node[1-2]: 2 tasks" in text, text
    assert f"job {job_id} (restart 1) on node[1-2]: 2 tasks" in text, text
    assert steps(run_dir) == list(range(1, total + 1)), text
    assert {r["world_size"] for r in records(run_dir) if "world_size" in r} == {2}
    preempted = [r["step"] for r in records(run_dir) if r.get("event") == "preempted"]
    assert len(preempted) == 1 and 1 <= preempted[0] < total
    assert (run_dir / "model.pt").exists()


def test_the_launcher_inside_a_two_node_allocation_reaches_the_other_node(slurm_nodes, shared):
    """`python -m launch train_lm.py` with no -np/-H in a 2-node, 1-task-per-node job: hosts from
    the allocation, MPI's daemon on node2 started through srun (no ssh), reports from node2 back
    to the launcher on node1."""
    log, run_dir, script = shared / "job.out", shared / "run", shared / "launch.sbatch"
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      f"python -m launch --verbose examples/train_lm.py --steps 4 {' '.join(TINY_LM)} "
                      f"--checkpoint-every 0 --run-dir {run_dir}\n")
    job_id = slurm_nodes.sbatch(script, sbatch_args=[*TWO_NODES, f"--output={log}"])
    job = slurm_nodes.wait(job_id, timeout=250, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), text
    assert "hosts: node1:1, node2:1 (remote); np: 2" in text, text
    assert "rank 1 on node2 ended: exit code 0" in text and "rank 0 on node1 ended: exit code 0" in text, text
    assert steps(run_dir) == [1, 2, 3, 4]
    assert {r["world_size"] for r in records(run_dir) if "world_size" in r} == {2}


def test_torch_engine_across_two_nodes_by_srun_and_by_the_launcher(slurm_nodes, shared):
    """ENGINE=torch: slurm/multi_node.sbatch starts one task per node through launch.srun_task;
    then, in the same kind of allocation, `python -m launch --engine torch` takes node1 and node2
    from it and starts node2's worker over ssh. Both times rank 1 runs on node2 and both meet at
    node1 (where the batch script, the launcher and rank 0 run)."""
    log = shared / "srun.out"
    job_id = slurm_nodes.sbatch(REPO / "slurm" / "multi_node.sbatch", sbatch_args=[*TWO_NODES, f"--output={log}"],
                                env={"ENGINE": "torch", "SCRIPT": str(SCRIPTS / "launch_allreduce.py"),
                                     "RUN_DIR": str(shared / "run")})
    job = slurm_nodes.wait(job_id, timeout=250, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), text
    workers = torch_workers(text)
    assert {r: w[:3] for r, w in workers.items()} == {0: (0, 1, "node1"), 1: (0, 1, "node2")}, text
    assert {w[3].split(":")[0] for w in workers.values()} == {"node1"}, text
    assert ranks_reporting(text) == {0: (2, 3.0, "None"), 1: (2, 3.0, "None")}, text

    log, script = shared / "launch.out", shared / "launch.sbatch"
    script.write_text(f"#!/bin/bash\nset -euo pipefail\npython -m launch --verbose --engine torch "
                      f"{SCRIPTS / 'launch_allreduce.py'}\n")
    job_id = slurm_nodes.sbatch(script, sbatch_args=[*TWO_NODES, f"--output={log}"])
    job = slurm_nodes.wait(job_id, timeout=250, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), text
    assert "hosts: node1:1, node2:1 (remote); np: 2" in text, text
    workers = torch_workers(text)
    assert {r: w[:3] for r, w in workers.items()} == {0: (0, 1, "node1"), 1: (0, 1, "node2")}, text
    assert "rank 1 on node2 ended: exit code 0" in text and "rank 0 on node1 ended: exit code 0" in text, text
    assert ranks_reporting(text) == {0: (2, 3.0, "0"), 1: (2, 3.0, "0")}, text
