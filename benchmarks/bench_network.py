"""Section "network": 2 hosts x 1 worker over an emulated link limited to 1 and 10 Gbit/s, and
PowerSGD's convergence.

The hosts are the project's multi-host test cluster (tests/nodes.py: network namespaces with
their own address, hostname and sshd on this machine), their links limited with ``tc tbf``. Per
round, in a rotated order, one launch of each: distrib (``python -m launch -H node1:1,node2:1``,
with the MPI controller the launcher picks; plain ``hvd.DistributedOptimizer`` runs in the same
processes, alternated with distrib: tuned Horovod, with the same Open MPI flags),
distrib with ``--controller gloo``, and DDP over Gloo (one torchrun per host; distrib on the torch
engine, ``distrib-torch``, runs in the same processes, alternated with DDP); distrib, Horovod and
DDP each with and without fp16 compression, distrib and DDP also with PowerSGD at rank 1 and 4
(``compression="powersgd"``; DDP's own ``powerSGD_hook``, the same warm-up). Two models: the MLP
and the 8-layer LM (lm8), timed one after the other in the same processes. Inside a launch the link speeds and the variants
alternate: before each speed's steps every worker limits its own host's link (step worker
``--link-rates``). One worker
alone (no link) is timed once per round. The ideal: alone + the link's time for 2(n-1)/n of the
gradient bytes.

The two hosts still share this machine's two cores, so compute runs as in the one-host figures.
Wire bytes per step: what each host's eth0 sent during the timed steps (the kernel's counter).

Convergence (no link involved, so on this host): the LM trained for the same steps by each
distrib variant on 2 workers and by plain torch in one process on the same global batches
(benchmarks/workers/converge.py); the table is each one's validation loss against that run's.
"""
from __future__ import annotations

import json
import statistics
import subprocess
from typing import Dict, List

from benchmarks import launchers, stats
from benchmarks.bench_step import STEP

RATES = {"1gbit": 1e9, "10gbit": 10e9}
MODELS = ("mlp", "lm8")
HOSTS = ("node1", "node2")
CONVERGE = "benchmarks/workers/converge.py"
# distrib on the torch engine runs in DDP's own processes (torchrun, the same Gloo process group and
# threads), alternated with DDP: the two differ by the library alone.
TORCH_ENGINE = {"distrib-torch": "distrib-torch", "distrib-torch-overlap-step": "distrib-torch-overlap-step"}
# variant in the step worker -> the figure's name
# job -> (step worker --impl, {its variant: the figure's name})
# Plain Horovod runs in distrib's own processes, alternated with it: the same launcher and Open MPI flags
# (tuned Horovod), and one cross-host launch fewer per round.
JOBS = {"distrib": ("distrib", {"buckets": "distrib", "fp16": "distrib-fp16", "powersgd1": "distrib-psgd1",
                                "powersgd2": "distrib-psgd2", "powersgd4": "distrib-psgd4", "local4": "distrib-local4",
                                "local8": "distrib-local8",
                                "horovod": "horovod-tuned", "horovod-fp16": "horovod-tuned-fp16"}),
        "distrib-gloo": ("distrib", {"buckets": "distrib-gloo", "powersgd1": "distrib-gloo-psgd1",
                                     "powersgd4": "distrib-gloo-psgd4"}),
        "ddp": ("ddp", {"default": "ddp", "fp16": "ddp-fp16", "powersgd1": "ddp-psgd1", "powersgd2": "ddp-psgd2",
                        "powersgd4": "ddp-psgd4",
                        # distrib on the torch engine in DDP's processes: PowerSGD's collectives straight on Gloo
                        "distrib-torch-powersgd2": "distrib-torch-psgd2",
                        "distrib-torch-powersgd4": "distrib-torch-psgd4", **TORCH_ENGINE}),
        # distrib with the Horovod engine's threads at their usual priority (distrib/comm/priority.py lowers
        # them on CPU): what that change buys, side by side
        "distrib-nice0": ("distrib", {"powersgd2": "distrib-psgd2-nice0"})}
