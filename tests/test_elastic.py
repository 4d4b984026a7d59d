"""Elastic mode: the launcher's plan, and real Horovod Elastic runs with workers that die or join.

One machine, two host names (localhost and 127.0.0.1): Horovod blacklists the *host* of a dead
worker, so with both slots under one name the whole job would stop (see FACTS).
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distrib.context import threads_per_worker
from distrib.checkpoint import store
from launch.cli import LaunchConfig
from launch.plan import Tools, build_plan, discovery_script_text, resolve_controller
from tests.checkpoint_fixtures import kill_tree
from tests.helpers import REPO, SCRIPTS, TINY_LM_MODEL, run_launch

SCRIPT = SCRIPTS / "elastic_train.py"
TWO_HOSTS = "localhost:1,127.0.0.1:1"


def elastic_config(**kw):
    base = dict(script="train.py", script_args=("--x",), np=2, hosts=(("localhost", 1), ("127.0.0.1", 1)),
                elastic=True, min_np=1, max_np=2)
    base.update(kw)
    return LaunchConfig(**base)


def test_elastic_plan_golden():
    config = elastic_config(blacklist_cooldown=(5, 30), reset_limit=4)
    controller, reason = resolve_controller("auto", lambda: True, "/usr/bin/mpirun", elastic=True)
    plan = build_plan(config, controller, reason, env_names=[], is_root=True, tools=Tools(python="/py"),
                      local=frozenset({"localhost", "127.0.0.1"}), discovery_script="/tmp/d.sh")
    assert plan.argv == ("horovodrun", "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
                         "--host-discovery-script", "/tmp/d.sh", "--network-interface", "lo",
                         "--blacklist-cooldown-range", "5", "30", "--reset-limit", "4",
                         "/py", "-m", "launch.worker", "train.py", "--", "--x")


def test_elastic_plan_on_remote_hosts_leaves_the_interface_to_horovodrun_unless_given():
    config = elastic_config(hosts=(("node1", 4), ("node2", 4)), np=8, min_np=4, max_np=8)
    plan = build_plan(config, "gloo", "", env_names=[], is_root=False, tools=Tools(python="/py"),
                      local=frozenset({"localhost"}), discovery_script="/d.sh")
    assert "--network-interface" not in plan.argv
    given = elastic_config(hosts=(("node1", 4),), np=4, min_np=2, max_np=4, network_interface="ib0")
    plan = build_plan(given, "gloo", "", env_names=[], is_root=False, tools=Tools(python="/py"),
                      local=frozenset(), discovery_script="/d.sh")
    assert plan.argv[plan.argv.index("--network-interface") + 1] == "ib0"


def test_generated_discovery_script_lists_the_static_hosts(tmp_path):
    path = tmp_path / "d.sh"
    path.write_text(discovery_script_text((("localhost", 1), ("127.0.0.1", 2))))
    path.chmod(0o755)
    assert subprocess.run([str(path)], capture_output=True, text=True).stdout.split() == ["localhost:1", "127.0.0.1:2"]


@pytest.mark.parametrize("kw,message", [
    (dict(controller="mpi"), "--elastic needs Horovod's Gloo controller"),
    (dict(min_np=None), "--elastic needs --min-np and --max-np"),
    (dict(min_np=3), r"need 1 <= --min-np \(3\) <= -np \(2\) <= --max-np \(2\)"),
    (dict(max_restarts=2), "--elastic and --max-restarts exclude each other"),
    (dict(blacklist_cooldown=(9, 3)), "0 < MIN <= MAX"),
    (dict(elastic=False), "only apply with --elastic"),
])
def test_bad_elastic_options(kw, message):
    with pytest.raises(ValueError, match=message):
        elastic_config(**kw)


def read_run(out: Path):
    indices = [int(i) for f in out.glob("indices.*.txt") for i in f.read_text().split()]
    finals = [json.loads(f.read_text()) for f in out.glob("final.*.json")]
    sizes = [tuple(map(int, line.split())) for f in out.glob("sizes.*.txt") for line in f.read_text().splitlines()]
    return indices, finals, sizes


def threads(workers_here: int) -> int:
    """The torch threads of each of ``workers_here`` workers sharing this machine's cores."""
    return threads_per_worker(os.cpu_count() or 1, workers_here, env={})


def replay_committed_steps(out: Path, samples: int):
    """The parameters of one plain torch process that trains elastic_train.py's model (float64)
    on the steps the run committed, in their order: each step's loss is the mean over the ranks of
    each rank's mean loss (what averaging the ranks' gradients computes; the global batch's mean
    when the ranks hold equal shares), at the learning rate of the step's world size."""
    records = [json.loads(line) for f in out.glob("steps.*.jsonl") for line in f.read_text().splitlines()]
    records.sort(key=lambda r: r["step"])
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), "a committed step is missing or twice"
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1).double()  # the script's initial weights
    x = torch.arange(samples, dtype=torch.float64).unsqueeze(1) / samples
    initial = torch.cat([q.detach().flatten() for q in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for r in records:
        world = len(r["samples"])
        # distrib.LRSchedule(base_lr=1e-4, total_steps=1000): linear scaling, cosine decay to 0.1x
        factor = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * (r["step"] - 1) / 1000))
        optimizer.param_groups[0]["lr"] = 1e-4 * world * factor
        loss = sum(model(x[rank_samples]).pow(2).mean() for rank_samples in r["samples"]) / world
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = torch.cat([q.detach().flatten() for q in model.parameters()])
    assert (final - initial).abs().max() > 1e-4, "the replay hardly trained: comparing with it proves nothing"
    return final.tolist()


