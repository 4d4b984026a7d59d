"""Section "step": training step time at 2 workers of distrib against fair references, three models.

Every round launches each job once, in a rotated order; a job times every model (in a rotated
order too) and, where it has variants, alternates them in the same processes. Ratios are taken
per round, then summarised over rounds (median and min-max).

References: one process alone; two independent processes at once (``pair``: the compute floor
when two workers share the two cores); plain Horovod (``hvd.DistributedOptimizer``) under
``horovodrun`` defaults, and *tuned*: in distrib's own processes, alternated with distrib, so with
the launcher's Open MPI flags and one thread per worker; DDP over Gloo with defaults and tuned
(``gradient_as_bucket_view``, the best bucket size of a sweep), alternated in the same processes
with distrib on the torch engine (``distrib-torch``: the same Gloo process group); and one distrib variant per lever
(reducer, cycle time, yield), so that each lever's own effect is a ratio. The ideal is alone + a raw mpi4py allreduce of the gradient bytes, timed in a
plain mpirun job without Horovod (inside a Horovod job MPI's lock, shared with Horovod's thread,
would slow it).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

from benchmarks import launchers, stats
from benchmarks.bench_allreduce import raw_mpi_ms

STEP = "benchmarks/workers/step.py"
DDP_SWEEP_MB = (1, 5, 25)
QUICK_DDP_SWEEP_MB = (5,)  # --quick: a smoke run of every job, not a sweep
# distrib on the torch engine gets the same sweep as DDP: its default bucket (4 MiB) and these. Both
# "tuned" figures are then the lowest of three medians picked after the fact (a minimum of noisy
# medians is biased low), so neither side gets the bias alone.
DISTRIB_TORCH_SWEEP_MB = (1, 25)


@dataclass(frozen=True)
class Job:
    """One launch per round: ``command(np, argv, env)`` run with ``env``; each variant is reported as
    ``names[variant]``."""
    impl: str
    command: Callable
    names: Dict[str, str]
    env: Dict[str, str] = field(default_factory=dict)


def jobs(ddp_sweep_mb=DDP_SWEEP_MB, distrib_torch_sweep_mb=DISTRIB_TORCH_SWEEP_MB) -> Dict[str, Job]:
    ddp_names = {"default": "ddp-default", **{f"tuned-{mb}": f"ddp-tuned-{mb}" for mb in ddp_sweep_mb},
                 "distrib-torch": "distrib-torch",
                 **{f"distrib-torch-bucket-{mb}": f"distrib-torch-bucket-{mb}" for mb in distrib_torch_sweep_mb},
                 "distrib-torch-gloo": "distrib-torch-gloo",
                 "distrib-torch-divide-after": "distrib-torch-divide-after",
                 "distrib-torch-first-1mb": "distrib-torch-first-1mb"}
    alone = lambda n, argv, env: [launchers.PY, *argv]  # noqa: E731
    launch = lambda n, argv, env: launchers.launch(n, argv)  # noqa: E731
    no_yield = lambda n, argv, env: launchers.tuned_mpirun(n, argv, env, yield_when_idle=False)  # noqa: E731
    return {
        "alone": Job("alone", alone, {"default": "alone"}),
        "pair": Job("alone", launchers.tuned_mpirun, {"default": "pair"}),
        # tuned Horovod runs in distrib's own processes, alternated with it: the same launcher, Open MPI
        # flags and threads, so the two differ by the library alone
        "distrib": Job("distrib", launch, {"buckets": "distrib", "per-parameter": "distrib-per-parameter",
                                           "horovod": "horovod-tuned"}),
        # a candidate lever, measured but not adopted: distrib leaves Horovod's cycle time (1 ms) alone
        "distrib-cycle-0.1ms": Job("distrib", launch, {"buckets": "distrib-cycle-0.1ms"},
                                   {"HOROVOD_CYCLE_TIME": "0.1"}),
        "distrib-no-yield": Job("distrib", no_yield, {"buckets": "distrib-no-yield"}),
        "horovod-default": Job("horovod", lambda n, argv, env: launchers.horovodrun(n, argv),
                               {"default": "horovod-default"}),
        "ddp": Job("ddp", lambda n, argv, env: launchers.torchrun(n, argv), ddp_names),
    }


RAW = "raw-mpi"  # not a training step: the ideal's allreduce of the gradient bytes


def grad_bytes(model: str) -> int:
    """Bytes of ``model``'s gradients, as the step worker builds it (torch imported only here)."""
    from benchmarks.workers.models import DEFAULT_BATCH, build, grad_bytes as nbytes
    return nbytes(build(model, DEFAULT_BATCH[model])[0])


def _launch(job: Job, opts, models, r: int) -> dict:
    out = opts.work / f"step-{job.names[next(iter(job.names))]}.json"
    out.unlink(missing_ok=True)
    env = launchers.worker_env(job.env)
    argv = [STEP, "--impl", job.impl, "--model", ",".join(stats.rotate(models, r)),
            "--variants", ",".join(job.names), "--rotate", str(r),
            "--warmup", str(opts.warmup), "--steps", str(opts.steps), "--out", str(out)]
    seconds = launchers.run(job.command(opts.np, argv, env), env)
    print(f"  step {job.names[next(iter(job.names))]} round {r}: {seconds:.1f} s", flush=True)
    return json.loads(out.read_text())["by_model"]


