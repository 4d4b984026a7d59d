"""A soak job's figures against its failure-free reference, and the table of them."""
from __future__ import annotations

from typing import List

from benchmarks import stats
from benchmarks.soak import accounting
from benchmarks.soak.churn import JobResult

SEED, BLOCK_SIZE = 3, 32  # worker.py's defaults: the order of each epoch and the data set's length


def dataset_len() -> int:
    from benchmarks.soak.worker import dataset
    return len(dataset(BLOCK_SIZE)[0])


def rate(job: JobResult) -> float:
    """Steps per second of the final history over the job's measured span."""
    history = accounting.kept(job.records)
    return accounting.steps_done_by(history, job.start + job.spec.seconds) / job.spec.seconds


def sample_rate(job: JobResult) -> float:
    """Samples per second the final history trained over the job's measured span."""
    return _samples_by(accounting.kept(job.records), job.start + job.spec.seconds) / job.spec.seconds


def _samples_by(history, deadline: float) -> int:
    return sum(len(r.samples) for r in history if r.ended is not None and r.ended <= deadline)


def summarise(job: JobResult, reference: JobResult) -> dict:
    history = accounting.kept(job.records)
    end = job.start + job.spec.seconds
    steps = accounting.steps_done_by(history, end)
    expected = rate(reference) * job.spec.seconds
    # The last step may be cut short by the stop on some ranks: account for completed steps only.
    done = accounting.steps_done_by(history, float("inf"))
    samples = accounting.sample_accounting([r for r in history if r.step < done], dataset_len(), SEED)
    kills = []
    for k in job.kills:
        kills.append({"kind": k.kind, "node": k.node, "at_s": round(k.time - job.start, 1), "pid": k.pid,
                      "next_step_s": _round(accounting.kill_to_next_step(history, k.time))})
    row = {"mode": job.spec.mode, "kill_every_s": job.spec.kill_every_s, "seconds": job.spec.seconds,
           "steps": steps, "reference_steps": round(expected, 1), "efficiency": steps / expected,
           "sample_efficiency": _samples_by(history, end) / (sample_rate(reference) * job.spec.seconds),
           "reference_rate": rate(reference), "kills": kills, "accounting": samples,
           "trained_records": len(job.records), "kept_records": len(history),
           "rolled_back_rank_steps": len(job.records) - len(history), "stalls": stalls(job),
           "rejoins": rejoin_breakdown(job, job.phases)}
    for kind in ("worker", "host"):
        times = [k["next_step_s"] for k in kills if k["kind"] == kind and k["next_step_s"] is not None]
        row[f"{kind}_next_step_s"] = stats.summary(times) if times else None
        row[f"{kind}_kills"] = sum(k["kind"] == kind for k in kills)
        row[f"{kind}_recovered"] = len(times)
    return row


STALL_S = 1.0  # a pause between two step ends this long is a stall (a step takes ~0.15 s here)


def stalls(job: JobResult) -> dict:
    """Where the lost time went: every pause of over STALL_S between consecutive step ends (any
    rank, kept or not) inside the measured span, charged to a kill when one fell inside it or
    just before (recovery: detection, roll-back or restart), else to a world that grew (a host
    rejoining: the others wait in the rendezvous while its new worker starts), else to "other"."""
    end = job.start + job.spec.seconds
    ends = sorted({round(r.ended, 3) for r in job.records if r.ended is not None and r.ended <= end})
    size_at = sorted((r.ended, r.size) for r in job.records if r.ended is not None)
    kills = sorted(k.time for k in job.kills)
    out = {"kill": [], "rejoin": [], "other": []}
    for a, b in zip(ends, ends[1:]):
        if b - a <= STALL_S:
            continue
        if any(a - 0.5 <= t <= b for t in kills):
            kind = "kill"
        else:
            before = next((sz for t, sz in reversed(size_at) if t <= a), 0)
            after = next((sz for t, sz in size_at if t >= b), 0)
            kind = "rejoin" if after > before else "other"
        out[kind].append(round(b - a, 2))
    return {kind: {"count": len(v), "seconds": round(sum(v), 1), "each": v} for kind, v in out.items()}


REJOIN_PARTS = ("spawn", "imports", "join", "setup", "first_step")
REJOIN_WORDS = {"spawn": "until the new worker's script started (the others enter the rendezvous, Horovod "
                         "starts the worker over ssh)",
                "imports": "its imports (python, torch, distrib)", "join": "distrib.init (Horovod's rendezvous)",
                "setup": "data, model and distrib.Run", "first_step": "state sync from rank 0 and the first step"}


def rejoin_parts(phases, stall_start: float, stall_end: float) -> dict:
    """Where one rejoin stall (the others' last step end -> the first step end of the grown world)
    went, from the joining worker's start-up times: spawn (until its script started: the others
    entering the rendezvous, Horovod starting the worker, ssh, the shim), imports (python, torch,
    distrib), join (distrib.init: Horovod's rendezvous), setup (data, model, distrib.Run), first
    step (state sync from rank 0 and the step). {} when no worker started inside the stall."""
    joiners = [p for p in phases.values() if stall_start <= p.get("started", -1) <= stall_end and "ready" in p]
    if not joiners:
        return {}
    p = min(joiners, key=lambda q: q["started"])
    marks = [stall_start, p["started"], p["imported"], p["joined"], p["ready"], stall_end]
    return {part: round(b - a, 2) for part, a, b in zip(REJOIN_PARTS, marks, marks[1:])}


