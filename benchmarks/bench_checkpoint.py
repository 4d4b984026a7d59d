"""How long does a checkpoint block training? Async vs sync save vs bare torch.save + fsync.

    python benchmarks/bench_checkpoint.py [--mb 64] [--rounds 5] [--dir benchmarks/_work]

One process, real files. The state is an MLP of about --mb MiB of float32 parameters with
AdamW moments (so ~3x that is written). Each round runs, in rotating order:

* async:  the time ``CheckpointManager.save`` (async) blocks the training loop (CPU snapshot);
          the background write that follows is timed too (write_s) and waited for outside the
          measurement;
* sync:   ``save`` with ``async_save=False`` (write, fsync, marker, rename, retention);
* bare:   ``torch.save`` of the same state dicts to one file + fsync: the floor for these bytes.

Then resume time: a fresh process from start to the end of its first training step, resuming
that checkpoint vs starting from scratch. Prints a table and one JSON line; figures are
noisy on a shared machine, so compare the ratios measured side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
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


def summary(xs):
    xs = sorted(xs)
    return {"median_s": statistics.median(xs), "min_s": xs[0], "max_s": xs[-1], "n": len(xs)}


def bench_saves(work: Path, mb: float, rounds: int):
    model, optimizer = make_state(mb)
    state = {"model": model, "optimizer": optimizer}
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    times = {"async_blocked": [], "async_write": [], "sync": [], "bare": [], "step": []}
    managers = {"async": CheckpointManager(work / "async", ctx1(), keep=2, async_save=True),
                "sync": CheckpointManager(work / "sync", ctx1(), keep=2, async_save=False)}
    kinds = ["async", "sync", "bare"]
    for r in range(rounds):
        t0 = time.perf_counter()
        step(model, optimizer)
        times["step"].append(time.perf_counter() - t0)
        for kind in kinds[r % 3:] + kinds[:r % 3]:  # rotate the order: no kind always runs first
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
    return nbytes, {k: summary(v) for k, v in times.items()}


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
    run_dir = work / "async"
    out = {}
    for mode in ("auto", "none"):
        if mode == "none":
            run_dir = work / "fresh"
        totals, restores = [], []
        for _ in range(runs):
            line = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(mb), repr(time.time()),
                                   str(REPO), mode], capture_output=True, text=True, check=True,
                                  cwd=REPO).stdout.split()
            totals.append(float(line[0]))
            restores.append(float(line[1]))
            assert (line[2] != "None") == (mode == "auto"), line
        out["resume" if mode == "auto" else "fresh"] = {"to_first_step": summary(totals),
                                                        "restore_call": summary(restores)}
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
    bare = saves["bare"]["median_s"]
    ratios = {"async_blocked/bare": saves["async_blocked"]["median_s"] / bare,
              "sync/bare": saves["sync"]["median_s"] / bare,
              "async_blocked/sync": saves["async_blocked"]["median_s"] / saves["sync"]["median_s"],
              "resume/fresh_to_first_step": resume["resume"]["to_first_step"]["median_s"]
              / resume["fresh"]["to_first_step"]["median_s"]}
    return {"bench": "checkpoint", "state_bytes": nbytes, "rounds": rounds, "saves": saves,
            "resume": resume, "ratios": ratios, "torch": torch.__version__, "cpus": os.cpu_count()}


def markdown(result: dict) -> str:
    saves, resume = result["saves"], result["resume"]
    rows = [("train step (no save)", saves["step"]), ("async save: step blocked", saves["async_blocked"]),
            ("async save: until committed", saves["async_write"]), ("sync save", saves["sync"]),
            ("bare torch.save + fsync", saves["bare"]),
            ("resume: start -> first step", resume["resume"]["to_first_step"]),
            ("  of which restore()", resume["resume"]["restore_call"]),
            ("fresh: start -> first step", resume["fresh"]["to_first_step"])]
    out = [f"State: {result['state_bytes'] / 2**20:.0f} MiB (params + AdamW moments), one process, "
           f"{result['rounds']} rotated rounds.", "", "| what | median ms | min-max ms |", "|---|---|---|"]
    out += [f"| {name.strip()} | {s['median_s'] * 1000:.1f} | {s['min_s'] * 1000:.1f}-{s['max_s'] * 1000:.1f} |"
            for name, s in rows]
    out += ["", "| ratio | value |", "|---|---|"]
    out += [f"| {name} | {value:.2f}x |" for name, value in result["ratios"].items()]
    return "\n".join(out)


def run(opts) -> dict:
    """The ``checkpoint`` section of ``python -m benchmarks``."""
    result = measure(opts.work, mb=16 if opts.quick else 64, rounds=max(5, opts.rounds),
                     resume_runs=2 if opts.quick else 3)
    return {"title": "Checkpoint: time a step is blocked, and resume time", "rows": [result],
            "markdown": markdown(result)}


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