def measure(opts, models) -> dict:
    """{model: {"ms": {name: [median step ms per round]}, "ideal_comm_ms": [...], ...}}."""
    all_jobs = jobs(QUICK_DDP_SWEEP_MB, ()) if opts.quick else jobs()
    found = {m: {"ms": {}, "ideal_comm_ms": []} for m in models}
    nbytes = {m: grad_bytes(m) for m in models}
    for r in range(opts.rounds):
        for name in stats.rotate(list(all_jobs) + [RAW], r):
            if name == RAW:
                got = raw_mpi_ms(opts, sorted(set(nbytes.values())))
                for model in models:
                    found[model]["ideal_comm_ms"].append(got[str(nbytes[model])])
                continue
            job = all_jobs[name]
            for model, res in _launch(job, opts, models, r).items():
                m = found[model]
                for variant, ms in res["variants"].items():
                    m["ms"].setdefault(job.names[variant], []).append(statistics.median(ms))
                m.update(grad_bytes=res["grad_bytes"], params=res["params"], tensors=res["tensors"],
                         batch=res["batch"])
    return found


# (key, numerator, denominator, what the ratio measures): every ratio names both of its sides.
RATIOS: Tuple[Tuple[str, str, str, str], ...] = (
    ("vs_ddp_default", "distrib", "ddp-default", "distrib against DDP over Gloo, defaults"),
    ("vs_ddp_tuned", "distrib", "ddp-tuned", "distrib against DDP over Gloo, tuned"),
    ("torch_engine_vs_ddp_tuned", "distrib-torch", "ddp-tuned",
     "distrib on the torch engine, defaults, against DDP over Gloo, tuned, in the same processes"),
    ("torch_engine_tuned_vs_ddp_tuned", "distrib-torch-tuned", "ddp-tuned",
     "both tuned alike: the best of a three-size bucket sweep each"),
    ("torch_engine_vs_horovod_engine", "distrib-torch", "distrib", "distrib: torch engine against Horovod engine"),
    ("vs_horovod_tuned", "distrib", "horovod-tuned", "distrib against plain Horovod with the same settings"),
    ("vs_horovod_default", "distrib", "horovod-default", "distrib against plain Horovod under horovodrun defaults"),
    ("settings_on_horovod", "horovod-tuned", "horovod-default", "the launcher's settings, on plain Horovod"),
    ("lever_buckets", "distrib", "distrib-per-parameter", "lever: flat buckets (vs one allreduce per tensor)"),
    ("lever_cycle", "distrib-cycle-0.1ms", "distrib",
     "candidate lever, not adopted: cycle time 0.1 ms (vs Horovod's 1 ms)"),
    ("lever_yield", "distrib", "distrib-no-yield", "lever: mpi_yield_when_idle (vs Open MPI's busy polling)"),
    ("lever_shared_memory", "distrib-torch", "distrib-torch-gloo",
     "lever, torch engine: the gradients summed in shared memory on one host (vs Gloo's loopback TCP allreduce)"),
    # the next two are levers of the Gloo path (across hosts): measured on it, with shared memory off
    ("lever_prescale", "distrib-torch-gloo", "distrib-torch-divide-after",
     "lever, torch engine over Gloo: divide on the way into the bucket (vs a division pass after Gloo's sum)"),
    ("lever_first_bucket", "distrib-torch-gloo", "distrib-torch-first-1mb",
     "lever, torch engine over Gloo: no small first bucket on one host (vs DDP's 1 MiB)"),
    ("ddp_tuning", "ddp-tuned", "ddp-default", "DDP's own tuning"),
)
EFFICIENCY_OF = ("distrib", "distrib-torch", "distrib-torch-tuned", "horovod-tuned", "horovod-default", "ddp-default",
                 "ddp-tuned", "pair")


def best_of(ms: Dict[str, list], swept) -> str:
    """Of the ``swept`` names present in ``ms``, the one with the lowest median step time (its
    per-round values become the "tuned" figure: picked after the fact)."""
    return min((k for k in swept if k in ms), key=lambda k: statistics.median(ms[k]))


