"""Every multi-node path of the launcher, on real hosts: the namespace cluster of tests/nodes.py
(node1..node3, each with its own hostname, address, /tmp and sshd; the checkout and .venv at the
same path). The launcher runs on a node, as a user's would, and reaches the others over ssh.

Outputs go to a folder under the cluster's state folder in /var/tmp (shared by the nodes); the
failure tests write their run directory to /tmp, which each node has its own of: the launcher's
report does not depend on a shared file system.
"""
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

from distrib.data import epoch_order

from tests.helpers import REPO, SCRIPTS, TINY_LM_MODEL, hang_report
from tests.nodes import nodes  # noqa: F401 - the session's cluster
from tests.test_elastic import assert_params_match_the_replay, read_run
from tests.test_launch_run import ranks_reporting, torch_workers

pytestmark = pytest.mark.multiprocess
TRAIN_LM = REPO / "examples" / "train_lm.py"
FAULTY = SCRIPTS / "faulty_remote.py"  # faulty_train_lm.py, the fault given as FAULT:RANK:STEP
STEPS = 6
# 2 workers x 4 sequences; the one-process reference trains 8 per step with the same learning rate.
TRAIN = [*TINY_LM_MODEL, "--steps", STEPS, "--warmup", "2", "--lr-scaling", "none", "--seed", "7",
         "--log-every", "1"]
LAUNCH = [sys.executable, "-m", "launch"]


@pytest.fixture
def shared(nodes, request):
    """A folder every node sees (under /var/tmp), removed with the cluster."""
    path = nodes.root / "work" / request.node.name.replace("/", "_")
    path.mkdir(parents=True)
    return path


