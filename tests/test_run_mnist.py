"""examples/horovod_mnist.py (Horovod's MNIST example on distrib.Run) through the real launcher:
SIGUSR2 to the launcher, a SIGKILL of the whole job and two resumes end with the parameters of
the run that was never interrupted; under Horovod Elastic a killed worker leaves a survivor that
takes the machine's cores and finishes the epochs with a right step count."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from distrib.checkpoint import store
from tests.checkpoint_fixtures import kill_tree
from tests.helpers import REPO, run_launch

pytestmark = pytest.mark.multiprocess
MNIST = REPO / "examples" / "horovod_mnist.py"
# One epoch of 2048 samples, 16 per worker: 64 steps on 2 workers.
SMALL = ["--train-samples", "2048", "--test-samples", "128", "--test-batch-size", "64", "--batch-size", "16",
         "--epochs", "1", "--log-interval", "1", "--checkpoint-every", "8"]
TWO_HOSTS = "localhost:1,127.0.0.1:1"  # one machine under two names: a dead worker blacklists one (FACTS)
# Two host names for one machine here too: each worker must still take half of its cores.
PLAIN = ["--controller", "gloo", "-H", TWO_HOSTS]


def records(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def logged_steps(run_dir: Path):
    return [r["step"] for r in records(run_dir) if "event" not in r]


def final_params(run_dir: Path):
    newest, _ = store.newest_valid(run_dir / "checkpoints")
    return store.load_file(newest, store.STATE_FILE)["state"]["model"]


def start(launch_args, run_dir, *more):
    cmd = [sys.executable, "-m", "launch", *launch_args, str(MNIST), *SMALL, *more, "--run-dir", str(run_dir)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, what, timeout=150):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
            raise AssertionError(f"never saw {what} (exit {proc.poll()})\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.1)


def finish(proc, timeout=200):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mnist") / "clean"
    run_launch(PLAIN, MNIST, [*SMALL, "--run-dir", run_dir], timeout=200)
    return final_params(run_dir)


@pytest.mark.timeout(600)
def test_usr2_to_the_launcher_then_sigkill_then_resume_ends_as_the_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # 1. `kill -USR2 <launcher>` (scancel --signal=USR2 --batch): forwarded, checkpoint, clean exit.
    proc = start(PLAIN, run_dir)
    wait_for(lambda: len(logged_steps(run_dir)) >= 5, proc, "5 steps")
    os.kill(proc.pid, signal.SIGUSR2)
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    assert "distrib-launch: SIGUSR2: forwarded to 2 workers on this host" in err, err[-3000:]
    assert "SIGUSR2 received outside a Slurm job (no SLURM_JOB_ID): checkpoint saved, not requeuing" in err
    preempted = [r["step"] for r in records(run_dir) if r.get("event") == "preempted"]
    assert len(preempted) == 1 and 5 <= preempted[0] < 64, records(run_dir)
    assert store.step_of(store.newest_valid(run_dir / "checkpoints")[0]) == preempted[0]

    # 2. resumed, then SIGKILLed (launcher, mpirun, every worker) once it wrote another checkpoint.
    proc = start(PLAIN, run_dir)
    wait_for(lambda: store.step_of(store.newest_valid(run_dir / "checkpoints")[0] or "x") not in
             (None, preempted[0]) and len(logged_steps(run_dir)) > preempted[0] + 10, proc, "a new checkpoint")
    kill_tree(proc.pid)
    proc.communicate(timeout=30)

    # 3. resumed again: to the end, with the parameters of the run that was never interrupted.
    run_launch(PLAIN, MNIST, [*SMALL, "--run-dir", run_dir], timeout=200)
    resumed = final_params(run_dir)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), f"{name} differs from the uninterrupted run"
    resumes = [r["step"] for r in records(run_dir) if r.get("event") == "resume"]
    assert len(resumes) == 2 and resumes[0] == preempted[0] and preempted[0] < resumes[1] < 64  # killed mid-run
    assert sorted(set(logged_steps(run_dir))) == list(range(1, 65))
    # every start: 2 workers of one machine under two host names, one thread each (was 2 each)
    assert [(r["world_size"], r["threads"]) for r in records(run_dir) if r.get("event") == "start"] == [(2, 1)] * 3


def mnist_workers(run_dir: Path):
    """The training scripts (not their launch.worker shims) of the job writing to ``run_dir``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if len(cmd) > 1 and cmd[1] == str(MNIST) and str(run_dir) in cmd:
            found.append(p)
    return found


@pytest.mark.timeout(600)
def test_elastic_worker_killed_the_survivor_takes_both_cores_and_finishes_the_epochs(tmp_path):
    run_dir = tmp_path / "run"
    # 1024 samples: 32 steps of 2 x 16 in the epoch, until a worker dies
    proc = start(["--elastic", "--min-np", "1", "--max-np", "2", "-H", TWO_HOSTS], run_dir, "--train-samples", "1024")
    wait_for(lambda: len(logged_steps(run_dir)) >= 14, proc, "14 steps", timeout=200)
    victims = [p for p in mnist_workers(run_dir) if p.environ().get("HOROVOD_HOSTNAME") == "127.0.0.1"]
    assert len(victims) == 1, mnist_workers(run_dir)
    victims[0].kill()
    code, out, err = finish(proc, timeout=300)
    assert code == 0, err[-3000:]
    recs = records(run_dir)
    start_event = next(r for r in recs if r.get("event") == "start")
    # Two host names, one machine (2 cores): each of the 2 workers takes one thread...
    assert (start_event["world_size"], start_event["threads"]) == (2, 1), start_event
    resizes = [r for r in recs if r.get("event") == "resize"]
    assert resizes and resizes[-1]["world_size"] == 1
    assert resizes[-1]["threads"] == (os.cpu_count() or 1)  # ...and the survivor all of them
    # Rolled back to the last commit (every 10 steps), then the rest of the epoch at half the
    # global batch: twice as many steps per sample.
    back_at = resizes[-1]["step"]
    total = back_at + (1024 - back_at * 32) // 16
    assert back_at % 10 == 0 and records(run_dir)[-1]["event"] == "final" and recs[-1]["step"] == total
    assert sorted(set(logged_steps(run_dir))) == list(range(1, total + 1))
    # The progress line follows the new length: never past its total ("step 190/150").
    shown = [tuple(map(int, m)) for m in re.findall(r"step (\d+)/(\d+) \|", err + out)]
    assert shown and all(done <= of for done, of in shown) and shown[-1] == (total, total), shown[-5:]
    assert store.validate(store.newest_valid(run_dir / "checkpoints")[0])["step"] == total
