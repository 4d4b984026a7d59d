"""Section "network": 2 hosts x 1 worker over an emulated link limited to 1 and 10 Gbit/s.

The hosts are the project's multi-host test cluster (tests/nodes.py: network namespaces with
their own address, hostname and sshd on this machine), their links limited with ``tc tbf``. Per
round, in a rotated order, one launch of each: distrib (``python -m launch -H node1:1,node2:1``,
with the MPI controller the launcher picks; plain ``hvd.DistributedOptimizer`` runs in the same
processes, alternated with distrib: tuned Horovod, with the same Open MPI flags),
distrib with ``--controller gloo``, and DDP over Gloo (one torchrun per host); distrib, Horovod and
DDP each with and without fp16 compression. Inside a launch the link speeds and the variants
alternate: before each speed's steps every worker limits its own host's link (step worker
``--link-rates``). One worker
alone (no link) is timed once per round. The ideal: alone + the link's time for 2(n-1)/n of the
gradient bytes.

The two hosts still share this machine's two cores, so compute runs as in the one-host figures.
"""
from __future__ import annotations

import json
import statistics
import subprocess
from typing import Dict, List

from benchmarks import launchers, stats
from benchmarks.bench_step import STEP

RATES = {"1gbit": 1e9, "10gbit": 10e9}
MODEL = "mlp"
HOSTS = ("node1", "node2")
# variant in the step worker -> the figure's name
# job -> (step worker --impl, {its variant: the figure's name})
# Plain Horovod runs in distrib's own processes, alternated with it: the same launcher and Open MPI flags
# (tuned Horovod), and one cross-host launch fewer per round.
JOBS = {"distrib": ("distrib", {"buckets": "distrib", "fp16": "distrib-fp16", "horovod": "horovod-tuned",
                                "horovod-fp16": "horovod-tuned-fp16"}),
        "distrib-gloo": ("distrib", {"buckets": "distrib-gloo"}),
        "ddp": ("ddp", {"default": "ddp", "fp16": "ddp-fp16"})}
ALONE = ("alone", {"default": "alone"})


def _argv(job: str, opts, out, r: int, rates: List[str]) -> List[str]:
    impl, names = JOBS.get(job, ALONE)
    return [STEP, "--impl", impl, "--model", MODEL, "--variants", ",".join(names), "--rotate", str(r),
            "--warmup", str(opts.warmup), "--steps", str(opts.steps), "--out", str(out),
            *(["--link-rates", ",".join(rates)] if job != "alone" else [])]


def _commands(cluster, job: str, argv: List[str]) -> List[List[str]]:
    """The processes of one job, each as run on its host (the first one on node1)."""
    hosts = ",".join(f"{h}:1" for h in HOSTS)
    if job == "alone":
        return [cluster.command(HOSTS[0], [launchers.PY, *argv])]
    if job.startswith("distrib"):
        controller = "gloo" if job == "distrib-gloo" else "mpi"
        return [cluster.command(HOSTS[0], launchers.launch(2, argv, controller=controller, hosts=hosts))]
    port = launchers.free_port()
    return [cluster.command(h, [launchers.TORCHRUN, "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
                                "--master_addr", HOSTS[0], "--master_port", str(port), *argv])
            for i, h in enumerate(HOSTS)]


