"""End-to-end tests on a real one-node Slurm cluster (tests/slurm_cluster.py).

Every job is submitted with sbatch and runs its tasks with `srun --mpi=pmix`: Horovod's MPI
controller starts from PMIx. The node has 2 CPUs and 2 fake GPUs, so each job runs 2 tasks.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.slurm import main as generate_sbatch
from tests.helpers import TINY_LM_MODEL
from tests.test_launch_run import ranks_reporting, torch_workers
from tests.slurm_cluster import REPO, slurm_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.timeout(300), pytest.mark.slurm]

STANDIN = "tests/scripts/slurm_train.py"
# A tiny train_lm: fast on 2 shared cores, one metrics line per step.
TINY_LM = [*TINY_LM_MODEL, "--warmup", "2", "--log-every", "1", "--eval-every", "0"]
# The checked-in scripts ask for 4 GPUs and 8 CPUs per task; the test node has 2 and 2.
SMALL_NODE = ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=00:10:00"]


def records(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def steps(run_dir: Path):
    """Step numbers of the per-step records, in file order."""
    return [r["step"] for r in records(run_dir) if "step" in r and "event" not in r]


def generated_script(tmp_path: Path, *args: str) -> Path:
    """``python -m launch.slurm ARGS`` written to a file (the generator's real output)."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert generate_sbatch(list(args)) == 0
    path = tmp_path / "job.sbatch"
    path.write_text(out.getvalue())
    return path


def test_srun_per_task_starts_horovod_over_pmix(slurm_cluster, tmp_path):
    """(c) the generator's script: 2 tasks under `srun --mpi=pmix`, Horovod ranks 0 and 1 of 2 over MPI."""
    script = generated_script(tmp_path, "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "00:05:00",
                              "--", STANDIN, "--steps", "5")
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    job_id = slurm_cluster.sbatch(script, "--run-dir", str(run_dir), sbatch_args=[f"--output={log}"])
    job = slurm_cluster.wait(job_id, timeout=120, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), text
    for rank in (0, 1):
        assert f"rank {rank} size 2 local_rank {rank} controller mpi procid {rank}" in text, text
    assert steps(run_dir) == [1, 2, 3, 4, 5]
    assert {r["sum"] for r in records(run_dir) if "sum" in r} == {3.0}  # 1 + 2: both ranks in the allreduce


def test_srun_per_task_starts_torch_engine_workers(slurm_cluster, tmp_path):
    """The generator's --engine torch script: srun starts 2 tasks through launch.srun_task, each a
    torch.distributed worker (ranks, local ranks, the port the batch script picked), allreduce right."""
    script = generated_script(tmp_path, "--engine", "torch", "--tasks-per-node", "2", "--cpus-per-task", "1",
                              "--time", "00:05:00", "--", "tests/scripts/launch_allreduce.py")
    log = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch(script, sbatch_args=[f"--output={log}"])
    job = slurm_cluster.wait(job_id, timeout=120, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), text
    workers = torch_workers(text)
    assert {rank: w[:2] for rank, w in workers.items()} == {0: (0, 2), 1: (1, 2)}, text
    assert len({w[3] for w in workers.values()}) == 1, text  # one MASTER_ADDR:MASTER_PORT for both
    assert ranks_reporting(text) == {0: (2, 3.0, "None"), 1: (2, 3.0, "None")}, text


def test_standin_preempted_requeued_resumed(slurm_cluster, tmp_path):
    """(b, stand-in) SIGUSR2 to the batch shell only (it forwards to srun) -> checkpoint, requeue,
    resume; preempted twice, it still makes progress each time, and no step is lost or repeated."""
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    job_id = slurm_cluster.sbatch(REPO / "slurm" / "requeue.sbatch", "--steps", "16", "--step-sleep", "0.2",
                                  sbatch_args=[*SMALL_NODE, f"--output={log}"],
                                  env={"SCRIPT": STANDIN, "RUN_DIR": str(run_dir)})
    _preempt_and_finish(slurm_cluster, job_id, run_dir, log, "--batch", total=16, preemptions=2)


def test_torch_engine_lm_preempted_requeued_resumed(slurm_cluster, tmp_path):
    """ENGINE=torch slurm/requeue.sbatch: examples/train_lm.py on 2 torch.distributed tasks;
    SIGUSR2 to the batch shell -> every task stops at the same step, checkpoints, rank 0 requeues,
    and the requeued job (a new MASTER_PORT) resumes: every step once, world size 2 throughout."""
    log, run_dir, total = tmp_path / "job.out", tmp_path / "run", 150
    job_id = slurm_cluster.sbatch(REPO / "slurm" / "requeue.sbatch", "--steps", str(total), *TINY_LM,
                                  sbatch_args=[*SMALL_NODE, f"--output={log}"],
                                  env={"ENGINE": "torch", "SCRIPT": "examples/train_lm.py", "RUN_DIR": str(run_dir),
                                       "CHECKPOINT_EVERY": "1000"})
    _preempt_and_finish(slurm_cluster, job_id, run_dir, log, "--batch", total=total)
    assert {r["world_size"] for r in records(run_dir) if "world_size" in r} == {2}


def _preempt_and_finish(cluster, job_id, run_dir, log, scancel_mode, total, preemptions=1):
    for restart in range(preemptions):
        # a few more steps in each run of the job before it is preempted again: progress
        reached = len(steps(run_dir)) + 3
        cluster.wait_until(lambda: len(steps(run_dir)) >= reached, 120, f"{reached} training steps", job_id, log)
        cluster.scancel(job_id, "--signal=USR2", scancel_mode)
        cluster.wait_requeued(job_id, restarts=restart + 1)
    job = cluster.wait(job_id, timeout=150, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", "0:0", preemptions), text
    got = steps(run_dir)
    assert got == list(range(1, total + 1)), f"steps lost or repeated: {got}\n{text}"
    preempted = [r["step"] for r in records(run_dir) if r.get("event") == "preempted"]
    assert len(preempted) == preemptions and preempted == sorted(set(preempted)), records(run_dir)
    assert 1 <= preempted[0] and preempted[-1] < total, records(run_dir)
    # --open-mode=append: every run of the job wrote to the same log.
    for restart in range(preemptions + 1):
        assert f"job {job_id} (restart {restart})" in text, text
    for restart in range(1, preemptions + 1):
        assert f"requeued job {job_id} (restart {restart} of at most 50)" in text, text


def test_single_node_sbatch_trains_lm(slurm_cluster, tmp_path):
    """(a) slurm/single_node.sbatch runs examples/train_lm.py on 2 tasks to the last step."""
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    job_id = slurm_cluster.sbatch(REPO / "slurm" / "single_node.sbatch", "--steps", "12", *TINY_LM,
                                  sbatch_args=[*SMALL_NODE, f"--output={log}"],
                                  env={"RUN_DIR": str(run_dir), "CHECKPOINT_EVERY": "5"})
    job = slurm_cluster.wait(job_id, timeout=180, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), text
    assert steps(run_dir) == list(range(1, 13)), text
    assert (run_dir / "model.pt").exists()


SRUN_WITHOUT_PMIX = """\
#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:05:00
set -euo pipefail
# The batch step itself is one process: distrib must not mistake it for a broken srun step.
python -c 'import distrib; ctx = distrib.init(); print(f"batch step: rank {ctx.rank} of {ctx.size}")'
srun --mpi=none python "$@"
"""


def test_srun_without_pmix_fails_in_one_line_instead_of_training_twice(slurm_cluster, tmp_path):
    """`srun --mpi=none`: the tasks cannot find each other (Open MPI would abort each with a page
    of text). distrib.init() refuses on every task in one line that names the fix."""
    script = tmp_path / "job.sbatch"
    script.write_text(SRUN_WITHOUT_PMIX)
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    job_id = slurm_cluster.sbatch(script, str(REPO / "examples" / "train_lm.py"), "--steps", "3", *TINY_LM,
                                  "--run-dir", str(run_dir), sbatch_args=[f"--output={log}"])
    job = slurm_cluster.wait(job_id, timeout=120, output=log)
    text = log.read_text()
    assert job.state == "FAILED", text
    assert "batch step: rank 0 of 1" in text, text
    problem = ("train_lm: error: srun started 2 tasks without an MPI plugin, so they cannot join each other; "
               "run srun --mpi=pmix")
    assert text.count(problem) == 2 and "Traceback" not in text, text
    assert not (run_dir / "metrics.jsonl").exists()


def test_requeue_sbatch_lm_preempted_requeued_resumed(slurm_cluster, tmp_path):
    """(b) slurm/requeue.sbatch with train_lm: `scancel --full --signal=USR2` (every process of the
    job, as Slurm's own --signal does for the tasks) mid-run; it resumes and finishes with the
    parameters of train_lm never interrupted, in one process on the global batch (2 tasks x 4)."""
    log, run_dir = tmp_path / "job.out", tmp_path / "run"
    total = 150
    args = ["--steps", str(total), *TINY_LM, "--lr-scaling", "none"]
    # The uninterrupted run, alongside the job (its numbers do not depend on timing).
    reference_dir, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    with open(reference_log, "w") as out:
        reference = subprocess.Popen([sys.executable, str(REPO / "examples" / "train_lm.py"), *args, "--batch-size",
                                      "8", "--checkpoint-every", "0", "--run-dir", str(reference_dir)], cwd=REPO,
                                     stdout=out, stderr=subprocess.STDOUT)
    try:
        job_id = slurm_cluster.sbatch(REPO / "slurm" / "requeue.sbatch", *args,
                                      sbatch_args=[*SMALL_NODE, f"--output={log}"],
                                      env={"RUN_DIR": str(run_dir), "CHECKPOINT_EVERY": "50"})
        _preempt_and_finish(slurm_cluster, job_id, run_dir, log, "--full", total=total)
        assert reference.wait(timeout=240) == 0, reference_log.read_text()[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    got, want = (torch.load(d / "model.pt", weights_only=True)["model_state"] for d in (run_dir, reference_dir))
    assert got.keys() == want.keys()
    for name in want:  # float32, 150 AdamW steps: the reduction order's noise is ~1e-5
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: the preempted run differs from the "
                                                            f"uninterrupted one\n{m}")


ENV_PROBE = """\
#!/bin/bash
set -euo pipefail
probe='import json, dataclasses; from launch.slurm_env import SlurmJobEnvironment, hosts_from_slurm
print(json.dumps({"job": dataclasses.asdict(SlurmJobEnvironment.from_env()), "hosts": hosts_from_slurm()}))'
python -c "$probe"
srun python -c "$probe"
"""


@pytest.mark.parametrize("shape, slots", [
    (["--ntasks-per-node=1", "--gpus-per-node=2"], 2),   # one launcher task, one worker per GPU
    (["--ntasks-per-node=2", "--cpus-per-task=1"], 2),   # one worker per task
])
def test_slurm_env_reads_a_real_job(slurm_cluster, tmp_path, shape, slots):
    """SlurmJobEnvironment and hosts_from_slurm on the variables a real Slurm sets."""
    script, log = tmp_path / "probe.sbatch", tmp_path / "probe.out"
    script.write_text(ENV_PROBE)
    job_id = slurm_cluster.sbatch(script, sbatch_args=[*shape, "--time=00:02:00", f"--output={log}"])
    job = slurm_cluster.wait(job_id, timeout=60, output=log)
    text = log.read_text()
    assert job.state == "COMPLETED", text
    probes = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    tasks = int(shape[0].split("=")[1])
    assert len(probes) == 1 + tasks, text
    for probe in probes:
        assert probe["hosts"] == [[slurm_cluster.host, slots]]
        assert probe["job"]["job_id"] == job_id and probe["job"]["nodes"] == [slurm_cluster.host]
    assert sorted(p["job"]["global_rank"] for p in probes[1:]) == list(range(tasks))
    if "--gpus-per-node=2" in shape:
        assert probes[0]["job"]["gpus_on_node"] == 2


def test_launcher_takes_hosts_from_the_allocation(slurm_cluster, tmp_path):
    """`python -m launch script.py` with no -np/-H in a 1-task, 2-GPU job starts 2 workers on the node."""
    script, log, run_dir = tmp_path / "launch.sbatch", tmp_path / "launch.out", tmp_path / "run"
    script.write_text(f"#!/bin/bash\nset -euo pipefail\npython -m launch {STANDIN} --steps 3 --run-dir {run_dir}\n")
    job_id = slurm_cluster.sbatch(script, sbatch_args=["--ntasks-per-node=1", "--gpus-per-node=2",
                                                       "--cpus-per-task=2", "--time=00:05:00", f"--output={log}"])
    job = slurm_cluster.wait(job_id, timeout=150, output=log)
    text = log.read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), text
    assert f"hosts: {slurm_cluster.host}:2; np: 2" in text, text
    assert steps(run_dir) == [1, 2, 3]
    assert {r["sum"] for r in records(run_dir) if "sum" in r} == {3.0}


def test_array_tasks_train_in_own_run_dirs_and_requeue_alone(slurm_cluster, tmp_path):
    """Job arrays: `sbatch --array=0-1 slurm/requeue.sbatch`; each task trains in RUN_DIR/task-<index>.
    Task 0, preempted, requeues itself alone (`scontrol requeue <array job>_0`) and resumes; task 1
    is untouched; both finish with no step lost or repeated."""
    run_dir, total = tmp_path / "run", 12
    array_id = slurm_cluster.sbatch(REPO / "slurm" / "requeue.sbatch", "--steps", str(total), "--step-sleep", "0.2",
                                    sbatch_args=[*SMALL_NODE, "--array=0-1", f"--output={tmp_path}/job-%a.out"],
                                    env={"SCRIPT": STANDIN, "RUN_DIR": str(run_dir)})
    task0, task1 = f"{array_id}_0", f"{array_id}_1"
    log0, log1 = tmp_path / "job-0.out", tmp_path / "job-1.out"
    slurm_cluster.wait_until(lambda: len(steps(run_dir / "task-0")) >= 3, 120, "3 steps of task 0", task0, log0)
    slurm_cluster.scancel(task0, "--signal=USR2", "--batch")
    slurm_cluster.wait_requeued(task0)
    jobs = {task: slurm_cluster.wait(task, timeout=150, output=log) for task, log in ((task0, log0), (task1, log1))}
    text0, text1 = log0.read_text(), log1.read_text()
    assert (jobs[task0].state, jobs[task0].exit_code, jobs[task0].restarts) == ("COMPLETED", "0:0", 1), text0
    assert (jobs[task1].state, jobs[task1].exit_code, jobs[task1].restarts) == ("COMPLETED", "0:0", 0), text1
    for index in (0, 1):
        got = steps(run_dir / f"task-{index}")
        assert got == list(range(1, total + 1)), f"task {index}: steps lost or repeated: {got}"
    assert f"requeued job {task0} (restart 1 of at most 50)" in text0, text0
    assert "(restart 0)" in text0 and "(restart 1)" in text0, text0  # --open-mode=append: one log
    assert "requeued" not in text1, text1
