"""Section "allreduce": bus bandwidth of distrib's gradient path vs raw mpi4py and torch Gloo.

Each round launches, in a rotated order, three jobs: the Horovod job under the launcher
(distrib's bucketed reducer, its per-parameter reducer and its mpi4py transport alternated in
the same processes), a plain mpirun job timing raw mpi4py with no Horovod in it (beside
Horovod's background thread an mpi4py Allreduce waits on MPI's lock and understates the limit,
~1 GB/s at 16 MiB there, ~8 GB/s alone), and a torchrun job timing torch.distributed's Gloo
allreduce, also without Horovod.
"""
from __future__ import annotations

import json

from benchmarks import launchers, stats

RAW = "benchmarks/workers/raw_allreduce.py"
SIZES = [2**10, 2**16, 2**20, 2**22, 2**24, 2**26]
QUICK_SIZES = [2**20, 2**24]


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


WORKER = "benchmarks/workers/allreduce.py"


def _job(opts, sizes, r, gloo: bool) -> dict:
    """{candidate: {str(size): ms}} from one launch (the Horovod job or the Gloo job), its
    candidates in round r's order."""
    out = opts.work / f"allreduce-{'gloo' if gloo else 'horovod'}.json"
    out.unlink(missing_ok=True)
    argv = [WORKER, "--sizes", ",".join(map(str, sizes)), "--rounds", "1", "--first-round", str(r),
            "--out", str(out), *(["--gloo"] if gloo else [])]
    cmd = launchers.torchrun(opts.np, argv) if gloo else launchers.launch(opts.np, argv)
    launchers.run(cmd, launchers.worker_env(), timeout=600)
    return {c: {k: v[0] for k, v in by.items()} for c, by in json.loads(out.read_text())["ms"].items()}


def run(opts) -> dict:
    sizes = QUICK_SIZES if opts.quick else SIZES
    n = opts.np
    ms = {}  # {candidate: {str(size): [ms per round]}}; "mpi4py" comes from the raw job
    for r in range(opts.rounds):
        for job in stats.rotate(("horovod", "raw", "gloo"), r):
            got = {"mpi4py": raw_mpi_ms(opts, sizes)} if job == "raw" else _job(opts, sizes, r, job == "gloo")
            for c, by in got.items():
                for key, t in by.items():
                    ms.setdefault(c, {}).setdefault(key, []).append(t)
    rows = []
    for size in sizes:
        key = str(size)
        bw = {c: [busbw_gbs(size, t, n) for t in ms[c][key]] for c in ms}
        ratio = lambda a, b: {"a": a, "b": b, "what": "bus bandwidth", **stats.ratios(bw[a], bw[b])}  # noqa: E731
        rows.append({"bytes": size, "ms": {c: stats.summary(ms[c][key]) for c in ms},
                     "busbw_GBs": {c: stats.summary(v) for c, v in bw.items()},
                     "ratios": {"vs_mpi4py": ratio("distrib", "mpi4py"), "vs_gloo": ratio("distrib", "gloo"),
                                "vs_per_parameter": ratio("distrib", "per-parameter"),
                                "mpi_transport_vs_per_parameter": ratio("distrib-mpi", "per-parameter")}})
    return {"title": f"Allreduce bus bandwidth ({n} workers, float32)", "rows": rows, "markdown": _table(rows)}


def _size(b: int) -> str:
    return f"{b // 2**20} MiB" if b >= 2**20 else f"{b // 2**10} KiB"


SHOWN = ("distrib", "per-parameter", "distrib-mpi", "gloo", "mpi4py")


def _table(rows) -> str:
    lines = ["| size | " + " | ".join(f"{c} GB/s" for c in SHOWN) + " | " + " | ".join(
        f"{x['a']} / {x['b']}" for x in rows[0]["ratios"].values()) + " |", "|---" * (len(SHOWN) + 5) + "|"]
    for r in rows:
        lines.append(f"| {_size(r['bytes'])} | " + " | ".join(stats.fmt_value(r["busbw_GBs"][c], digits=3) for c in SHOWN)
                     + " | " + " | ".join(stats.fmt(x) for x in r["ratios"].values()) + " |")
    lines += ["", "Bus bandwidth (NCCL-tests' definition), median (min-max) over rounds; ratios per round (higher: "
              "the first is faster). distrib: the default bucketed reducer over Horovod; per-parameter: one "
              "Horovod allreduce per tensor (hvd.DistributedOptimizer's path); distrib-mpi: the opt-in mpi4py "
              "transport (DISTRIB_REDUCER=mpi) - these three alternate in one job under `python -m launch`. gloo: "
              "torch.distributed in a torchrun job; mpi4py: a raw in-place Allreduce in a plain mpirun job (the "
              "practical limit on one host). The three jobs alternate every round."]
    return "\n".join(lines)