def _run_job(cluster, job: str, opts, r: int, rates: List[str], timeout: float = 300):
    """({(rate, figure name): step ms}, gradient bytes) of one job on the cluster; its workers set
    each rate on their own host's link in turn (alone: rate None, no link involved)."""
    out = opts.work / f"network-{job}.json"
    out.unlink(missing_ok=True)
    env = cluster.env({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"})
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in _commands(cluster, job, _argv(job, opts, out, r, rates))]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise launchers.BenchError(f"network {job} job failed: " + "\n".join(o[-2000:] for o in outputs))
    res = json.loads(out.read_text())["by_model"][MODEL]
    names = JOBS.get(job, ALONE)[1]
    found = {}
    for key, ms in res["variants"].items():
        variant, _, rate = key.partition("@")
        found[(rate or None, names[variant])] = ms
    return found, res["grad_bytes"]


def measure(cluster, opts) -> dict:
    """{"ms": {rate: {name: [median ms per round]}}, "alone": [...], "grad_bytes": n}.

    One launch per job and round (a launch across hosts costs ~20 s here); inside it the rates
    and the variants alternate (the workers limit their own links)."""
    rates = list(RATES)[:1] if opts.quick else list(RATES)
    ms = {rate: {} for rate in rates}
    alone, nbytes = [], 0
    for r in range(min(opts.rounds, 2)):  # 5 launches a round across hosts: 2 rounds keep make bench in budget
        for job in stats.rotate(["alone", *(j for j in JOBS if not (opts.quick and j == "distrib-gloo"))], r):
            got, nbytes = _run_job(cluster, job, opts, r, rates)
            for (rate, name), steps in got.items():
                (alone if rate is None else ms[rate].setdefault(name, [])).append(statistics.median(steps))
    return {"ms": ms, "alone": alone, "grad_bytes": nbytes}


# (key, numerator, denominator, what the ratio measures)
RATIOS = (("vs_horovod_tuned", "distrib", "horovod-tuned", "distrib against plain Horovod, same flags"),
          ("vs_ddp", "distrib", "ddp", "distrib against DDP over Gloo"),
          ("fp16_on_distrib", "distrib-fp16", "distrib", "fp16 compression, on distrib"),
          ("mpi_vs_gloo", "distrib", "distrib-gloo", "distrib's MPI controller vs its Gloo one"))


def rate_row(rate: str, ms: Dict[str, List[float]], alone: List[float], nbytes: int, n: int = 2) -> dict:
    wire_s = nbytes * 2 * (n - 1) / n * 8 / RATES[rate]  # the link's time for a ring allreduce's bytes
    ideal = {"ideal": [a + 1e3 * wire_s for a in alone], "ideal-fp16": [a + 1e3 * wire_s / 2 for a in alone]}
    every = {**ms, **ideal, "alone": alone}
    d, d16, i = ms["distrib"], ms["distrib-fp16"], ideal["ideal"]
    return {"rate": rate, "link_ms_fp32": 1e3 * wire_s,
            "step_ms": {k: stats.summary(v) for k, v in every.items()},
            "efficiency": {k: stats.ratios(alone, v) for k, v in every.items() if k != "alone"},
            "ratios": {key: {"a": a, "b": b, "what": what, **stats.ratios(every[a], every[b])}
                       for key, a, b, what in RATIOS if a in every and b in every},  # --quick: no distrib-gloo
            # share of distrib's fp32 distance to the ideal that fp16 compression removes (goal >= 0.5)
            "fp16_gap_closed": stats.summary([(a - b) / (a - c) if a != c else float("nan")
                                              for a, b, c in zip(d, d16, i)])}


def run(opts) -> dict:
    from tests.nodes import start  # the project's multi-host test cluster
    opts.warmup, opts.steps = (2, 5) if opts.quick else (2, 8)
    cluster = start(len(HOSTS))
    try:
        found = measure(cluster, opts)
    finally:
        cluster.down()
    rows = [rate_row(rate, ms, found["alone"], found["grad_bytes"]) for rate, ms in found["ms"].items()]
    return {"title": f"Over a network: 2 hosts x 1 worker, {MODEL}, link limited with tc tbf", "model": MODEL,
            "grad_bytes": found["grad_bytes"], "rows": rows, "markdown": _table(rows, found["grad_bytes"])}


SHOWN = ("alone", "ideal", "ideal-fp16", "distrib", "distrib-fp16", "distrib-gloo", "horovod-tuned",
         "horovod-tuned-fp16", "ddp", "ddp-fp16")


def _table(rows, nbytes: int) -> str:
    shown = [k for k in SHOWN if k in rows[0]["step_ms"]]
    out = ["| link | " + " | ".join(f"{k} ms" for k in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for r in rows:
        out.append(f"| {r['rate']} | " + " | ".join(stats.fmt_value(r["step_ms"][k], "", 1) for k in shown) + " |")
    eff = [k for k in shown if k != "alone"]
    out += ["", "| weak-scaling efficiency (alone / step) | " + " | ".join(eff) + " |", "|---" * (len(eff) + 1) + "|"]
    for r in rows:
        out.append(f"| {r['rate']} | " + " | ".join(stats.fmt(r["efficiency"][k]) for k in eff) + " |")
    out += ["", "| link | " + " | ".join(f"{x['a']} / {x['b']}" for x in rows[0]["ratios"].values())
            + " | share of distrib's gap to the ideal closed by fp16 |", "|---" * (len(rows[0]["ratios"]) + 2) + "|"]
    for r in rows:
        out.append(f"| {r['rate']} | " + " | ".join(stats.fmt(x) for x in r["ratios"].values())
                   + f" | {stats.fmt(r['fp16_gap_closed'])} |")
    out += ["", f"The {MODEL}'s gradients are {nbytes / 2**20:.1f} MiB; the ideal adds the link's time for "
            "2(n-1)/n of them (" + ", ".join(f"{r['rate']}: {r['link_ms_fp32']:.1f} ms" for r in rows)
            + "; half with fp16). Both hosts share this machine's 2 cores; TCP over the namespaces' veth link is "
            "itself CPU-bound well below 10 Gbit/s."]
    return "\n".join(out)
