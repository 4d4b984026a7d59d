"""Real runs of ``python -m launch`` on 2 workers, with Horovod under both controllers and with
``--engine torch`` (torch.distributed over Gloo, workers started by the launcher itself):
allreduce result, first-failure report, Ctrl-C, hang detection, restart. Slow: a worker imports
torch and Horovod; every run has a timeout and the suite asserts no wall-clock speed."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, SCRIPTS, TINY_LM_MODEL, assert_workers_gone, hang_report, run_launch

SCRIPT = SCRIPTS / "launch_allreduce.py"
pytestmark = pytest.mark.multiprocess


def ranks_reporting(stdout):
    """{rank: (size, sum, restart)} from lines 'rank=R size=S sum=X restart=N' (Gloo prefixes
    '[R]<stdout>:'). mpirun forwards each rank's output in chunks and may put two ranks' lines
    on one line of its own stdout before their newlines, so a report ends at its number."""
    return {int(m[1]): (int(m[2]), float(m[3]), m[4])
            for m in re.finditer(r"rank=(\d+) size=(\d+) sum=([\d.]+) restart=(\d+|None)", stdout)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_allreduce_under_each_controller(controller, tmp_path):
    timeline = tmp_path / "timeline.json"
    proc = run_launch(["-np", "2", "--controller", controller, "--timeline", str(timeline)], SCRIPT)
    assert ranks_reporting(proc.stdout) == {0: (2, 3.0, "0"), 1: (2, 3.0, "0")}, proc.stdout
    assert f"distrib-launch: controller: {controller} (requested with --controller {controller})" in proc.stderr
    assert "allreduce.sum" in timeline.read_text()  # --timeline reached the workers as HOROVOD_TIMELINE


def torch_workers(stdout):
    """{rank: (local_rank, local_size, host, master)} from the lines of a torch-engine worker (two
    workers' lines may share a line of the launcher's stdout: a report ends at its port)."""
    return {int(m[1]): (int(m[2]), int(m[3]), m[4], m[5]) for m in re.finditer(
        r"torch rank=(\d+) local_rank=(\d+) local_size=(\d+) host=(\S+) master=([^\s:]+:\d+)", stdout)}


@pytest.mark.timeout(300)
def test_torch_engine_starts_workers_with_torchruns_variables():
    """--engine torch: the launcher starts both workers itself; torch.distributed's env://
    initialisation finds rank 0 from their variables alone and the allreduce is right."""
    proc = run_launch(["-np", "2", "--engine", "torch"], SCRIPT)
    assert ranks_reporting(proc.stdout) == {0: (2, 3.0, "0"), 1: (2, 3.0, "0")}, proc.stdout
    workers = torch_workers(proc.stdout)
    assert {r: w[:2] for r, w in workers.items()} == {0: (0, 2), 1: (1, 2)}, proc.stdout
    assert len({w[3] for w in workers.values()}) == 1 and workers[0][3].startswith("127.0.0.1:")
    assert "distrib-launch: engine: torch (" in proc.stderr and "controller" not in proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launch_args, mode, how, code", [
    (["--controller", "mpi"], "exit3", "exit code 3", 3),
    (["--controller", "gloo"], "sigkill", "killed by SIGKILL", 137),
    (["--engine", "torch"], "sigkill", "killed by SIGKILL", 137),
], ids=["mpi", "gloo", "torch"])
def test_failing_rank_is_reported_first(launch_args, mode, how, code, tmp_path):
    # Rank 0 goes on to an allreduce rank 1 never joins.
    proc = run_launch(["-np", "2", *launch_args], SCRIPT,
                      ["--fail-rank", "1", "--fail-mode", mode, "--pid-dir", tmp_path], check=False)
    assert proc.returncode == code, proc.stderr
    report = [line for line in proc.stderr.splitlines() if "failed first" in line]
    assert len(report) == 1 and re.fullmatch(rf"distrib-launch: rank 1 on \S+ failed first: {how}", report[0])
    assert f"    rank 1 about to fail ({mode})" in proc.stderr  # the stderr tail
    assert_workers_gone(tmp_path)


def wait_for_pids(pid_dir, proc, n=2, timeout=240):
    deadline = time.monotonic() + timeout
    while len(list(pid_dir.glob("*.pid"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.2)


def interrupt_once_started(launch_args, script, script_args, pid_dir, signum):
    """Start the launcher, send it ``signum`` once every worker wrote its pid: (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "launch", *launch_args, str(script), *script_args,
                             "--pid-dir", str(pid_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for_pids(pid_dir, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_worker(tmp_path):
    code, err = interrupt_once_started(["-np", "2", "--controller", "mpi"], SCRIPT, ["--beat-seconds", "600"],
                                       tmp_path, signal.SIGINT)
    assert code == 130, err
    assert "distrib-launch: interrupted by SIGINT: stopped every worker" in err
    assert_workers_gone(tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launch_args", [["--controller", "gloo"], ["--engine", "torch"]], ids=["gloo", "torch"])
def test_sigstopped_worker_is_caught_as_hung(launch_args, tmp_path):
    proc = run_launch(["-np", "2", *launch_args, "--hang-timeout", "5"], SCRIPT,
                      ["--fail-rank", "1", "--fail-mode", "sigstop", "--beat-seconds", "600", "--pid-dir", tmp_path],
                      check=False)
    assert proc.returncode == 1, proc.stderr
    rank, count, furthest, timeout = hang_report(proc.stderr) or (None,) * 4
    # The stopped rank beat once; its peer kept beating until the launcher stopped it.
    assert (rank, count, timeout) == (1, 1, 5) and furthest > 1, proc.stderr
    assert_workers_gone(tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launch_args", [["--controller", "mpi"], ["--engine", "torch"]], ids=["mpi", "torch"])
def test_restart_runs_the_job_again(launch_args, tmp_path):
    proc = run_launch(["-np", "2", *launch_args, "--max-restarts", "1"], SCRIPT,
                      ["--fail-rank", "1", "--fail-mode", "exit3", "--marker-dir", tmp_path])
    assert re.search(r"^distrib-launch: rank 1 on \S+ failed first: exit code 3$", proc.stderr, re.M), proc.stderr
    assert "distrib-launch: restart 1/1" in proc.stderr
    restarts = re.findall(r"rank=1 size=2 sum=3 restart=(\d)", proc.stdout)
    assert restarts == ["0", "1"], proc.stdout
    if "torch" in launch_args:  # each attempt meets at a port of its own (the last one's may be in TIME_WAIT)
        ports = re.findall(r"^distrib-launch: attempt (\d): torch workers meet at MASTER_ADDR=127.0.0.1 "
                           r"MASTER_PORT=(\d+)$", proc.stderr, re.M)
        seen = {int(m[1]) for m in re.finditer(r"torch rank=1 .* master=127.0.0.1:(\d+)", proc.stdout)}
        assert [a for a, _ in ports] == ["0", "1"] and ports[0][1] != ports[1][1], proc.stderr
        assert seen == {int(p) for _, p in ports}, proc.stdout  # what the workers were given


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launch_args", [["--controller", "mpi"], ["--controller", "gloo"], ["--engine", "torch"]],
                         ids=["mpi", "gloo", "torch"])
def test_sigterm_gives_workers_the_stop_grace_to_save(launch_args, tmp_path):
    """scancel or a preemption SIGTERMs the launcher: every worker gets SIGTERM and up to the stop
    grace (5 s) to save; mpirun alone would SIGKILL them first."""
    code, err = interrupt_once_started(["-np", "2", *launch_args], SCRIPTS / "slow_stop.py",
                                       ["--save-s", "3"], tmp_path, signal.SIGTERM)
    assert code == 143, err
    assert "distrib-launch: interrupted by SIGTERM: stopped every worker" in err
    assert sorted(p.name for p in tmp_path.glob("saved-*")) == ["saved-0", "saved-1"], err
    assert_workers_gone(tmp_path)


@pytest.mark.timeout(400)
def test_torchrun_standalone_is_one_two_worker_job_equal_to_one_process_of_the_global_batch(tmp_path):
    """`torchrun --standalone --nproc_per_node 2 examples/train_lm.py` (no distrib-launch) is one
    2-worker torch-engine job: its parameters equal one plain process trained on the global batch
    (2 x 4). Before the torch engine it ran two independent 1-process jobs of batch 4."""
    train = [*TINY_LM_MODEL, "--steps", "4", "--warmup", "2", "--lr-scaling", "none", "--seed", "7",
             "--checkpoint-every", "0"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DISTRIB_", "HOROVOD_", "OMPI_", "PMIX_"))}
    runs = {}
    for name, cmd in (("reference", [sys.executable, "examples/train_lm.py", *train, "--batch-size", "8"]),
                      ("torchrun", [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                                    "--nproc_per_node", "2", "examples/train_lm.py", *train])):
        run_dir = tmp_path / name
        proc = subprocess.run([*cmd, "--run-dir", str(run_dir)], cwd=REPO, env=clean, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = torch.load(run_dir / "model.pt", weights_only=True)["model_state"]
    worlds = {json.loads(line).get("world_size") for line in (tmp_path / "torchrun" / "metrics.jsonl").read_text()
              .splitlines()} - {None}
    assert worlds == {2}
    assert runs["torchrun"].keys() == runs["reference"].keys()
    for name, want in runs["reference"].items():
        torch.testing.assert_close(runs["torchrun"][name], want, rtol=1e-4, atol=1e-5, msg=name)
