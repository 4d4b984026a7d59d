"""Section "memory": what sharding (``distrib.wrap(..., shard=...)``, ZeRO stages 1 and 2) saves.

A 50.4 M-parameter MLP (12 x Linear(2048, 2048), float32) trained with AdamW on 2 and 3
workers, unsharded, ``shard="optimizer"`` and ``shard="gradients"``: per worker, the peak
resident memory (``ru_maxrss``, and the same above the worker's resident memory before the
model was built: torch, Horovod and the interpreter), the optimizer-state bytes it holds, the
gradient bytes it holds when the step starts, and the step time. Every round runs the three
modes at each world size once (peak memory does not vary from run to run).

    python benchmarks/bench_memory.py --worker --shard gradients --out FILE   (under the launcher)
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import launchers, stats  # noqa: E402

MODES = ("none", "optimizer", "gradients")
WIDTH, DEPTH, BATCH = 2048, 12, 16


def run(opts) -> dict:
    # Peak memory does not vary from run to run: one run per world size and mode (a launch of ~20 s)
    # keeps make bench within its budget; the step-time ratios here are then single runs.
    steps = 3 if opts.quick else 6
    sizes = (2,) if opts.quick else (2, 3)
    depth = 4 if opts.quick else DEPTH  # quick: a third of the model, enough to run every path
    raw = {(n, m): [] for n in sizes for m in MODES}
    for n, mode in raw:
        out = opts.work / f"memory-{n}-{mode}.json"
        cmd = launchers.launch(n, ["benchmarks/bench_memory.py", "--worker", "--shard", mode,
                                   "--depth", str(depth), "--steps", str(steps), "--out", str(out)])
        launchers.run(cmd, launchers.worker_env(), timeout=900)
        raw[(n, mode)].append(json.loads(out.read_text()))
    rows = []
    for (n, mode), reports in raw.items():
        worst = [max(rep["ranks"], key=lambda w: w["peak_rss"]) for rep in reports]  # the worker that peaked highest
        base = raw[(n, "none")]
        rows.append({
            "workers": n, "shard": mode, "params": reports[0]["params"],
            "peak_rss_mb": stats.summary([w["peak_rss"] / 2**20 for w in worst]),
            "peak_above_start_mb": stats.summary([(w["peak_rss"] - w["start_rss"]) / 2**20 for w in worst]),
            "optimizer_state_mb": max(w["state_bytes"] for w in reports[0]["ranks"]) / 2**20,
            "gradient_mb": max(w["grad_bytes"] for w in reports[0]["ranks"]) / 2**20,
            "step_ms": stats.summary([rep["step_s"] * 1e3 for rep in reports]),
            "peak_ratio": stats.ratios([max(w["peak_rss"] for w in rep["ranks"]) for rep in reports],
                                       [max(w["peak_rss"] for w in rep["ranks"]) for rep in base]),
            "peak_above_start_ratio": stats.ratios(
                [max(w["peak_rss"] - w["start_rss"] for w in rep["ranks"]) for rep in reports],
                [max(w["peak_rss"] - w["start_rss"] for w in rep["ranks"]) for rep in base]),
            "step_ratio": stats.ratios([rep["step_s"] for rep in reports], [rep["step_s"] for rep in base]),
        })
    return {"title": "Memory: sharded optimizer state and gradients (ZeRO stages 1 and 2)", "rows": rows,
            "markdown": markdown(rows, steps)}


def markdown(rows, steps: int) -> str:
    lines = [f"{rows[0]['params'] / 1e6:.1f} M parameters (float32), AdamW, {steps} steps per run, one run per "
             "world size and mode; per worker (the highest of the workers). Ratios: against unsharded at the same "
             "world size.", "",
             "| workers | shard | peak RSS | peak above start | x unsharded | optimizer state | gradients held "
             "| step | x unsharded |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['shard']} | {stats.fmt_value(r['peak_rss_mb'], 'MiB', 0)} "
            f"| {stats.fmt_value(r['peak_above_start_mb'], 'MiB', 0)} | {stats.fmt(r['peak_ratio'])} "
            f"(above start {r['peak_above_start_ratio']['median']:.2f}x) | {r['optimizer_state_mb']:.0f} MiB "
            f"| {r['gradient_mb']:.0f} MiB | {stats.fmt_value(r['step_ms'], 'ms', 0)} | {stats.fmt(r['step_ratio'])} |")
    return "\n".join(lines)


# -- the worker -------------------------------------------------------------------------------------
def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def tensor_bytes(obj) -> int:
    import torch
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def worker(args) -> None:
    import horovod.torch as hvd
    import torch

    import distrib

    ctx = distrib.init()
    torch.set_num_threads(1)
    start_rss = rss_peak()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(args.depth)])
    opt = distrib.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-4), ctx,
                       shard=None if args.shard == "none" else args.shard)
    x = torch.randn(BATCH, WIDTH)
    times, grad_bytes = [], 0
    for _ in range(args.steps):
        t = time.perf_counter()
        opt.backward(model(x).square().mean())
        opt.synchronize()
        grad_bytes = opt.gradient_nbytes() if args.shard != "none" else tensor_bytes(
            [p.grad for p in model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    state_bytes = tensor_bytes(opt.state_dict())
    mine = {"rank": ctx.rank, "start_rss": start_rss, "peak_rss": rss_peak(), "state_bytes": state_bytes,
            "grad_bytes": grad_bytes}
    ranks = hvd.allgather_object(mine, name="bench.memory")
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps({
            "ranks": ranks, "params": sum(p.numel() for p in model.parameters()),
            "step_s": statistics.median(times[2:])}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help="run one worker (under the launcher)")
    p.add_argument("--shard", choices=MODES, default="none")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--depth", type=int, default=DEPTH, help="Linear(2048, 2048) layers")
    p.add_argument("--out", required=True)
    worker(p.parse_args())
