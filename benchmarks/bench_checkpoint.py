"""Section "checkpoint": what checkpointing costs training.

* During training (2 workers under the launcher, benchmarks/workers/checkpoint_train.py): the
  step-time overhead of a checkpoint every K steps with distrib's async writer running beside
  the steps, against the synchronous save and torch DCP's ``async_save`` of the same state.
* One process (``python benchmarks/bench_checkpoint.py [--mb 64] [--rounds 5]``): how long a
  save blocks the training loop, async vs sync vs a bare ``torch.save`` + fsync of the same
  state dicts (the floor for these bytes), and resume time (start -> first step) against a
  fresh start, alternated. The state is an MLP of about --mb MiB of float32 parameters with
  AdamW moments (~3x that is written).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import launchers, stats  # noqa: E402
from distrib.checkpoint import CheckpointManager  # noqa: E402
from distrib.context import Context  # noqa: E402


def make_state(mb: float):
    width = 1024
    depth = max(1, int(mb * 2**20 / 4 / (width * width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step(model, optimizer)
    return model, optimizer


def step(model, optimizer):
    model(torch.randn(8, 1024)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def ctx1() -> Context:
    return Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo")


def bare_save(path: Path, state) -> None:
    with open(path, "wb") as f:
        torch.save({k: v.state_dict() for k, v in state.items()}, f)
        f.flush()
        os.fsync(f.fileno())


def bench_saves(work: Path, mb: float, rounds: int):
    """(state bytes, {kind: [seconds per round]}) of the three ways of saving, rotated per round."""
    model, optimizer = make_state(mb)
    state = {"model": model, "optimizer": optimizer}
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    times = {"async_blocked": [], "async_write": [], "sync": [], "bare": [], "step": []}
    managers = {"async": CheckpointManager(work / "async", ctx1(), keep=2, async_save=True),
                "sync": CheckpointManager(work / "sync", ctx1(), keep=2, async_save=False)}
    for r in range(rounds):
        t0 = time.perf_counter()
        step(model, optimizer)
        times["step"].append(time.perf_counter() - t0)
        for kind in stats.rotate(["async", "sync", "bare"], r):  # no kind always runs first
            t0 = time.perf_counter()
            if kind == "bare":
                bare_save(work / "bare.pt", state)
            else:
                managers[kind].save(r + 1, state)
            elapsed = time.perf_counter() - t0
            if kind == "async":
                times["async_blocked"].append(elapsed)
                managers[kind].wait()
                times["async_write"].append(time.perf_counter() - t0)
            else:
                times[kind].append(elapsed)
    for m in managers.values():
        m.close()
    return nbytes, times


CHILD = r"""
import sys, time, torch
t_start = float(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from benchmarks.bench_checkpoint import make_state, step, ctx1
from distrib.checkpoint import CheckpointManager
model, optimizer = make_state(float(sys.argv[2]))
ckpt = CheckpointManager(sys.argv[1], ctx1(), keep=2)
t0 = time.perf_counter()
restored = ckpt.restore({"model": model, "optimizer": optimizer}, resume=sys.argv[5])
t_restore = time.perf_counter() - t0
step(model, optimizer)
print(time.time() - t_start, t_restore, restored)
"""


def bench_resume(work: Path, mb: float, runs: int):
    """{"resume"|"fresh": {"to_first_step": [s], "restore_call": [s]}}: a process resuming the
    async run's checkpoint, and one starting from scratch, alternated."""
    out = {k: {"to_first_step": [], "restore_call": []} for k in ("resume", "fresh")}
    for r in range(runs):
        for kind in stats.rotate(["resume", "fresh"], r):
            run_dir, mode = (work / "async", "auto") if kind == "resume" else (work / "fresh", "none")
            line = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(mb), repr(time.time()),
                                   str(REPO), mode], capture_output=True, text=True, check=True,
                                  cwd=REPO).stdout.split()
            if (line[2] != "None") != (kind == "resume"):
                raise RuntimeError(f"{kind} run restored {line[2]}: the benchmark's checkpoint is missing")
            out[kind]["to_first_step"].append(float(line[0]))
            out[kind]["restore_call"].append(float(line[1]))
    return out