def assert_params_match_the_replay(out: Path, finals, samples: int):
    want = replay_committed_steps(out, samples)
    for final in finals:
        # float64: summation order only; training a rolled-back step twice moves them by ~1e-4
        assert final["params"] == pytest.approx(want, rel=0, abs=1e-12), (
            f"rank {final['rank']} ended with {final['params']}, a plain torch replay of the committed steps "
            f"with {want}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["kill", "exception"])
def test_job_survives_a_dead_worker_and_consumes_every_sample_once(tmp_path, mode):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_launch(["--elastic", "--min-np", "1", "--max-np", "2", "-H", TWO_HOSTS], SCRIPT,
                      ["--out", out, "--samples", 192, "--fail-at-step", 7, "--fail-mode", mode], timeout=280)
    indices, finals, sizes = read_run(out)
    assert (out / "failed-once").exists(), proc.stderr[-2000:]
    assert sorted(indices) == list(range(192))            # every sample exactly once
    assert len(finals) == 1 and finals[0]["size"] == 1    # finished on the survivor
    assert finals[0]["epoch"] == 1
    # the survivor rolled back to the commit before the failure (step 6) and went on alone
    assert (6, 0, 1, threads(1)) in sizes and finals[0]["lr"] == pytest.approx(1e-4, rel=0.05)
    # distrib.elastic.run fitted the torch threads to the workers on this machine in every attempt
    # (Horovod sees two hosts, localhost and 127.0.0.1: one worker per host to it, two on these cores)
    assert {(rank, size, n) for step, rank, size, n in sizes if step == 0} == {(0, 2, threads(2)), (1, 2, threads(2))}
    # the parameters are those of the committed steps alone: the one trained after the last commit
    # was rolled back on the survivor, not kept
    assert_params_match_the_replay(out, finals, 192)


@pytest.mark.timeout(300)
def test_worker_added_mid_run_joins_at_the_next_commit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    cmd = [sys.executable, "-m", "launch", "--elastic", "--min-np", "1", "--max-np", "2", "-np", "1",
           "--host-discovery-script", str(discover), str(SCRIPT), "--out", str(out), "--samples", "400",
           "--wait-for-size", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Add the host only after the first commit: Horovod drops a host update that arrives
        # before the running worker registered for notifications.
        deadline = time.monotonic() + 200
        while not any(f.stat().st_size for f in out.glob("indices.*.txt")):
            assert proc.poll() is None and time.monotonic() < deadline, "the first commit never came"
            time.sleep(0.5)
        hosts.write_text("localhost:1\n127.0.0.1:1\n")
        output, _ = proc.communicate(timeout=250)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)  # horovodrun's workers run in sessions of their own
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    indices, finals, sizes = read_run(out)
    assert sorted(indices) == list(range(400))
    assert sorted(f["size"] for f in finals) == [2, 2] and finals[0]["params"] == finals[1]["params"]
    joined_at = {step for step, _, size, _ in sizes if size == 2}
    assert len(joined_at) == 1 and joined_at.pop() > 0
    # the learning rate follows the new world size (linear scaling, 2 workers)
    assert all(f["lr"] == pytest.approx(2e-4, rel=0.05) for f in finals)
    assert_params_match_the_replay(out, finals, 400)


TINY_LM = [*TINY_LM_MODEL, "--warmup", "2", "--log-every", "1", "--seed", "7"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("where", ["step boundary", "backward"])
def test_train_lm_elastic_keeps_writing_durable_checkpoints_after_a_worker_dies(tmp_path, where):
    """The real example under --elastic: rank 1 SIGKILLs itself at step 8 (at the step boundary,
    or in its backward: the survivor's allreduce then fails inside the script's loop body, which
    the communication layer defers to the boundary); the survivor goes on alone and still writes
    checkpoints, and a plain (non-elastic) run resumes from the last one."""
    run_dir = tmp_path / "run"
    fault_where = {"FAULT_WHERE": "backward"} if where == "backward" else {}
    run_launch(["--elastic", "--min-np", "1", "--max-np", "2", "-H", TWO_HOSTS], SCRIPTS / "faulty_train_lm.py",
               [*TINY_LM, "--checkpoint-every", 5, "--commit-every", 2, "--steps", 16, "--run-dir", run_dir],
               env={"FAULT": "kill", "FAULT_RANK": "1", "FAULT_STEP": "8", **fault_where}, timeout=350)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resizes = [r for r in records if r.get("event") == "resize"]
    assert [r["world_size"] for r in resizes] == [1] and resizes[0]["step"] <= 8, resizes
    logged = [(r["step"], r["world_size"]) for r in records if "event" not in r]
    assert logged[-1] == (16, 1) and (1, 2) in logged
    # checkpoints written by the survivor, complete and valid
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if store.step_of(p) is not None)
    assert saved[-2:] == ["step-00000015", "step-00000016"], saved
    assert all(store.validate(run_dir / "checkpoints" / name)["step"] for name in saved)
    # losing every worker now would cost nothing: a plain restart resumes at step 16
    run_launch(["-np", "1"], REPO / "examples" / "train_lm.py", [*TINY_LM, "--steps", 18, "--run-dir", run_dir])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [16]
    assert [r["step"] for r in records if "event" not in r][-2:] == [17, 18]