# a job's environment beyond the cluster's
JOB_ENV = {"distrib-nice0": {"DISTRIB_COMM_NICE": "0"}}
ALONE = ("alone", {"default": "alone"})


def _names(job: str, opts) -> Dict[str, str]:
    """The job's {step-worker variant: figure name}, only the figures ``opts.variants`` keeps (all when None)."""
    names = JOBS.get(job, ALONE)[1]
    keep = getattr(opts, "variants", None)
    return {v: n for v, n in names.items() if keep is None or n in keep or job == "alone"}


def _models(opts) -> tuple:
    if getattr(opts, "models", None):
        return tuple(opts.models)
    return MODELS[:1] if opts.quick else MODELS  # --quick: the MLP only (its budget is 3 min in all)


def _argv(job: str, opts, out, r: int, rates: List[str]) -> List[str]:
    impl, names = JOBS.get(job, ALONE)[0], _names(job, opts)
    return [STEP, "--impl", impl, "--model", ",".join(_models(opts)), "--variants", ",".join(names), "--rotate", str(r),
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


def _run_job(cluster, job: str, opts, r: int, rates: List[str], timeout: float = 400):
    """{model: ({(rate, figure name): step ms}, {(rate, figure name): [wire bytes per step]}, gradient
    bytes)} of one job on the cluster; its workers set each rate on their own host's link in turn
    (alone: rate None, no link involved)."""
    out = opts.work / f"network-{job}.json"
    out.unlink(missing_ok=True)
    env = cluster.env({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0", **JOB_ENV.get(job, {})})
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
    names = _names(job, opts)
    by_model = {}
    for model, res in json.loads(out.read_text())["by_model"].items():
        found, wire = {}, {}
        for key, ms in res["variants"].items():
            variant, _, rate = key.partition("@")
            found[(rate or None, names[variant])] = ms
            if key in res.get("wire_bytes", {}):
                wire[(rate, names[variant])] = res["wire_bytes"][key]
        by_model[model] = (found, wire, res["grad_bytes"])
    return by_model


def measure(cluster, opts) -> dict:
    """{model: {"ms": {rate: {name: [median ms per round]}}, "wire": {rate: {name: [bytes per step]}},
    "alone": [...], "grad_bytes": n}}.

    One launch per job and round (a launch across hosts costs ~20 s here); inside it the models,
    rates and variants alternate (the workers limit their own links)."""
    rates = getattr(opts, "rates", None) or (list(RATES)[:1] if opts.quick else list(RATES))
    found = {m: {"ms": {rate: {} for rate in rates}, "wire": {rate: {} for rate in rates}, "alone": [],
                 "grad_bytes": 0} for m in _models(opts)}
    # 5 launches a round across hosts: 2 rounds keep make bench in budget (a run of a few variants may take more)
    for r in range(opts.rounds if getattr(opts, "variants", None) else min(opts.rounds, 2)):
        jobs = [j for j in JOBS if not (opts.quick and j == "distrib-gloo") and _names(j, opts)]
        for job in stats.rotate(["alone", *jobs], r):
            for model, (got, wire, nbytes) in _run_job(cluster, job, opts, r, rates).items():
                f = found[model]
                f["grad_bytes"] = nbytes
                for (rate, name), steps in got.items():
                    (f["alone"] if rate is None else f["ms"][rate].setdefault(name, [])).append(round_ms(name, steps))
                for (rate, name), sent in wire.items():
                    f["wire"][rate].setdefault(name, []).extend(sent)
    return found


def round_ms(name: str, steps: List[float]) -> float:
    """One round's figure of a variant: the median step, except for local SGD, whose average
    comes every H steps (the median would hide it): the mean over the timed steps (8, a multiple
    of H, so each window holds 8 / H averages)."""
    return statistics.mean(steps) if "-local" in name else statistics.median(steps)


# (key, numerator, denominator, what the ratio measures)
RATIOS = (("vs_horovod_tuned", "distrib", "horovod-tuned", "distrib against plain Horovod, same flags"),
          ("vs_ddp", "distrib", "ddp", "distrib against DDP over Gloo"),
          ("torch_engine_vs_ddp", "distrib-torch", "ddp", "distrib on the torch engine against DDP, same processes"),
          ("candidate_overlap_step", "distrib-torch-overlap-step", "distrib-torch",
           "candidate lever, not adopted: each bucket's parameters stepped as its average arrives "
           "(DISTRIB_OVERLAP_STEP=1, vs one step after the last)"),
          ("fp16_on_distrib", "distrib-fp16", "distrib", "fp16 compression, on distrib"),
          ("mpi_vs_gloo", "distrib", "distrib-gloo", "distrib's MPI controller vs its Gloo one"),
          ("psgd1_vs_ddp", "distrib-psgd1", "ddp-psgd1", "PowerSGD rank 1: distrib against DDP's hook"),
          ("psgd2_vs_ddp", "distrib-psgd2", "ddp-psgd2", "PowerSGD rank 2: distrib against DDP's hook"),
          ("psgd4_vs_ddp", "distrib-psgd4", "ddp-psgd4", "PowerSGD rank 4: distrib against DDP's hook"),
          ("gloo_psgd1_vs_ddp", "distrib-gloo-psgd1", "ddp-psgd1", "PowerSGD rank 1 under --controller gloo vs DDP"),
          ("gloo_psgd4_vs_ddp", "distrib-gloo-psgd4", "ddp-psgd4", "PowerSGD rank 4 under --controller gloo vs DDP"),
          ("torch_psgd2_vs_ddp", "distrib-torch-psgd2", "ddp-psgd2", "PowerSGD rank 2 on the torch engine vs DDP"),
          ("torch_psgd4_vs_ddp", "distrib-torch-psgd4", "ddp-psgd4", "PowerSGD rank 4 on the torch engine vs DDP"),
          ("psgd2_nice0_vs_ddp", "distrib-psgd2-nice0", "ddp-psgd2",
           "PowerSGD rank 2 with Horovod's threads at their usual priority vs DDP"),
          ("psgd2_vs_nice0", "distrib-psgd2", "distrib-psgd2-nice0",
           "PowerSGD rank 2: Horovod's threads at nice 19 (the default on CPU) vs at 0"),
          ("local8_vs_psgd4", "distrib-local8", "distrib-psgd4", "local SGD every 8 steps against PowerSGD rank 4"))


def rate_row(rate: str, ms: Dict[str, List[float]], alone: List[float], nbytes: int, n: int = 2,
             wire: Dict[str, List[float]] = None) -> dict:
    wire_s = nbytes * 2 * (n - 1) / n * 8 / RATES[rate]  # the link's time for a ring allreduce's bytes
    ideal = {"ideal": [a + 1e3 * wire_s for a in alone], "ideal-fp16": [a + 1e3 * wire_s / 2 for a in alone]}
    every = {**ms, **ideal, "alone": alone}
    i = ideal["ideal"]
    d, d16 = ms.get("distrib", i), ms.get("distrib-fp16", i)  # a run of some variants only: no fp16 figure
    return {"rate": rate, "link_ms_fp32": 1e3 * wire_s,
            "step_ms": {k: stats.summary(v) for k, v in every.items()},
            "efficiency": {k: stats.ratios(alone, v) for k, v in every.items() if k != "alone"},
            "ratios": {key: {"a": a, "b": b, "what": what, **stats.ratios(every[a], every[b])}
                       for key, a, b, what in RATIOS if a in every and b in every},  # --quick: no distrib-gloo
            # share of distrib's fp32 distance to the ideal that fp16 compression removes (goal >= 0.5)
            "fp16_gap_closed": stats.summary([(a - b) / (a - c) if a != c else float("nan")
                                              for a, b, c in zip(d, d16, i)]),
            # bytes each host's link sent per step, and how many times fewer than distrib fp32 (per step)
            "wire_bytes": {k: stats.summary(v) for k, v in (wire or {}).items()},
            "fewer_bytes_than_fp32": {k: stats.summary([statistics.median(wire["distrib"]) / x for x in v])
                                      for k, v in (wire or {}).items() if "distrib" in wire}}


def run(opts) -> dict:
    from tests.nodes import start  # the project's multi-host test cluster
    opts.warmup, opts.steps = (2, 5) if opts.quick else (2, 8)
    cluster = start(len(HOSTS))
    try:
        found = measure(cluster, opts)
    finally:
        cluster.down()
    models = {}
    for model, f in found.items():
        rows = [rate_row(rate, ms, f["alone"], f["grad_bytes"], wire=f["wire"][rate]) for rate, ms in f["ms"].items()]
        models[model] = {"grad_bytes": f["grad_bytes"], "rows": rows, "markdown": _table(model, rows, f["grad_bytes"])}
    if not getattr(opts, "convergence", True):
        conv = None
    else:
        conv = convergence(opts)
    if conv and "lm8" in models:
        conv["same_time"] = same_wall_time(conv, models["lm8"]["rows"][0])
    first = models[MODELS[0]]
    return {"title": "Over a network: 2 hosts x 1 worker, link limited with tc tbf; PowerSGD's convergence",
            "model": MODELS[0], "grad_bytes": first["grad_bytes"], "rows": first["rows"], "models": models,
            "convergence": conv,
            "markdown": "\n\n".join([m["markdown"] for m in models.values()]
                                      + ([_convergence_table(conv)] if conv else []))}


CONVERGE_VARIANTS = "fp32,fp16,powersgd1,powersgd2,powersgd4,local4,local8,diloco8"
DDP_CONVERGE_VARIANTS = "ddp-powersgd1,ddp-powersgd2,ddp-powersgd4"
# convergence variant -> the step-time figure whose speed it trains at over the link
STEP_FIGURE = {"fp32": "distrib", "fp16": "distrib-fp16", "powersgd1": "distrib-psgd1", "powersgd2": "distrib-psgd2",
               "powersgd4": "distrib-psgd4", "ddp-powersgd2": "ddp-psgd2",
               "local4": "distrib-local4", "local8": "distrib-local8", "diloco8": "distrib-local8",
               "ddp-powersgd1": "ddp-psgd1", "ddp-powersgd4": "ddp-psgd4"}
# PowerSGD's warm-up of plain allreduce: 30 steps. From step 10 (DDP's usual advice for long runs)
# both distrib and DDP's own hook end 3-13 % above the uncompressed run after 100 AdamW steps.
CONVERGE_START = 30


def convergence(opts) -> dict:
    """The LM's validation loss every 10 steps: each distrib variant on 2 workers (one launch, the
    variants one after the other), DDP's powerSGD_hook on 2 workers (one torchrun), and plain torch
    in one process on the same global batches. The compressed variants train on to 2.5x the steps
    (for the same-wall-time column)."""
    steps, start = (20, 5) if opts.quick else (100, CONVERGE_START)
    argv = [CONVERGE, "--steps", str(steps), "--start-step", str(start), "--eval-every", str(steps // 10)]
    longer = ["--max-steps", str(int(2.5 * steps))]
    env = launchers.worker_env()
    ref_out, dist_out, ddp_out = (opts.work / f"converge-{k}.json" for k in ("single", "2", "ddp"))
    launchers.run([launchers.PY, *argv, "--reference", "--out", str(ref_out)], env=env, timeout=900)
    launchers.run(launchers.launch(2, [*argv, *longer, "--variants", CONVERGE_VARIANTS, "--out", str(dist_out)]),
                  env=env, timeout=1800)
    launchers.run(launchers.torchrun(2, [*argv, *longer, "--variants", DDP_CONVERGE_VARIANTS, "--out", str(ddp_out)]),
                  env=env, timeout=900)
    single, dist, ddp = (json.loads(f.read_text()) for f in (ref_out, dist_out, ddp_out))
    ref = single["val_loss"]["single"]
    val = {**dist["val_loss"], **ddp["val_loss"]}
    return {"steps": steps, "start_step": start, "global_batch": single["global_batch"], "single": ref,
            "val_loss": val, "curve": {**dist["curve"], **ddp["curve"]},
            "seconds": {**single["seconds"], **dist["seconds"], **ddp["seconds"]},
            "vs_single": {k: v / ref - 1 for k, v in val.items()}}


def steps_in(budget_ms: float, ms: float, fp32_ms: float, warmup: int) -> float:
    """Steps a variant takes in ``budget_ms`` at ``ms`` a step, its first ``warmup`` steps (PowerSGD's
    plain allreduce) at the fp32 step's ``fp32_ms``."""
    if budget_ms <= warmup * fp32_ms:
        return budget_ms / fp32_ms
    return warmup + (budget_ms - warmup * fp32_ms) / ms


def same_wall_time(c: dict, row: dict) -> dict:
    """Per variant: the steps it takes at 1 Gbit/s (the lm8 step times measured in this invocation)
    in the time distrib fp32 takes for ``c["steps"]``, and its validation loss at the last evaluated
    step within them (the curve is evaluated every steps/10, up to 2.5x the steps)."""
    fp32_ms = row["step_ms"]["distrib"]["median"]
    budget = c["steps"] * fp32_ms
    out = {}
    for variant, curve in c["curve"].items():
        figure = STEP_FIGURE.get(variant)
        if figure not in row["step_ms"]:
            continue
        warmup = c["start_step"] if "powersgd" in variant else 0
        reach = steps_in(budget, row["step_ms"][figure]["median"], fp32_ms, warmup)
        done = [int(k) for k in curve if int(k) <= reach]
        if not done:
            continue
        at = max(done)
        out[variant] = {"steps": at, "reach": reach, "val_loss": curve[str(at)] if str(at) in curve else curve[at],
                        "capped": reach > max(int(k) for k in curve)}
        out[variant]["vs_single"] = out[variant]["val_loss"] / c["single"] - 1
    return {"rate": row["rate"], "budget_ms": budget, "by_variant": out}


def _convergence_table(c: dict) -> str:
    names = list(c["val_loss"])
    out = [f"LM (lm8) validation loss after {c['steps']} steps (global batch {c['global_batch']}, AdamW; PowerSGD "
           f"low-rank from step {c['start_step']}; local SGD / DiLoCo: the ranks' mean parameters), against plain "
           f"torch in one process on the same batches: {c['single']:.4f}", "",
           "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
           "| validation loss | " + " | ".join(f"{c['val_loss'][k]:.4f}" for k in names) + " |",
           "| vs single process | " + " | ".join(f"{100 * c['vs_single'][k]:+.2f} %" for k in names) + " |"]
    same = c.get("same_time")
    if same:
        got = same["by_variant"]
        out += [f"| steps in distrib fp32's time for {c['steps']} steps at {same['rate']} | "
                + " | ".join(f"{got[k]['steps']}{'+' if got[k]['capped'] else ''}" if k in got else "-" for k in names)
                + " |",
                "| validation loss then | " + " | ".join(f"{got[k]['val_loss']:.4f}" if k in got else "-"
                                                         for k in names) + " |",
                f"| vs single process ({c['steps']} steps) | " + " | ".join(f"{100 * got[k]['vs_single']:+.2f} %" if k in got
                                                                 else "-" for k in names) + " |",
                "", f"Same wall time: each variant's step time at {same['rate']} on lm8 from the tables above (median; "
                "PowerSGD's warm-up steps at fp32's), the steps that fit in the time distrib fp32 takes for "
                f"{c['steps']} steps, rounded down to the last evaluated step ('+': it would have trained longer than "
                "the curve goes). The convergence run uses 4 sequences per worker, the step tables 2."]
    return "\n".join(out)


SHOWN = ("alone", "ideal", "ideal-fp16", "distrib", "distrib-fp16", "distrib-psgd1", "distrib-psgd2",
         "distrib-psgd2-nice0", "distrib-psgd4",
         "distrib-local4", "distrib-local8", "distrib-torch-psgd2", "distrib-torch-psgd4", "distrib-gloo",
         "distrib-gloo-psgd1", "distrib-gloo-psgd4",
         "horovod-tuned", "horovod-tuned-fp16", "ddp", "ddp-fp16", "ddp-psgd1", "ddp-psgd2", "ddp-psgd4",
         "distrib-torch")
BYTES = ("distrib", "distrib-fp16", "distrib-psgd1", "distrib-psgd2", "distrib-psgd2-nice0", "distrib-psgd4",
         "distrib-torch-psgd2", "distrib-torch-psgd4",
         "distrib-local4", "distrib-local8", "distrib-gloo-psgd1", "distrib-gloo-psgd4", "ddp",
         "ddp-psgd1", "ddp-psgd2", "ddp-psgd4")


def _table(model: str, rows, nbytes: int) -> str:
    shown = [k for k in SHOWN if k in rows[0]["step_ms"]]
    out = [f"{model}:", "", "| link | " + " | ".join(f"{k} ms" for k in shown) + " |", "|---" * (len(shown) + 1) + "|"]
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
    wired = [k for k in BYTES if k in rows[0]["wire_bytes"]]
    if wired:
        out += ["", "| wire KiB per step (one host's eth0) | " + " | ".join(wired) + " |", "|---" * (len(wired) + 1) + "|"]
        for r in rows:
            out.append(f"| {r['rate']} | " + " | ".join(
                stats.fmt_value({k: v / 1024 for k, v in r["wire_bytes"][k].items() if k != "n"}, "", 0)
                for k in wired) + " |")
        fewer = [k for k in wired if k in rows[0]["fewer_bytes_than_fp32"]]  # none without distrib fp32
        if fewer:
            out += ["", "| fewer bytes than distrib fp32 | " + " | ".join(fewer) + " |", "|---" * (len(fewer) + 1) + "|"]
        for r in rows if fewer else []:
            out.append(f"| {r['rate']} | " + " | ".join(stats.fmt(r["fewer_bytes_than_fp32"][k]) for k in fewer) + " |")
    out += ["", f"The {model}'s gradients are {nbytes / 2**20:.1f} MiB; the ideal adds the link's time for "
            "2(n-1)/n of them (" + ", ".join(f"{r['rate']}: {r['link_ms_fp32']:.1f} ms" for r in rows)
            + "; half with fp16). Both hosts share this machine's 2 cores; TCP over the namespaces' veth link is "
            "itself CPU-bound well below 10 Gbit/s."]
    return "\n".join(out)


def main(argv=None) -> int:
    """``python -m benchmarks.bench_network --variants distrib-psgd2,ddp-psgd2 [--models lm8] [--rates 1gbit]``:
    only those figures (and the one-worker baseline), without the convergence runs unless asked;
    a quicker look at a few variants than the whole section (``python -m benchmarks --only network``)."""
    import argparse
    from pathlib import Path
    known = sorted({n for _, names in JOBS.values() for n in names.values()})
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_network", description=main.__doc__)
    p.add_argument("--variants", required=True, help="comma-separated figure names: " + ", ".join(known))
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--rates", default=",".join(RATES), help=f"comma-separated, of {', '.join(RATES)}")
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds (one launch per job and round)")
    p.add_argument("--convergence", action="store_true", help="also the LM's convergence runs (minutes)")
    p.add_argument("--out", type=Path, required=True, help="results .json (a .md beside it)")
    opts = p.parse_args(argv)
    opts.variants = set(opts.variants.split(","))
    opts.models, opts.rates = opts.models.split(","), opts.rates.split(",")
    unknown = sorted(opts.variants - set(known))
    if unknown or not set(opts.models) <= set(MODELS) or not set(opts.rates) <= set(RATES):
        p.error(f"unknown variant, model or rate in {unknown or opts.models + opts.rates}; choose variants from "
                f"{', '.join(known)}, models from {', '.join(MODELS)}, rates from {', '.join(RATES)}")
    opts.quick, opts.work = False, Path(__file__).resolve().parent / "_work"
    opts.work.mkdir(exist_ok=True)
    res = run(opts)
    opts.out.write_text(json.dumps(res, indent=1))
    opts.out.with_suffix(".md").write_text(res["markdown"] + "\n")
    print(res["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
