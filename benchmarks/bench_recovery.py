"""Section "recovery": time from a worker's death to the next completed training step.

Ways of surviving a SIGKILLed worker, on the same steady loop (benchmarks/workers/recovery.py,
2 workers, a step every ~50 ms, commit/checkpoint every 5 steps):

* distrib-elastic   python -m launch --elastic on two host names for this machine (a dead
                    worker blacklists its host): the survivor rolls back to the last commit and
                    goes on alone; after the cool-down the host returns and the world grows back
                    to 2 before the next kill;
* horovod-elastic   the same with plain Horovod Elastic (hvd.elastic.TorchState), started by
                    horovodrun directly with the same hosts, discovery and cool-down;
* torchrun-elastic  torch elastic's own mode: two torchrun agents (--nnodes 1:2, one worker
                    each) joined by a c10d rendezvous; the agent of the dead worker restarts it,
                    the world re-forms and resumes from the newest torch.save checkpoint.

The launcher's non-elastic restarts (``--max-restarts``, worker mode ``restart``) can be timed
the same way (``MODES``), but are left out of ``make bench`` to keep it within its budget.

One job per mode and block kills a worker several times; with several blocks the modes alternate
so that they share the machine's noise (``make bench`` runs one block: the modes differ by more
than the noise, and every job start costs seconds). A trial succeeds when a step completes after
the kill within TRIAL_TIMEOUT_S; after a failed trial the block goes on in a fresh job.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import launchers, stats

WORKER = "benchmarks/workers/recovery.py"
MODES = ("distrib-elastic", "horovod-elastic", "torchrun-elastic")
SURVIVORS_GO_ON = ("distrib-elastic", "horovod-elastic")  # the others start new processes
TRIAL_TIMEOUT_S = 30.0  # a recovery takes seconds; past this the trial failed
START_TIMEOUT_S = 180.0  # a job's first steps (imports of torch on a loaded machine can take a minute)
STEADY_STEPS = 3  # steps at full size after a recovery before the next kill
HOSTS = ("localhost", "127.0.0.1")  # two names for this machine: two "hosts" for Horovod Elastic
COOLDOWN_S = (1, 2)


# torchrun's workers by default share the rendezvous's TCPStore across restarts, and a restarted
# Gloo process group then reads the dead attempt's addresses from it: "Connection refused", failed
# attempts until one wins the race, or a hang (1 of 2 kills recovered, in 12 s, in a trial run
# here). Opting out gives every attempt a fresh store (5 of 5, about 4.5 s each).
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def restart_budget(kills: int) -> int:
    """Enough restarts for every kill, with room for restarted attempts that fail on their own."""
    return 3 * kills + 3


def commands(mode: str, out: Path, kills: int) -> List[List[str]]:
    """The processes that make up one job of ``mode`` (torchrun-elastic: one agent per "node")."""
    worker = lambda m: [WORKER, "--mode", m, "--out", str(out)]  # noqa: E731
    if mode == "distrib-elastic":
        return [[launchers.PY, "-m", "launch", "--elastic", "--min-np", "1", "--max-np", "2",
                 "-H", ",".join(f"{h}:1" for h in HOSTS), "--blacklist-cooldown", ",".join(map(str, COOLDOWN_S)),
                 *worker("elastic")]]
    if mode == "horovod-elastic":
        script = out / "discover.sh"
        script.write_text("#!/bin/sh\n" + "".join(f"echo {h}:1\n" for h in HOSTS))
        script.chmod(0o755)
        return [[launchers.HOROVODRUN, "--gloo", "-np", "2", "--min-np", "1",
                 "--max-np", "2", "--host-discovery-script", str(script), "--network-interface", "lo",
                 "--blacklist-cooldown-range", *map(str, COOLDOWN_S), launchers.PY, *worker("horovod")]]
    if mode == "torchrun-elastic":
        endpoint = f"127.0.0.1:{launchers.free_port()}"
        return [[launchers.TORCHRUN, "--nnodes", "1:2", "--nproc_per_node", "1",
                 "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "recovery",
                 "--rdzv_conf", f"is_host={int(agent == 0)}", "--max-restarts", str(restart_budget(kills)),
                 *worker("ddp")] for agent in range(2)]
    return [[launchers.PY, "-m", "launch", "-np", "2", "--max-restarts", str(restart_budget(kills)),
             *worker("restart")]]


def read_steps(out: Path) -> List[dict]:
    """The complete lines of steps.log: time step rank size generation pid."""
    path = out / "steps.log"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 6:
            t, step, rank, size, gen, pid = parts
            rows.append({"time": float(t), "step": int(step), "rank": int(rank), "size": int(size),
                         "gen": int(gen), "pid": int(pid)})
    return rows


def wait_for(predicate, proc: subprocess.Popen, timeout: float):
    """Poll ``predicate()`` until it returns something truthy; None on timeout or job exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    return None


def steady(out: Path, since: float) -> Optional[int]:
    """The pid of rank 1 once STEADY_STEPS steps ran at size 2 after ``since``, else None."""
    rows = [r for r in read_steps(out) if r["time"] > since and r["size"] == 2]
    if len({r["step"] for r in rows}) < STEADY_STEPS:
        return None
    return next((r["pid"] for r in reversed(rows) if r["rank"] == 1), None)


