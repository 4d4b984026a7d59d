"""Section "recovery": time from a worker's death to the next completed training step.

Three ways of surviving a SIGKILLed worker, measured on the same steady loop
(benchmarks/workers/recovery.py, 2 workers, a step every ~50 ms, commit/checkpoint every 5):

* elastic   python -m launch --elastic on two host names for this machine (FACTS: a dead worker
            blacklists its host): the survivor rolls back to the last commit and goes on alone;
            after the cool-down the host returns and the world grows back to 2 before the next kill;
* restart   python -m launch --max-restarts: every worker is stopped and started again, and
            resumes from the newest checkpoint;
* torchrun  torchrun --max-restarts on the same loop with DDP over Gloo and torch.save checkpoints.

One job per mode and block kills a worker several times; blocks alternate the modes so that
they share the machine's noise. A trial succeeds when a step completes after the kill within
TRIAL_TIMEOUT_S; after a failed trial the block goes on in a fresh job.
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
MODES = ("elastic", "restart", "torchrun")
TRIAL_TIMEOUT_S = 30.0  # a recovery takes seconds; past this the trial failed
STEADY_STEPS = 3  # steps at full size after a recovery before the next kill


def restart_budget(kills: int) -> int:
    """Enough restarts for every kill, and for restarted attempts that fail on their own
    (torchrun's sometimes do: Gloo cannot connect to a peer of the attempt before)."""
    return 3 * kills + 3


def command(mode: str, out: Path, kills: int) -> List[str]:
    if mode == "elastic":
        return [launchers.PY, "-m", "launch", "--elastic", "--min-np", "1", "--max-np", "2",
                "-H", "localhost:1,127.0.0.1:1", "--blacklist-cooldown", "1,2", WORKER,
                "--mode", "elastic", "--out", str(out)]
    if mode == "restart":
        return [launchers.PY, "-m", "launch", "-np", "2", "--max-restarts", str(restart_budget(kills)), WORKER,
                "--mode", "restart", "--out", str(out)]
    return [str(Path(launchers.PY).with_name("torchrun")), "--nproc_per_node", "2", "--max-restarts",
            str(restart_budget(kills)), "--master_port", str(launchers.free_port()), WORKER, "--mode", "ddp", "--out", str(out)]


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


def recovered(mode: str, before: List[dict], victim: int, t_kill: float, out: Path) -> Optional[float]:
    """Time of the first step completed after the kill by the re-formed (or restarted) world."""
    if mode == "elastic":
        last_gen = {}
        for r in before:
            last_gen[r["pid"]] = r["gen"]
        ok = [r for r in read_steps(out) if r["time"] > t_kill and r["pid"] != victim
              and r["pid"] in last_gen and r["gen"] > last_gen[r["pid"]]]
    else:
        gen = max(r["gen"] for r in before)
        ok = [r for r in read_steps(out) if r["time"] > t_kill and r["gen"] > gen]
    return min(r["time"] for r in ok) if ok else None


def run_job(mode: str, out: Path, kills: int) -> List[Optional[float]]:
    """Start one job and kill a worker up to ``kills`` times: recovery seconds per kill. After a
    failed trial (None: no recovery, or the job never became steady) the job is abandoned."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = launchers.worker_env({"PYTHONUNBUFFERED": "1"})
    log = open(out / "job.log", "w")
    proc = subprocess.Popen(command(mode, out, kills), cwd=launchers.REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    results: List[Optional[float]] = []
    since = 0.0
    try:
        for _ in range(kills):
            victim = wait_for(lambda: steady(out, since), proc, TRIAL_TIMEOUT_S)
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
            results.append(done - t_kill if done else None)
            if done is None:
                break
            since = done
    finally:
        stop_job(proc)
        log.close()
    return results


def stop_job(proc: subprocess.Popen) -> None:
    """End the job's whole process group (it may have ended by itself: a spent restart budget)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def run(opts) -> dict:
    trials = 4 if opts.quick else 10
    blocks = 2
    per_block = [trials // blocks + (1 if b < trials % blocks else 0) for b in range(blocks)]
    results: Dict[str, List[Optional[float]]] = {m: [] for m in MODES}
    for b in range(blocks):
        for mode in stats.rotate(MODES, b):
            t, got, job = time.time(), [], 0
            while len(got) < per_block[b]:  # a failed trial ends its job: go on in a fresh one
                got += run_job(mode, opts.work / f"recovery-{mode}-{b}-{job}", per_block[b] - len(got))
                job += 1
            print(f"  recovery {mode} block {b}: {[None if g is None else round(g, 2) for g in got]} "
                  f"in {time.time() - t:.0f} s", flush=True)
            results[mode].extend(got)
    rows = []
    for mode in MODES:
        ok = [r for r in results[mode] if r is not None]
        rows.append({"mode": mode, "trials": len(results[mode]), "successes": len(ok),
                     "recovery_s": stats.summary(ok) if ok else None, "all_s": results[mode]})
    return {"title": "Recovery from a SIGKILLed worker (2 workers)", "rows": rows, "markdown": _table(rows)}


def _table(rows) -> str:
    out = ["| mode | success | recovery median s | max s | min s |", "|---|---|---|---|---|"]
    for r in rows:
        s = r["recovery_s"]
        figures = f"{s['median']:.2f} | {s['max']:.2f} | {s['min']:.2f}" if s else "n/a | n/a | n/a"
        out.append(f"| {r['mode']} | {r['successes']}/{r['trials']} | {figures} |")
    out += ["", "Recovery: from the SIGKILL to the first training step completed afterwards by the "
            "re-formed (elastic) or restarted world. elastic: python -m launch --elastic (the survivor "
            "goes on alone); restart: python -m launch --max-restarts (all workers restart and resume "
            "from the last checkpoint); torchrun: torchrun --max-restarts with DDP over Gloo."]
    return "\n".join(out)
