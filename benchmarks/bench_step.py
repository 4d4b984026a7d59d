"""Sections "step" and "scaling": training step time of distrib against one process alone,
plain Horovod (same controller), torch DDP over Gloo (torchrun), and the weak-scaling ideal.

Each round launches every implementation once, in a rotated order; a launch times every model
(in a rotated order too) and reports the median of each model's timed steps. Ratios are taken
per round, then summarised over rounds. The ideal's communication is one more launch in that
rotation: a raw mpi4py Allreduce of each model's gradient bytes in a plain mpirun job without
Horovod (inside a Horovod job MPI's lock, shared with Horovod's thread, would slow it).
"""
from __future__ import annotations

import json
import statistics

from benchmarks import launchers, stats
from benchmarks.bench_allreduce import raw_mpi_ms

MODELS = ("mlp", "lm")
STEP = "benchmarks/workers/step.py"
IMPLS = ("alone", "distrib", "distrib-before", "horovod", "ddp")
RAW = "raw-mpi"  # not a training step: the ideal's allreduce of the gradient bytes


def grad_bytes(model: str) -> int:
    """Bytes of ``model``'s gradients, as the step worker builds it (torch imported only here)."""
    from benchmarks.workers.models import DEFAULT_BATCH, build
    net, _ = build(model, DEFAULT_BATCH[model])
    return sum(p.numel() * p.element_size() for p in net.parameters())


def _command(impl, argv, opts, env):
    if impl == "alone":
        return [launchers.PY, *argv]
    if impl in ("distrib", "distrib-before"):
        return launchers.distrib_cmd(opts.np, argv, opts.controller, env)
    if impl == "horovod":
        return launchers.horovod_cmd(opts.np, argv, opts.controller, env)
    return launchers.torchrun_cmd(opts.np, argv)


def measure(opts, models) -> dict:
    """{model: {"ms": {impl: [median step ms per round]}, "ideal_comm_ms": [...], ...}}.

    One launch per implementation and round times every model (a launch costs more than the
    steps it times); the order of the implementations and of the models rotates per round."""
    steps = 10 if opts.quick else 25
    found = {m: {"ms": {i: [] for i in IMPLS}, "ideal_comm_ms": []} for m in models}
    nbytes = {m: grad_bytes(m) for m in models}
    for r in range(opts.rounds):
        order = ",".join(stats.rotate(models, r))
        for impl in stats.rotate(IMPLS + (RAW,), r):
            if impl == RAW:
                got = raw_mpi_ms(opts, sorted(set(nbytes.values())))
                for model in models:
                    found[model]["ideal_comm_ms"].append(got[str(nbytes[model])])
                continue
            out = opts.work / f"step-{impl}.json"
            out.unlink(missing_ok=True)
            extra = {"DISTRIB_REDUCER": "per-parameter"} if impl == "distrib-before" else {}
            env = launchers.worker_env(extra)
            argv = [STEP, "--impl", "distrib" if impl.startswith("distrib") else impl, "--model", order,
                    "--steps", str(steps), "--out", str(out)]
            launchers.run(_command(impl, argv, opts, env), env)
            res = json.loads(out.read_text())
            for model, got in res["by_model"].items():
                m = found[model]
                m["ms"][impl].append(statistics.median(got["step_ms"]))
                m["grad_bytes"], m["params"] = got["grad_bytes"], got["params"]
    return found


def run(opts) -> dict:
    rows = []
    models = ("mlp",) if opts.quick else MODELS
    found = measure(opts, models)
    for model in models:
        m = found[model]
        ms = m["ms"]
        row = {"model": model, "params": m["params"], "grad_bytes": m["grad_bytes"],
               "step_ms": {i: stats.summary(v) for i, v in ms.items()},
               "distrib_vs_ddp": stats.ratios(ms["distrib"], ms["ddp"]),
               "distrib_vs_horovod": stats.ratios(ms["distrib"], ms["horovod"]),
               "distrib_vs_before": stats.ratios(ms["distrib"], ms["distrib-before"]),
               "before_vs_horovod": stats.ratios(ms["distrib-before"], ms["horovod"]),
               "efficiency": stats.ratios(ms["alone"], ms["distrib"]),
               "efficiency_horovod": stats.ratios(ms["alone"], ms["horovod"]),
               "efficiency_ddp": stats.ratios(ms["alone"], ms["ddp"])}
        ideal = [a + c for a, c in zip(ms["alone"], m["ideal_comm_ms"])]
        row["ideal_comm_ms"] = stats.summary(m["ideal_comm_ms"])
        row["ideal_ms"] = stats.summary(ideal)
        row["efficiency_ideal"] = stats.ratios(ms["alone"], ideal)
        # share of plain Horovod's distance to the ideal that distrib removes (goal: >= 0.5)
        row["gap_closed"] = stats.summary([(h - d) / (h - i) if h != i else float("nan")
                                           for h, d, i in zip(ms["horovod"], ms["distrib"], ideal)])
        rows.append(row)
    return {"title": f"Training step time, {opts.np} workers x 1 thread ({opts.controller} controller for "
                     "distrib and Horovod; DDP over Gloo)", "rows": rows, "markdown": _table(rows)}


def _table(rows) -> str:
    out = ["| model | distrib / DDP-Gloo | distrib / plain Horovod | distrib / distrib-before | "
           "before / plain Horovod | step ms: alone, distrib, before, horovod, ddp |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["step_ms"]
        out.append(f"| {r['model']} ({r['params'] / 1e6:.2f} M params) | {stats.fmt(r['distrib_vs_ddp'])} | "
                   f"{stats.fmt(r['distrib_vs_horovod'])} | {stats.fmt(r['distrib_vs_before'])} | "
                   f"{stats.fmt(r['before_vs_horovod'])} | "
                   + ", ".join(f"{s[i]['median']:.1f}" for i in IMPLS) + " |")
    out += ["", "Ratios of step times (lower is better for distrib). distrib-before: the per-parameter "
            "reducer (one Horovod allreduce per gradient, like hvd.DistributedOptimizer).", "",
            "### Weak scaling 1 -> 2 workers (same per-worker batch)", "",
            "| model | efficiency distrib | plain Horovod | DDP | ideal (alone + raw mpi4py allreduce of the grads) "
            "| raw allreduce of the grads | share of Horovod's gap to the ideal closed by distrib |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {stats.fmt(r['efficiency'])} | {stats.fmt(r['efficiency_horovod'])} | "
                   f"{stats.fmt(r['efficiency_ddp'])} | {stats.fmt(r['efficiency_ideal'])} | "
                   f"{stats.fmt_value(r['ideal_comm_ms'], 'ms', 2)} | {stats.fmt(r['gap_closed'])} |")
    out += ["", "Efficiency = alone step time / 2-worker step time (1.0 is perfect). The ideal's allreduce "
            "is a raw in-place mpi4py Allreduce of the gradient bytes, timed in a separate plain mpirun job "
            "without Horovod (launched once per round, in the rotation with the implementations)."]
    return "\n".join(out)
