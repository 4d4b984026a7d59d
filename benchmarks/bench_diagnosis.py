"""Section "diagnosis": what the launcher's failure diagnosis costs a healthy job.

The heartbeat (distrib/watch/heartbeat.py) carries the hang report's progress, the collective records
of the mismatch check and the phase windows of the straggler check. Measured two ways:

* the training step of the 4.2 M-parameter MLP on 2 workers through ``python -m launch``, with the
  heartbeat on (the default) and off (``DISTRIB_HEARTBEAT=0``), alternated per round;
* in one process, what a rank's own thread pays per call: ``beat(name, shape, dtype)`` before a
  collective and ``step_done`` once per step (the sending happens on the heartbeat's thread).
"""
from __future__ import annotations

import json
import statistics
import time

from benchmarks import launchers, stats
from benchmarks.bench_step import STEP

SETTINGS = {"heartbeat on": "1", "heartbeat off": "0"}


class _NullChannel:
    def send(self, message):
        return True

    def receive(self, timeout):
        time.sleep(timeout)
        return []


def per_call_us(calls: int = 200_000) -> dict:
    """Microseconds per beat() with a named collective and per step_done(), on this thread."""
    from distrib.watch.heartbeat import Heartbeat
    hb = Heartbeat(_NullChannel(), rank=0, interval=3600)
    hb.sending = True  # no thread: the calls alone
    t0 = time.perf_counter()
    for _ in range(calls):
        hb.beat("allreduce.grads.0", [1024], "float32")
    beat_us = 1e6 * (time.perf_counter() - t0) / calls
    phases = {"data": 0.001, "compute": 0.01, "allreduce": 0.002, "optimizer": 0.001}
    t0 = time.perf_counter()
    for step in range(1, calls // 10 + 1):
        hb.step_done(step, phases, 0.015)
    step_us = 1e6 * (time.perf_counter() - t0) / (calls // 10)
    return {"beat_us": beat_us, "step_done_us": step_us}


def run(opts) -> dict:
    ms = {name: [] for name in SETTINGS}
    steps = 20 if opts.quick else 60
    for r in range(opts.rounds):
        for name in stats.rotate(list(SETTINGS), r):
            out = opts.work / "diagnosis-step.json"
            out.unlink(missing_ok=True)
            env = launchers.worker_env({"DISTRIB_HEARTBEAT": SETTINGS[name]})
            argv = [STEP, "--impl", "distrib", "--variants", "buckets", "--model", "mlp", "--warmup", "5",
                    "--steps", str(steps), "--out", str(out)]
            launchers.run([launchers.PY, "-m", "launch", "-np", str(opts.np), *argv], env)
            times = json.loads(out.read_text())["by_model"]["mlp"]["variants"]["buckets"]
            ms[name].append(statistics.median(times))
    calls = per_call_us()
    row = {"step_ms": {n: stats.summary(v) for n, v in ms.items()},
           "ratio": {"a": "heartbeat on", "b": "heartbeat off", "what": "step time",
                     **stats.ratios(ms["heartbeat on"], ms["heartbeat off"])},
           "per_call_us": calls}
    md = ("| on / off | step ms, on | step ms, off | beat() per collective | step_done() per step |\n"
          "|---|---|---|---|---|\n"
          f"| {stats.fmt(row['ratio'])} | {stats.fmt_value(row['step_ms']['heartbeat on'], '', 2)} | "
          f"{stats.fmt_value(row['step_ms']['heartbeat off'], '', 2)} | {calls['beat_us']:.2f} us | "
          f"{calls['step_done_us']:.2f} us |\n\nThe MLP's step on 2 workers through `python -m launch`, the heartbeat "
          "on (default) and off (`DISTRIB_HEARTBEAT=0`), alternated per round; the per-call costs on the rank's "
          "own thread, in one process.")
    return {"title": "Failure diagnosis: what the heartbeat costs a healthy step", "rows": [row], "markdown": md}