def recovered(mode: str, before: List[dict], victim: int, t_kill: float, out: Path,
              past: int = 0) -> Optional[float]:
    """Time of the first step (numbered above ``past``) completed after the kill by the re-formed
    world: a survivor in a new generation, or (restarting modes) a process started after the kill."""
    last_gen = {r["pid"]: r["gen"] for r in before}
    rows = [r for r in read_steps(out) if r["time"] > t_kill and r["step"] > past]
    if mode in SURVIVORS_GO_ON:
        ok = [r for r in rows if r["pid"] != victim and r["pid"] in last_gen and r["gen"] > last_gen[r["pid"]]]
    else:
        ok = [r for r in rows if r["pid"] not in last_gen]
    return min(r["time"] for r in ok) if ok else None


def run_job(mode: str, out: Path, kills: int) -> List[Optional[dict]]:
    """Start one job and kill a worker up to ``kills`` times: per kill, the seconds to the first step
    completed afterwards and to the first step past the one reached before the kill. After a failed
    trial (None: no recovery, or the job never became steady) the job is abandoned."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = launchers.worker_env({"PYTHONUNBUFFERED": "1", **(TORCHRUN_ENV if mode.startswith("torchrun") else {})})
    log = open(out / "job.log", "w")
    procs: List[subprocess.Popen] = []
    results: List[Optional[dict]] = []
    since = 0.0
    try:
        for cmd in commands(mode, out, kills):  # one process group for the job: stop_job ends it whole
            procs.append(subprocess.Popen(cmd, cwd=launchers.REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          process_group=procs[0].pid if procs else 0))
        proc = procs[0]
        for k in range(kills):
            victim = wait_for(lambda: steady(out, since), proc, START_TIMEOUT_S if k == 0 else TRIAL_TIMEOUT_S)
            if victim is None:
                results.append(None)
                break
            before = read_steps(out)
            t_kill = time.time()
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:  # it ended on its own between the log line and now
                results.append(None)
                break
            done = wait_for(lambda: recovered(mode, before, victim, t_kill, out), proc, TRIAL_TIMEOUT_S)
            # Restarts and roll-backs redo the steps since the last checkpoint or commit.
            last = max(r["step"] for r in before)
            regained = done and wait_for(lambda: recovered(mode, before, victim, t_kill, out, last), proc,
                                         TRIAL_TIMEOUT_S)
            if not regained:
                results.append(None)
                break
            results.append({"first_step_s": done - t_kill, "regained_s": regained - t_kill})
            since = regained
    finally:
        if procs:
            stop_job(procs)
        log.close()
    return results


def stop_job(procs: List[subprocess.Popen]) -> None:
    """End the job's whole process group (it may have ended by itself: a spent restart budget).
    torchrun's workers live in sessions of their own: its agents stop them on SIGTERM."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(procs[0].pid, sig)
        except ProcessLookupError:
            break
        try:
            for proc in procs:
                proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def run(opts) -> dict:
    trials, blocks = (1, 1) if opts.quick else (10, 1)  # a block per mode: one job start for its 10 kills
    per_block = [trials // blocks + (1 if b < trials % blocks else 0) for b in range(blocks)]
    results: Dict[str, List[Optional[dict]]] = {m: [] for m in MODES}
    for b in range(blocks):
        for mode in stats.rotate(MODES, b):
            t, got, job = time.time(), [], 0
            while len(got) < per_block[b]:  # a failed trial ends its job: go on in a fresh one
                got += run_job(mode, opts.work / f"recovery-{mode}-{b}-{job}", per_block[b] - len(got))
                job += 1
            shown = [None if g is None else round(g["first_step_s"], 2) for g in got]
            print(f"  recovery {mode} block {b}: {shown} in {time.time() - t:.0f} s", flush=True)
            results[mode].extend(got)
    rows = []
    for mode in MODES:
        ok = [r for r in results[mode] if r is not None]
        rows.append({"mode": mode, "trials": len(results[mode]), "successes": len(ok),
                     "first_step_s": stats.summary([r["first_step_s"] for r in ok]) if ok else None,
                     "regained_s": stats.summary([r["regained_s"] for r in ok]) if ok else None,
                     "trials_s": results[mode]})
    return {"title": "Recovery from a SIGKILLed worker (2 workers)", "rows": rows, "markdown": _table(rows)}


def _table(rows) -> str:
    out = ["| mode | recovered | kill -> next step, s: median (min-max) | max | "
           "kill -> past the step reached, s: median (min-max) | max |", "|---|---|---|---|---|---|"]
    for r in rows:
        first, regained = r["first_step_s"], r["regained_s"]
        figures = (f"{stats.fmt_value(first, '', 2)} | {first['max']:.2f} | {stats.fmt_value(regained, '', 2)} | "
                   f"{regained['max']:.2f}" if first else "n/a | n/a | n/a | n/a")
        out.append(f"| {r['mode']} | {r['successes']}/{r['trials']} | {figures} |")
    out += ["", "From the SIGKILL of rank 1 to the first training step completed afterwards by the re-formed "
            "(elastic) or restarted world, and to the first step numbered past the last one completed before "
            "the kill (restarts and roll-backs redo the steps since the last checkpoint or commit; one every 5 "
            "steps of ~50 ms). distrib-elastic and horovod-elastic: hosts localhost:1,127.0.0.1:1, cool-down "
            f"{COOLDOWN_S[0]}-{COOLDOWN_S[1]} s (the survivor goes on alone, the host returns); torchrun-elastic: "
            "two agents with --nnodes 1:2 and a c10d rendezvous, DDP over Gloo, "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (with the default shared store restarted workers read the "
            "dead attempt's addresses and often fail or hang). "
            f"A failed trial: no such step within {TRIAL_TIMEOUT_S:.0f} s of the kill. The kills of a mode "
            "run in one job (a fresh one after a failed trial)."]
    return "\n".join(out)
