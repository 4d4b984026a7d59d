"""Section "allreduce": bus bandwidth of distrib's gradient path vs raw mpi4py and torch Gloo."""
from __future__ import annotations

import json

from benchmarks import launchers, stats

SIZES = [2**10, 2**14, 2**17, 2**20, 2**22, 2**24, 2**26]
QUICK_SIZES = [2**10, 2**20, 2**24]


def busbw_gbs(nbytes: int, ms: float, n: int) -> float:
    """NCCL-tests' bus bandwidth: algbw * 2(n-1)/n, comparable across worker counts."""
    return nbytes / (ms * 1e-3) * 2 * (n - 1) / n / 1e9


def run(opts) -> dict:
    sizes = QUICK_SIZES if opts.quick else SIZES
    out = opts.work / "allreduce.json"
    env = launchers.worker_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(launchers.free_port())})
    argv = ["benchmarks/workers/allreduce.py", "--sizes", ",".join(map(str, sizes)),
            "--rounds", str(opts.rounds), "--out", str(out)]
    launchers.run(launchers.mpirun(opts.np, argv, env), env, timeout=900)
    data = json.loads(out.read_text())
    n, ms = data["size"], data["ms"]
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
    return {"title": "Allreduce bus bandwidth (2 workers, float32, in the same processes, alternated)",
            "rows": rows, "markdown": _table(rows)}


def _size(b: int) -> str:
    return f"{b // 2**20} MiB" if b >= 2**20 else f"{b // 2**10} KiB"


def _table(rows) -> str:
    lines = ["| size | distrib busbw GB/s | distrib time | vs raw mpi4py | vs torch Gloo | vs per-parameter (before) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_size(r['bytes'])} | {stats.fmt_value(r['busbw_GBs']['distrib'], '', 2)} | "
                     f"{stats.fmt_value(r['distrib_ms'], 'ms', 3)} | {stats.fmt(r['distrib_vs_mpi4py'])} | "
                     f"{stats.fmt(r['distrib_vs_gloo'])} | {stats.fmt(r['distrib_vs_per_parameter'])} |")
    lines.append("")
    lines.append("Ratios are bandwidth ratios (higher is better for distrib), per round, median (min-max).")
    return "\n".join(lines)