def model_row(model: str, m: dict) -> dict:
    ms = dict(m["ms"])
    tuned = best_of(ms, [f"ddp-tuned-{mb}" for mb in DDP_SWEEP_MB])
    ms["ddp-tuned"] = ms[tuned]
    from distrib.step.reducers import DEFAULT_BUCKET_MB  # torch is imported here only (as in grad_bytes)
    torch_swept = {"distrib-torch": DEFAULT_BUCKET_MB,
                   **{f"distrib-torch-bucket-{mb}": mb for mb in DISTRIB_TORCH_SWEEP_MB}}
    torch_tuned = best_of(ms, torch_swept)
    ms["distrib-torch-tuned"] = ms[torch_tuned]
    row = {"model": model, "params": m["params"], "grad_bytes": m["grad_bytes"], "tensors": m["tensors"],
           "batch": m["batch"], "ddp_tuned_bucket_mb": float(tuned.rsplit("-", 1)[1]),
           "ddp_swept_mb": [mb for mb in DDP_SWEEP_MB if f"ddp-tuned-{mb}" in ms],
           "distrib_torch_tuned_bucket_mb": float(torch_swept[torch_tuned]),
           "distrib_torch_swept_mb": [mb for k, mb in torch_swept.items() if k in ms],
           "step_ms": {k: stats.summary(v) for k, v in ms.items()},
           "ratios": {key: {"a": a, "b": b, "what": what, **stats.ratios(ms[a], ms[b])}
                      for key, a, b, what in RATIOS}}
    ideal = [a + c for a, c in zip(ms["alone"], m["ideal_comm_ms"])]
    row["ideal_comm_ms"] = stats.summary(m["ideal_comm_ms"])
    row["step_ms"]["ideal"] = stats.summary(ideal)
    row["efficiency"] = {k: stats.ratios(ms["alone"], ms[k]) for k in EFFICIENCY_OF}
    row["efficiency"]["ideal"] = stats.ratios(ms["alone"], ideal)
    # share of a reference's distance to the ideal that distrib removes (goal: >= 0.5 vs tuned)
    for ref in ("horovod-tuned", "horovod-default"):
        row[f"gap_closed_vs_{ref}"] = stats.summary(
            [(h - d) / (h - i) if h != i else float("nan") for h, d, i in zip(ms[ref], ms["distrib"], ideal)])
    return row


def run(opts) -> dict:
    # a launch costs more than its steps; 20 timed steps a variant (10 until the torch engine's ratio to
    # DDP came within a few per cent, where a busy step or two moved a round's median as much)
    opts.warmup, opts.steps = (2, 5) if opts.quick else (2, 20)
    models = ("mlp",) if opts.quick else ("mlp", "lm", "conv")
    found = measure(opts, models)
    rows = [model_row(model, found[model]) for model in models]
    return {"title": f"Training step time, {opts.np} workers x 1 thread", "rows": rows,
            "steps": {"warmup": opts.warmup, "timed": opts.steps}, "markdown": _table(rows)}


SHOWN = ("alone", "pair", "ideal", "distrib", "distrib-torch", "distrib-torch-tuned", "distrib-per-parameter",
         "distrib-cycle-0.1ms", "distrib-no-yield",
         "horovod-tuned", "horovod-default", "ddp-tuned", "ddp-default")


def _table(rows) -> str:
    out = ["| step ms | " + " | ".join(f"{r['model']} ({r['params'] / 1e6:.2f} M params, {r['tensors']} tensors)"
                                      for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for k in SHOWN:
        out.append(f"| {k} | " + " | ".join(stats.fmt_value(r["step_ms"][k], "", 1) for r in rows) + " |")
    out += ["", "| ratio of step times (lower: the first is faster) | " + " | ".join(r["model"] for r in rows) + " |",
            "|---" * (len(rows) + 1) + "|"]
    for key, a, b, what in RATIOS:
        out.append(f"| {a} / {b} ({what}) | " + " | ".join(stats.fmt(r["ratios"][key]) for r in rows) + " |")
    for ref in ("horovod-tuned", "horovod-default"):
        out.append(f"| share of {ref}'s gap to the ideal closed by distrib | "
                   + " | ".join(stats.fmt(r[f'gap_closed_vs_{ref}']) for r in rows) + " |")
    out += ["", "| weak-scaling efficiency 1 -> 2 workers (alone / 2-worker step) | "
            + " | ".join(r["model"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for k in EFFICIENCY_OF + ("ideal",):
        out.append(f"| {k} | " + " | ".join(stats.fmt(r["efficiency"][k]) for r in rows) + " |")
    out += ["", "ddp-tuned: gradient_as_bucket_view=True, broadcast_buffers=False and the bucket size (MB) "
            f"of {', '.join(map(str, rows[0]['ddp_swept_mb']))} with the lowest median: "
            + ", ".join(f"{r['model']} {r['ddp_tuned_bucket_mb']:g}" for r in rows)
            + ". distrib-torch-tuned: distrib on the torch engine with the bucket size (MB) of "
            f"{', '.join(f'{mb:g}' for mb in rows[0]['distrib_torch_swept_mb'])} with the lowest median: "
            + ", ".join(f"{r['model']} {r['distrib_torch_tuned_bucket_mb']:g}" for r in rows)
            + ". horovod-tuned: plain hvd.DistributedOptimizer in distrib's processes, alternated with it (the "
            "launcher's Open MPI flags, `launch/plan.py`); horovod-default: `horovodrun --mpi`. "
            "pair: two independent processes (no communication) sharing the cores. ideal: alone + a raw "
            "mpi4py allreduce of the gradient bytes (raw allreduce: "
            + ", ".join(f"{r['model']} {stats.fmt_value(r['ideal_comm_ms'], 'ms', 2)}" for r in rows) + ")."]
    return "\n".join(out)