@pytest.fixture(autouse=True)
def healed(nodes):
    """Each test starts and leaves the cluster whole: links up, no limit, every node booted,
    and no worker of a previous test left on any node."""
    nodes.heal()
    yield
    nodes.heal()
    for name in nodes.names:
        for line in nodes.processes(name):
            nodes.run(name, ["kill", "-9", line.split()[0]], check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """train_lm in one plain process on this host (no launcher, no Horovod world): the global batch of 8."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run([sys.executable, str(TRAIN_LM), *map(str, TRAIN), "--batch-size", "8",
                           "--checkpoint-every", "0", "--run-dir", str(run_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return params(run_dir)


def params(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)["model_state"]


def assert_same_parameters(run_dir: Path, reference: dict) -> None:
    got = params(run_dir)
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(nodes, on, args, script=TRAIN_LM, script_args=(), env=None, timeout=300, check=False):
    return nodes.run(on, [*LAUNCH, *args, script, *map(str, script_args)], env=env, timeout=timeout, check=check)


def assert_no_worker_left(nodes) -> None:
    """The launcher stopped every worker on every host (its shims, their scripts)."""
    deadline = time.monotonic() + 20
    left = {}
    while time.monotonic() < deadline:
        left = {name: nodes.processes(name) for name in nodes.names}
        if not any(left.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"worker processes left on the nodes: {left}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine_args, on, hosts_arg", [
    (["--controller", "mpi"], "node1", "-H"),
    (["--controller", "gloo"], "node3", "--hostfile"),  # the launcher's host runs no worker
    (["--engine", "torch"], "node1", "-H"),
], ids=["mpi", "gloo", "torch"])
def test_train_lm_on_two_hosts_equals_one_process_of_the_global_batch(nodes, shared, reference, engine_args, on,
                                                                       hosts_arg):
    if hosts_arg == "-H":
        hosts = "node1:1,node2:1"
    else:
        hosts = shared / "hosts.txt"
        hosts.write_text("# two nodes\nnode1 slots=1\nnode2:1\n")
    run_dir = shared / "run"
    proc = launch(nodes, on, ["--verbose", *engine_args, hosts_arg, hosts], script_args=[
        *TRAIN, "--checkpoint-every", "0", "--run-dir", run_dir])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distrib-launch: rank 0 on node1 ended: exit code 0" in proc.stderr
    assert "distrib-launch: rank 1 on node2 ended: exit code 0" in proc.stderr
    records = [r for r in metrics(run_dir) if "event" not in r]
    assert [r["step"] for r in records][-1] == STEPS and {r["world_size"] for r in records} == {2}
    assert_same_parameters(run_dir, reference)
    assert_no_worker_left(nodes)
    # train_lm (AdamW, clipping) is scale-invariant: gradients summed instead of averaged across the
    # hosts would pass above. SGD in float64 on the same two hosts, against plain torch, is not.
    out = shared / "matrix.json"
    proc = launch(nodes, on, [*engine_args, hosts_arg, hosts], script=SCRIPTS / "equivalence_matrix.py",
                  script_args=["--out", out, "--cases", "sgd-acc1-nosync,sgd-acc3-sync", "--no-checks"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["size"] == 2 and sorted(results["cases"]) == ["sgd-acc1-nosync", "sgd-acc3-sync"]
    for name, got in results["cases"].items():
        assert got["error"] is None, got["error"]
        assert got["vs_torch"] <= 1e-10, f"{name} on two hosts: max |distrib - torch| = {got['vs_torch']:.3g}"
        assert got["across_ranks"] == 0.0 and got["reference_moved"] > 1e-3


@pytest.mark.timeout(300)
def test_torch_engine_across_two_hosts_gives_each_worker_its_place(nodes):
    """--engine torch from node1, 2 workers on node1 and 2 on node2 (over ssh): node2's workers
    continue the ranks with local ranks 0 and 1, all meet at node1, and the allreduce is right."""
    proc = launch(nodes, "node1", ["--verbose", "--engine", "torch", "-H", "node1:2,node2:2"],
                  script=SCRIPTS / "launch_allreduce.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = re.search(r"^distrib-launch: attempt 0: torch workers meet at MASTER_ADDR=node1 MASTER_PORT=(\d+)$",
                     proc.stderr, re.M)
    assert port, proc.stderr[-3000:]
    master = f"node1:{port[1]}"
    assert torch_workers(proc.stdout) == {0: (0, 2, "node1", master), 1: (1, 2, "node1", master),
                                          2: (0, 2, "node2", master), 3: (1, 2, "node2", master)}, proc.stdout
    assert ranks_reporting(proc.stdout) == {r: (4, 10.0, "0") for r in range(4)}, proc.stdout
    for rank, host in ((0, "node1"), (1, "node1"), (2, "node2"), (3, "node2")):
        assert f"distrib-launch: rank {rank} on {host} ended: exit code 0" in proc.stderr
    assert_no_worker_left(nodes)


@pytest.mark.timeout(400)
def test_torch_engine_killed_rank_on_another_host_is_reported_and_the_job_restarts(nodes, shared):
    """--engine torch launched from node3, which runs no worker: rank 0's port is asked of node1
    over ssh at each attempt. Rank 1 on node2 is SIGKILLed once: the report names it with its host,
    and the restarted job meets at a new port and succeeds; no worker is left on any host."""
    hostfile = shared / "hosts.txt"
    hostfile.write_text("node1:1\nnode2:1\n")
    proc = launch(nodes, "node3", ["--engine", "torch", "--hostfile", hostfile, "--max-restarts", "1"],
                  script=SCRIPTS / "launch_allreduce.py",
                  script_args=["--fail-rank", "1", "--fail-mode", "sigkill", "--marker-dir", shared])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert "distrib-launch: rank 1 on node2 failed first: killed by SIGKILL" in lines, proc.stderr[-3000:]
    assert "distrib-launch: restart 1/1" in lines
    ports = re.findall(r"^distrib-launch: attempt \d: torch workers meet at MASTER_ADDR=node1 MASTER_PORT=(\d+)$",
                       proc.stderr, re.M)
    assert len(ports) == 2 and ports[0] != ports[1], proc.stderr[-3000:]
    assert re.findall(r"rank=1 size=2 sum=3 restart=(\d)", proc.stdout) == ["0", "1"], proc.stdout
    assert_no_worker_left(nodes)


@pytest.mark.timeout(400)
def test_usr2_to_a_launcher_without_workers_checkpoints_the_remote_torch_workers_and_resumes(nodes, shared):
    """--engine torch launched from node3, workers on node1 and node2 over ssh (which carries no
    signal): SIGUSR2 to the launcher (Slurm's warning before the time limit) reaches both through
    the status channel; they stop at the same step, rank 0's checkpoint holds that step, and the
    job exits 0. Launched again, it resumes there, trains every remaining step once and ends with
    the weights of the plain loop."""
    run_dir, total = shared / "run", 40
    hosts = ["--engine", "torch", "-H", "node1:1,node2:1"]
    proc = nodes.popen("node3", [*LAUNCH, *hosts, SCRIPTS / "slurm_train.py", "--steps", total, "--step-sleep", "0.2",
                                 "--run-dir", run_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: len(standin_steps(run_dir)) >= 3, proc, 200, "3 training steps")
        os.kill(proc.pid, signal.SIGUSR2)  # the launcher itself runs in node3's namespaces (nsenter execs it)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert "distrib-launch: SIGUSR2: forwarded to 2 on other hosts (status channel)" in output, output[-3000:]
    assert "SIGUSR2 received outside a Slurm job (no SLURM_JOB_ID): checkpoint saved, not requeuing" in output
    stopped = dict(re.findall(r"^rank (\d): stopping at step (\d+) \(requeue\)$", output, re.M))
    assert stopped.keys() == {"0", "1"} and len(set(stopped.values())) == 1, output[-3000:]
    reached = int(stopped["0"])
    assert 3 <= reached < total and standin_steps(run_dir) == list(range(1, reached + 1))
    assert [r["step"] for r in metrics(run_dir) if r.get("event") == "preempted"] == [reached]
    assert torch.load(run_dir / "ckpt.pt")["step"] == reached
    assert_no_worker_left(nodes)

    proc = launch(nodes, "node3", hosts, script=SCRIPTS / "slurm_train.py",
                  script_args=["--steps", total, "--run-dir", run_dir])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"^rank \d size 2 .* start_step (\d+) ", proc.stdout, re.M) == [str(reached)] * 2, proc.stdout
    assert standin_steps(run_dir) == list(range(1, total + 1))
    weight = torch.zeros(4)
    for _ in range(total):  # the plain loop: each step subtracts 0.01 x the sum over ranks of rank + 1
        weight -= 0.01 * torch.full((4,), 3.0)
    assert torch.equal(torch.load(run_dir / "ckpt.pt")["weight"], weight)
    assert_no_worker_left(nodes)


def standin_steps(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in metrics(run_dir) if "event" not in r] if path.exists() else []


@pytest.mark.timeout(300)
def test_forged_and_unsigned_reports_from_another_host_change_nothing(nodes, shared):
    """Rank 1 on node2 sends the launcher's port a forged failure of rank 0 (its own key), an
    unsigned one and a tampered one, then both ranks succeed: the job succeeds, 3 reports refused."""
    proc = launch(nodes, "node1", ["--verbose", "--controller", "mpi", "-H", "node1:1,node2:1"],
                  script=SCRIPTS / "forge_report.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forged 3 reports" in proc.stdout
    assert "distrib-launch: refused 3 status reports without a valid signature" in proc.stderr
    assert "failed first" not in proc.stderr and "all ranks finished successfully" in proc.stderr


@pytest.mark.timeout(300)
def test_a_rank_that_raises_on_another_host_is_named_with_its_host_and_exception(nodes):
    proc = launch(nodes, "node1", ["--controller", "gloo", "-H", "node1:1,node2:1"], script=FAULTY,
                  script_args=["raise:1:3", *TRAIN, "--checkpoint-every", "0", "--run-dir", "/tmp/run"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ("distrib-launch: rank 1 on node2 failed first: exit code 1 (uncaught RuntimeError: injected "
            "failure at step 3)") in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert_no_worker_left(nodes)


@pytest.mark.timeout(300)
def test_a_stopped_rank_on_another_host_is_named_and_stopped(nodes):
    """SIGSTOP on node2: the hang is blamed on rank 1 on node2, and its stopped process is gone
    afterwards (its shim stopped it when the launcher ended the connection)."""
    proc = launch(nodes, "node1", ["--controller", "mpi", "-H", "node1:1,node2:1", "--hang-timeout", "10"],
                  script=FAULTY, script_args=["stop:1:3", *TRAIN, "--checkpoint-every", "0", "--run-dir", "/tmp/run"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "distrib-launch: rank 1 on node2 hung: no progress for " in proc.stderr, proc.stderr[-3000:]
    rank, count, furthest, timeout = hang_report(proc.stderr)
    assert (rank, timeout) == (1, 10) and count < furthest
    assert_no_worker_left(nodes)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine_args", [["--controller", "mpi"], ["--engine", "torch"]], ids=["mpi", "torch"])
def test_a_killed_rank_on_another_host_restarts_the_job_which_resumes(nodes, shared, reference, engine_args):
    """SIGKILL of rank 1 on node2 at step 4 (after the step-3 checkpoint), --max-restarts 1: the
    report names it, the whole job starts again, resumes from step 3 and ends as if never stopped."""
    hostfile = shared / "hosts.txt"
    hostfile.write_text("node1:1\nnode2:1\n")
    run_dir = shared / "run"
    proc = launch(nodes, "node1", [*engine_args, "--hostfile", hostfile, "--max-restarts", "1"],
                  script=FAULTY, script_args=["kill:1:4", *TRAIN, "--checkpoint-every", "3", "--sync-checkpoint",
                                              "--run-dir", run_dir])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert "distrib-launch: rank 1 on node2 failed first: killed by SIGKILL" in lines, proc.stderr[-3000:]
    assert "distrib-launch: restart 1/1" in lines
    records = [r for r in metrics(run_dir) if "event" not in r]
    second = [r["step"] for r in records if r["restarts"] == 1]
    assert second == list(range(4, STEPS + 1))  # resumed after the step-3 checkpoint
    assert_same_parameters(run_dir, reference)
    assert_no_worker_left(nodes)


@pytest.mark.timeout(300)
def test_an_unreachable_host_and_a_host_without_the_venv_are_one_line_errors(nodes):
    nodes.link("node2", False)
    proc = launch(nodes, "node1", ["-H", "node1:1,node2:1"], script_args=["--steps", "1"], timeout=120)
    nodes.link("node2", True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("distrib-launch: error: cannot reach host 'node2' over ssh (ssh: connect to host "
                           "node2 port 22: "), proc.stderr
    # node3 without the venv: hide it in node3's own mount namespace
    venv = (REPO / ".venv").resolve()
    nodes.run("node3", ["mount", "-t", "tmpfs", "tmpfs", venv])
    try:
        proc = launch(nodes, "node1", ["-H", "node1:1,node3:1"], script_args=["--steps", "1"], timeout=120)
    finally:
        nodes.run("node3", ["umount", venv])
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        f"distrib-launch: error: host 'node3' has no {sys.executable} (the Python the workers run): install the "
        f"same environment at the same path on every host, or remove node3 from -H/--hostfile")
    assert "Traceback" not in proc.stderr
    assert_no_worker_left(nodes)


def test_the_bandwidth_lever_puts_a_token_bucket_on_the_link_and_heal_lifts_it(nodes):
    nodes.limit_bandwidth("node2", "100mbit")
    shown = nodes.run("node2", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "tbf" in shown and "rate 100Mbit" in shown, shown
    nodes.heal()
    assert "tbf" not in nodes.run("node2", ["tc", "qdisc", "show", "dev", "eth0"]).stdout


@pytest.mark.timeout(600)
def test_elastic_loses_a_whole_host_goes_on_and_takes_it_back(nodes, shared):
    """--elastic over node1..node3 from node1: node3 is lost (every process killed, link down)
    mid-epoch; the world re-forms at 2 and goes on; node3 boots again and rejoins at 3. Every
    sample of the epoch is trained exactly once (up to the documented drop_last tail); the
    launcher chose and printed eth0."""
    out = shared / "out"
    out.mkdir()
    samples = 720
    proc = nodes.popen("node1", [*LAUNCH, "--elastic", "--min-np", "1", "--max-np", "3", "-np", "3",
                                 "-H", "node1:1,node2:1,node3:1", "--blacklist-cooldown", "3,6",
                                 SCRIPTS / "elastic_train.py", "--out", out, "--samples", samples,
                                 "--step-sleep", "0.1", "--wait-for-size", "3"],
                       # Gloo's peers of the lost host wait this long before they give up (default 30 s)
                       env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "15"},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: sizes_seen(out, 3) and committed(out), proc, 240, "a first commit at size 3")
        nodes.kill_node("node3")
        nodes.link("node3", False)
        wait_until(lambda: sizes_seen(out, 2), proc, 240, "the world to re-form at size 2")
        nodes.link("node3", True)
        nodes.start_node("node3")
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    assert "network interface: eth0 (this host's interface on the subnet of node2, node3)" in output
    indices, finals, sizes = read_run(out)
    # Every sample of the epoch once, but for ShardedLoader's drop_last (its default): the tail of
    # the epoch's order that cannot fill a global batch of the final world (3 x 4) is not trained.
    # How long that tail is depends on how many steps ran at size 2 (here 720 - 12a - 8b samples).
    missing = sorted(set(range(samples)) - set(indices))
    twice = sorted(i for i in set(indices) if indices.count(i) > 1)
    tail = epoch_order(samples, seed=5, epoch=0)[samples - len(missing):]  # elastic_train.py's loader seed
    assert not twice and len(missing) < 3 * 4 and sorted(tail) == missing, (
        f"missing {missing}, twice {twice}; (step, rank, size, threads) at each (re)start: {sorted(sizes)}\n{output[-3000:]}")
    after_loss = min(step for step, _, size, _ in sizes if size == 2)
    assert any(size == 3 and step > after_loss for step, _, size, _ in sizes), sizes  # node3 rejoined
    assert sorted(f["size"] for f in finals) == [3, 3, 3]
    assert finals[0]["params"] == finals[1]["params"] == finals[2]["params"]
    # and the parameters are those of the committed steps replayed in one plain torch process
    assert_params_match_the_replay(out, finals, samples)


def sizes_seen(out: Path, size: int) -> bool:
    return any(s == size for _, _, s, _ in read_run(out)[2])


def committed(out: Path) -> bool:
    return any(f.stat().st_size for f in out.glob("indices.*.txt"))


def wait_until(predicate, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}: {proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
