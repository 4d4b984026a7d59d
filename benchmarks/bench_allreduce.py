"""Section "allreduce": bus bandwidth of distrib's gradient path vs raw mpi4py and torch Gloo.

Each round launches, in a rotated order, the Horovod job (distrib's reducers and Gloo alternated
in the same processes) and a plain mpirun job timing raw mpi4py with no Horovod in it: beside
Horovod's background thread an mpi4py Allreduce waits on MPI's lock and understates the limit
(~1 GB/s at 16 MiB there, ~8 GB/s alone).
"""
from __future__ import annotations

import json

from benchmarks import launchers, stats

RAW = "benchmarks/workers/raw_allreduce.py"
SIZES = [2**10, 2**14, 2**17, 2**20, 2**22, 2**24, 2**26]
QUICK_SIZES = [2**10, 2**20, 2**24]


def busbw_gbs(nbytes: int, ms: float, n: int) -> float:
    """NCCL-tests' bus bandwidth: algbw * 2(n-1)/n, comparable across worker counts."""
    return nbytes / (ms * 1e-3) * 2 * (n - 1) / n / 1e9


def raw_mpi_ms(opts, sizes) -> dict:
    """{str(size): median ms} of a raw in-place mpi4py Allreduce, from its own plain mpirun job."""
    out = opts.work / "raw-allreduce.json"
    out.unlink(missing_ok=True)
    env = launchers.worker_env()
    argv = [RAW, "--sizes", ",".join(map(str, sizes)), "--out", str(out)]
    launchers.run(launchers.mpirun(opts.np, argv, env), env)
    return json.loads(out.read_text())["ms"]


def _horovod_round(opts, sizes, r) -> dict:
    """{candidate: {str(size): ms}} from one launch of the Horovod job, its candidates in round r's order."""
    out = opts.work / "allreduce.json"
    out.unlink(missing_ok=True)
    env = launchers.worker_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(launchers.free_port())})
    argv = ["benchmarks/workers/allreduce.py", "--sizes", ",".join(map(str, sizes)),
            "--rounds", "1", "--first-round", str(r), "--out", str(out)]
    launchers.run(launchers.mpirun(opts.np, argv, env), env, timeout=600)
    return {c: {k: v[0] for k, v in by.items()} for c, by in json.loads(out.read_text())["ms"].items()}


def run(opts) -> dict:
    sizes = QUICK_SIZES if opts.quick else SIZES
    n = opts.np
    ms = {}  # {candidate: {str(size): [ms per round]}}; "mpi4py" comes from the raw job
    for r in range(opts.rounds):
        for job in stats.rotate(("horovod", "raw"), r):
            got = _horovod_round(opts, sizes, r) if job == "horovod" else {"mpi4py": raw_mpi_ms(opts, sizes)}
            for c, by in got.items():
                for key, t in by.items():
                    ms.setdefault(c, {}).setdefault(key, []).append(t)
    rows = []
    for size in sizes:
        key = str(size)
        bw = {c: [busbw_gbs(size, t, n) for t in ms[c][key]] for c in ms}
        rows.append({
            "bytes": size,
            "distrib_ms": stats.summary(ms["distrib"][key]),
            "busbw_GBs": {c: stats.summary(v) for c, v in bw.items()},
            "distrib_vs_mpi4py": stats.ratios(bw["distrib"], bw["mpi4py"]),
            "distrib_vs_gloo": stats.ratios(bw["distrib"], bw["gloo"]),
            "distrib_vs_per_parameter": stats.ratios(bw["distrib"], bw["per-parameter"]),
        })
    return {"title": f"Allreduce bus bandwidth ({n} workers, float32; raw mpi4py from a separate plain "
                     "mpirun job without Horovod, alternated per round)",
            "rows": rows, "markdown": _table(rows)}


def _size(b: int) -> str:
    return f"{b // 2**20} MiB" if b >= 2**20 else f"{b // 2**10} KiB"


def _table(rows) -> str:
    lines = ["| size | distrib busbw GB/s | distrib time | raw mpi4py busbw GB/s | vs raw mpi4py | vs torch Gloo "
             "| vs per-parameter (before) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_size(r['bytes'])} | {stats.fmt_value(r['busbw_GBs']['distrib'], '', 2)} | "
                     f"{stats.fmt_value(r['distrib_ms'], 'ms', 3)} | "
                     f"{stats.fmt_value(r['busbw_GBs']['mpi4py'], '', 2)} | {stats.fmt(r['distrib_vs_mpi4py'])} | "
                     f"{stats.fmt(r['distrib_vs_gloo'])} | {stats.fmt(r['distrib_vs_per_parameter'])} |")
    lines += ["", "Ratios are bandwidth ratios (higher is better for distrib), per round, median (min-max). "
              "distrib, per-parameter and Gloo alternate in the same Horovod processes. Raw mpi4py (the "
              "practical limit on one host) is an in-place Allreduce timed in a separate plain mpirun job "
              "without Horovod, whose background thread would slow it; the two jobs alternate every round."]
    return "\n".join(lines)