def rejoin_breakdown(job: JobResult, phases) -> dict:
    """:func:`rejoin_parts` of every rejoin stall, and each part's median."""
    end = job.start + job.spec.seconds
    ends = sorted({r.ended for r in job.records if r.ended is not None and r.ended <= end})
    size_at = sorted((r.ended, r.size) for r in job.records if r.ended is not None)
    each = []
    for a, b in zip(ends, ends[1:]):
        if b - a <= STALL_S or any(a - 0.5 <= k.time <= b for k in job.kills):
            continue
        before = next((sz for t, sz in reversed(size_at) if t <= a), 0)
        after = next((sz for t, sz in size_at if t >= b), 0)
        if after > before:
            parts = rejoin_parts(phases, a, b)
            if parts:
                each.append(parts)
    return {"each": each, "median": {part: stats.summary([e[part] for e in each])["median"] for part in REJOIN_PARTS}
            if each else {}}


def _round(x):
    return None if x is None else round(x, 2)


def line(row: dict) -> str:
    parts = [f"{row['mode']} every {row['kill_every_s']:g} s for {row['seconds'] / 60:g} min: {row['steps']} steps "
             f"of {row['reference_steps']:.0f} ({100 * row['efficiency']:.1f} %), samples "
             f"{100 * row['sample_efficiency']:.1f} %"]
    for kind in ("worker", "host"):
        s = row[f"{kind}_next_step_s"]
        parts.append(f"{kind} kill -> next step {stats.fmt_value(s, 's', 2) if s else 'n/a'} "
                     f"({row[f'{kind}_recovered']}/{row[f'{kind}_kills']})")
    st = row["stalls"]
    parts.append("stalls: " + ", ".join(f"{k} {v['count']} x, {v['seconds']:g} s" for k, v in st.items())
                 + f"; {row['rolled_back_rank_steps']} rank-steps rolled back")
    rejoin = row.get("rejoins", {}).get("median")
    if rejoin:
        parts.append("a rejoin's stall, median s: " + ", ".join(f"{k} {v:g}" for k, v in rejoin.items()))
    acc = row["accounting"]
    parts.append(f"samples: {acc['samples']} trained, {acc['twice']} twice, accounting "
                 f"{'ok' if acc['ok'] else 'FAILED: ' + str(acc['epochs'])}")
    return "; ".join(parts)


def table(rows: List[dict], meta: dict) -> str:
    out = ["| measured | mode | kill every | length | steps / failure-free | step efficiency | sample efficiency | worker kill -> next step, s "
           "| host kill -> next step, s | time stalled: after kills / rejoins, s | samples trained | trained twice | missing (not the epoch's tail) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r["accounting"]
        cells = []
        for kind in ("worker", "host"):
            s = r[f"{kind}_next_step_s"]
            cells.append(f"{stats.fmt_value(s, '', 2) if s else 'n/a'} ({r[f'{kind}_recovered']}/{r[f'{kind}_kills']})")
        wrong = sum(e["out_of_order"] + (0 if e["missing_is_tail"] else e["missing"]) for e in acc["epochs"])
        out.append(f"| {str(r.get('date', '?'))[:10]} | {r['mode']} | {r['kill_every_s']:g} s | {r['seconds'] / 60:g} min | {r['steps']} / "
                   f"{r['reference_steps']:.0f} | {100 * r['efficiency']:.1f} % | {100 * r['sample_efficiency']:.1f} % | {cells[0]} | {cells[1]} | "
                   f"{r['stalls']['kill']['seconds']:g} / {r['stalls']['rejoin']['seconds']:g} | {acc['samples']} | {acc['twice']} | {wrong} |")
    for r in rows:
        rejoin = r.get("rejoins", {}).get("median")
        if rejoin:
            out += ["", f"Where a rejoin's stall went ({r['mode']}, one kill per {r['kill_every_s']:g} s; median s of "
                    f"{len(r['rejoins']['each'])} rejoins): " + ", ".join(
                        f"{REJOIN_WORDS[k]} {v:.2f}" for k, v in rejoin.items()) + "."]
    out += ["", "Each row is from the soak run of the date in its first column (a run may measure some rows alone). "
            "3 namespace hosts (node1..node3, one worker each, on this machine's shared cores), the example "
            "LM at a tiny size, a commit (elastic) and checkpoint every 10 steps. Kills alternate: a worker "
            "(SIGKILL of the training process on node2 or node3), then a whole host (every process SIGKILLed and "
            f"its link down, booted again after {meta['host_down_s']:g} s). Step efficiency: steps the final state "
            "holds by the end / steps of a failure-free run of the same job (run just before, same invocation) in "
            "the same wall time, both counted from the first step; sample efficiency: the same for the samples those steps trained (a world of 2 trains 8 a step, of 3 12). Kill -> next step: median (min-max) seconds to "
            "the end of the first step begun after the kill that the final state kept (n/m: recovered of kills; a kill in the last seconds may have none before the stop). Time stalled: "
            f"pauses of over {STALL_S:g} s between step ends, after a kill (detection and recovery) or when a "
            "world grew (a host rejoining: the others wait in the rendezvous while its worker starts). "
            f"Workers' HOROVOD_GLOO_TIMEOUT_SECONDS={meta['gloo_timeout_s']}. Sample accounting from each "
            "step's samples, recorded before its backward: trained twice counts samples the final state trained on "
            "more than once in an epoch; missing counts samples absent other than the drop_last tail of an "
            "epoch that ended (the epoch in progress must be an exact prefix of its order)."]
    return "\n".join(out)