def measure(work: Path, mb: float, rounds: int, resume_runs: int) -> dict:
    """Every figure of this benchmark, measured in a fresh ``work/bench_checkpoint`` folder."""
    work = work / "bench_checkpoint"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        nbytes, saves = bench_saves(work, mb, rounds)
        resume = bench_resume(work, mb, resume_runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = lambda a, b, what: {"a": a, "b": b, "what": what, **stats.ratios(saves[a], saves[b])}  # noqa: E731
    ratios = {"async_blocked_vs_bare": ratio("async_blocked", "bare", "step blocked by an async save / bare torch.save"),
              "sync_vs_bare": ratio("sync", "bare", "sync save / bare torch.save"),
              "async_blocked_vs_sync": ratio("async_blocked", "sync", "step blocked by an async save / sync save"),
              "resume_vs_fresh": {"a": "resume", "b": "fresh", "what": "start to first step",
                                  **stats.ratios(resume["resume"]["to_first_step"], resume["fresh"]["to_first_step"])}}
    return {"bench": "checkpoint", "state_bytes": nbytes, "rounds": rounds,
            "saves_s": {k: stats.summary(v) for k, v in saves.items()},
            "resume_s": {k: {m: stats.summary(v) for m, v in d.items()} for k, d in resume.items()},
            "ratios": ratios, "torch": torch.__version__, "cpus": os.cpu_count()}


def markdown(result: dict) -> str:
    saves, resume = result["saves_s"], result["resume_s"]
    rows = [("train step (no save)", saves["step"]), ("async save: step blocked", saves["async_blocked"]),
            ("async save: until committed", saves["async_write"]), ("sync save", saves["sync"]),
            ("bare torch.save + fsync", saves["bare"]),
            ("resume: start -> first step", resume["resume"]["to_first_step"]),
            ("of which restore()", resume["resume"]["restore_call"]),
            ("fresh: start -> first step", resume["fresh"]["to_first_step"])]
    out = [f"State: {result['state_bytes'] / 2**20:.0f} MiB (params + AdamW moments), one process, "
           f"{result['rounds']} rotated rounds.", "", "| what | median ms (min-max) |", "|---|---|"]
    out += [f"| {name} | {1e3 * s['median']:.1f} ({1e3 * s['min']:.1f}-{1e3 * s['max']:.1f}) |" for name, s in rows]
    out += ["", "| ratio | per round |", "|---|---|"]
    out += [f"| {r['a']} / {r['b']} ({r['what']}) | {stats.fmt(r)} |" for r in result["ratios"].values()]
    return "\n".join(out)


TRAIN_WORKER = "benchmarks/workers/checkpoint_train.py"
OVERHEAD_GOAL = 0.035  # CheckFreq's anchor: checkpointing costs at most 3.5 % of the training time


GOAL_EVERY = 100  # the goal's checkpoint interval (steps)


def during_training(opts, model: str = "lm") -> dict:
    """What one checkpoint costs the training steps, 2 workers under the launcher, and so the
    overhead of a checkpoint every GOAL_EVERY steps.

    A checkpoint every 100 steps of the example LM costs well under the run-to-run noise of a
    100-step segment on a shared 2-core machine (+-5-8 % in a 3-round run here), so the cost is
    measured where it can be resolved: many short segments (one checkpoint in 10 steps, each
    segment ending when its write is committed), alternated with segments without one. Per round,
    cost = segment time - the no-checkpoint segment's; the overhead at every K steps is that cost
    over K steps' time, valid while a write finishes within K steps (it does within 10 here)."""
    every, rounds = (10, 2) if opts.quick else (10, 20)
    out = opts.work / "checkpoint-train.json"
    out.unlink(missing_ok=True)
    env = launchers.worker_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(launchers.free_port())})
    argv = [TRAIN_WORKER, "--model", model, "--every", str(every), "--rounds", str(rounds),
            "--dir", str(opts.work / "checkpoint-train"), "--out", str(out)]
    launchers.run(launchers.launch(opts.np, argv), env, timeout=900)
    got = json.loads(out.read_text())
    seg = got["segments"]
    none_step_ms = [1e3 * t / every for t in seg["none"]]
    cost_ms = {v: [1e3 * (t - n) for t, n in zip(seg[v], seg["none"])] for v in seg if v != "none"}
    return {"model": model, "every": every, "rounds": rounds, "goal_every": GOAL_EVERY,
            "state_bytes": got["state_bytes"],
            "cost_ms": {v: stats.summary(c) for v, c in cost_ms.items()},
            "overhead": {v: stats.summary([c / (GOAL_EVERY * s) for c, s in zip(cs, none_step_ms)])
                         for v, cs in cost_ms.items()},
            "overhead_measured": {v: stats.summary([t / n - 1 for t, n in zip(seg[v], seg["none"])])
                                  for v in cost_ms},
            "segment_step_ms": {v: stats.summary([1e3 * t / every for t in seg[v]]) for v in seg},
            "max_step_ms": {v: max(ms) for v, ms in got["steps"].items()}}


