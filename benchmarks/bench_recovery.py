"""Section "recovery": time from a worker's death to the next completed training step.

Three ways of surviving a SIGKILLed worker, measured on the same steady loop
(benchmarks/workers/recovery.py, 2 workers, a step every ~50 ms, commit/checkpoint every 5):

* elastic   python -m launch --elastic on two host names for this machine (FACTS: a dead worker
            blacklists its host): the survivor rolls back to the last commit and goes on alone;
            after the cool-down the host returns and the world grows back to 2 before the next kill;
* restart   python -m launch --max-restarts: every worker is stopped and started again, and
            resumes from the newest checkpoint;
* torchrun  torchrun --standalone --max-restarts on the same loop with DDP over Gloo and
            torch.save checkpoints (TORCHRUN_ENV: see there).

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


# torchrun's workers by default share the rendezvous's TCPStore across restarts, and a restarted
# Gloo process group then reads the dead attempt's addresses from it: "Connection refused", failed
# attempts until one wins the race, or a hang (1 of 2 kills recovered, in 12 s, in a trial run
# here). Opting out gives every attempt a fresh store (5 of 5, about 4.5 s each).
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def restart_budget(kills: int) -> int:
    """Enough restarts for every kill, with room for restarted attempts that fail on their own."""
    return 3 * kills + 3


def command(mode: str, out: Path, kills: int) -> List[str]:
    if mode == "elastic":
        return [launchers.PY, "-m", "launch", "--elastic", "--min-np", "1", "--max-np", "2",
                "-H", "localhost:1,127.0.0.1:1", "--blacklist-cooldown", "1,2", WORKER,
                "--mode", "elastic", "--out", str(out)]
    if mode == "restart":
        return [launchers.PY, "-m", "launch", "-np", "2", "--max-restarts", str(restart_budget(kills)), WORKER,
                "--mode", "restart", "--out", str(out)]
    # --standalone: torchrun's own single-machine rendezvous (c10d on a free port), a new round per restart.
    return [str(Path(launchers.PY).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
            "--max-restarts", str(restart_budget(kills)), WORKER, "--mode", "ddp", "--out", str(out)]


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
    (or restarted) world."""
    if mode == "elastic":
        last_gen = {}
        for r in before:
            last_gen[r["pid"]] = r["gen"]
        ok = [r for r in read_steps(out) if r["time"] > t_kill and r["pid"] != victim
              and r["pid"] in last_gen and r["gen"] > last_gen[r["pid"]]]
    else:
        gen = max(r["gen"] for r in before)
        ok = [r for r in read_steps(out) if r["time"] > t_kill and r["gen"] > gen]
    ok = [r for r in ok if r["step"] > past]
    return min(r["time"] for r in ok) if ok else None


def run_job(mode: str, out: Path, kills: int) -> List[Optional[dict]]:
    """Start one job and kill a worker up to ``kills`` times: per kill, the seconds to the first step
    completed afterwards and to the first step past the one reached before the kill. After a failed
    trial (None: no recovery, or the job never became steady) the job is abandoned."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = launchers.worker_env({"PYTHONUNBUFFERED": "1", **(TORCHRUN_ENV if mode == "torchrun" else {})})
    log = open(out / "job.log", "w")
    proc = subprocess.Popen(command(mode, out, kills), cwd=launchers.REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    results: List[Optional[dict]] = []
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
    out = ["| mode | success | kill -> next step: median s | max s | kill -> past the step reached: median s | max s |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        first, regained = r["first_step_s"], r["regained_s"]
        figures = (f"{first['median']:.2f} | {first['max']:.2f} | {regained['median']:.2f} | {regained['max']:.2f}"
                   if first else "n/a | n/a | n/a | n/a")
        out.append(f"| {r['mode']} | {r['successes']}/{r['trials']} | {figures} |")
    out += ["", "From the SIGKILL of rank 1 to the first training step completed afterwards by the re-formed "
            "(elastic) or restarted world, and to the first step numbered past the last one completed before "
            "the kill (restarts and roll-backs redo the steps since the last checkpoint or commit; one every 5 "
            "steps of ~50 ms). elastic: python -m launch --elastic on localhost:1,127.0.0.1:1 (the survivor "
            "goes on alone, the host returns after the cool-down); restart: python -m launch --max-restarts "
            "(every worker restarts and resumes from the last checkpoint); torchrun: torchrun --standalone "
            "--max-restarts with DDP over Gloo and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (with the default "
            "shared store its restarted workers read the dead attempt's addresses and often fail or hang). "
            f"A failed trial: no such step within {TRIAL_TIMEOUT_S:.0f} s of the kill. Modes alternate in "
            "blocks of kills within one job each."]
    return "\n".join(out)