def during_markdown(d: dict) -> str:
    out = [f"{d['model']}, 2 workers, AdamW state {d['state_bytes'] / 2**20:.1f} MiB; {d['rounds']} rounds of "
           f"{d['every']}-step segments, one checkpoint each, the four variants alternated in the same processes.", "",
           f"| variant | cost of one checkpoint, ms | overhead at one per {d['goal_every']} steps | overhead measured "
           f"at one per {d['every']} | ms per step incl. the checkpoint | slowest step ms |",
           "|---|---|---|---|---|---|"]
    for v, s in d["segment_step_ms"].items():
        if v == "none":
            out.append(f"| none | reference | | | {stats.fmt_value(s, '', 1)} | {d['max_step_ms'][v]:.0f} |")
            continue
        out.append(f"| {v} | {stats.fmt_value(d['cost_ms'][v], '', 1)} | {stats.fmt_pct(d['overhead'][v])} | "
                   f"{stats.fmt_pct(d['overhead_measured'][v])} | {stats.fmt_value(s, '', 1)} | "
                   f"{d['max_step_ms'][v]:.0f} |")
    out += ["", "cost: segment time with the checkpoint - the adjacent segment's without, per round; overhead at one "
            f"per {d['goal_every']} steps: that cost / ({d['goal_every']} x the step time without). none: no "
            "checkpoint; async: distrib's CheckpointManager (a thread writes while the steps run; the segment ends "
            "when the write is committed); sync: CheckpointManager(async_save=False); dcp-async: "
            "torch.distributed.checkpoint.async_save of the same model and optimizer state over a Gloo group of the "
            f"same workers. Goal: async overhead <= {100 * OVERHEAD_GOAL:.1f} % at --checkpoint-every "
            f"{d['goal_every']} (CheckFreq)."]
    return "\n".join(out)


def run(opts) -> dict:
    """The ``checkpoint`` section of ``python -m benchmarks``."""
    result = measure(opts.work, mb=8 if opts.quick else 64, rounds=max(5, opts.rounds),
                     resume_runs=1 if opts.quick else 2)
    during = during_training(opts)
    return {"title": "Checkpoint: cost during training, time a step is blocked, and resume time",
            "rows": [result], "during_training": during,
            "markdown": "### During training\n\n" + during_markdown(during)
            + "\n\n### One process: time a step is blocked\n\n" + markdown(result)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=64, help="MiB of float32 parameters (x3 with AdamW moments)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--resume-runs", type=int, default=3)
    p.add_argument("--dir", type=Path, default=REPO / "benchmarks" / "_work")
    args = p.parse_args(argv)
    if args.rounds < 5:
        p.error("--rounds must be >= 5 for a meaningful median")
    result = measure(args.dir, args.mb, args.rounds, args.resume_runs)
    print(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
