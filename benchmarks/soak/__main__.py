"""python -m benchmarks.soak [--minutes 10] [--every 60] [--fast-minutes 2] [--fast-every 15] ...

For each mode (``--modes elastic,restart``): a failure-free reference job (``--ref-minutes``),
then the soak at one kill per ``--every`` seconds for ``--minutes``, then at one kill per
``--fast-every`` seconds for ``--fast-minutes`` (0: skipped). Writes benchmarks/results-soak.json
and its .md (``--out``): step efficiency, kill -> next step, sample accounting. Rows of an earlier
run that this one does not measure again (another mode or length) are kept, each with its date:
``--modes elastic --fast-minutes 0`` measures the elastic row at one kill per minute alone.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.soak import report
from benchmarks.soak.churn import JobSpec, run_job

HERE = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="elastic,restart", help="comma-separated: elastic, restart")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak at one kill per --every s")
    p.add_argument("--every", type=float, default=60.0, help="seconds between kills")
    p.add_argument("--fast-minutes", type=float, default=2.0, help="length of the --fast-every soak (0: none)")
    p.add_argument("--fast-every", type=float, default=15.0)
    p.add_argument("--ref-minutes", type=float, default=1.5, help="length of the failure-free reference")
    p.add_argument("--host-down", type=float, default=10.0, help="seconds a killed host stays down")
    p.add_argument("--gloo-timeout", type=int, default=15, help="HOROVOD_GLOO_TIMEOUT_SECONDS of the workers")
    p.add_argument("--step-sleep", type=float, default=0.1,
                   help="seconds of other work per step: the three hosts share this machine's cores, so without it "
                        "a world of 2 steps faster than one of 3 and losing a worker would look like a gain")
    p.add_argument("--out", type=Path, default=HERE / "results-soak.json")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("elastic", "restart")]
    if bad or not args.modes:
        p.error(f"--modes {','.join(bad) or '(empty)'}: choose from elastic, restart")
    if min(args.minutes, args.every, args.ref_minutes) <= 0 or args.fast_minutes < 0 or args.fast_every <= 0:
        p.error("--minutes, --every, --ref-minutes and --fast-every must be > 0, --fast-minutes >= 0")
    return args


def main(argv=None) -> int:
    opts = parse_args(argv)
    from tests.nodes import start  # the namespace hosts of the multi-host tests (needs root)
    work = HERE / "_work" / "soak"
    started = time.time()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "load_before": os.getloadavg(), "host_down_s": opts.host_down,
            "gloo_timeout_s": opts.gloo_timeout, "step_sleep_s": opts.step_sleep}
    runs = []
    nodes = start(3)
    try:
        for mode in opts.modes:
            common = dict(mode=mode, host_down_s=opts.host_down, gloo_timeout_s=opts.gloo_timeout,
                          step_sleep=opts.step_sleep)
            reference = run_job(nodes, JobSpec(seconds=opts.ref_minutes * 60, kill_every_s=0, **common),
                                work / f"{mode}-reference")
            print(f"[soak] {mode} reference: {report.rate(reference):.2f} steps/s", flush=True)
            plans = [(opts.minutes, opts.every)] + ([(opts.fast_minutes, opts.fast_every)] if opts.fast_minutes else [])
            for minutes, every in plans:
                job = run_job(nodes, JobSpec(seconds=minutes * 60, kill_every_s=every, **common),
                              work / f"{mode}-every{every:g}")
                row = {**report.summarise(job, reference), "date": meta["date"]}
                print(f"[soak] {report.line(row)}", flush=True)
                runs.append(row)
                results = write(opts.out, meta, runs, started)  # after each job: a cut-short soak keeps its figures
    finally:
        nodes.down()
    results = write(opts.out, meta, runs, started)
    print(results["markdown"], flush=True)
    print(f"[soak] {results['meta']['seconds'] / 60:.1f} min; wrote {opts.out} and its .md", flush=True)
    return 0 if all(r["accounting"]["ok"] for r in runs) else 1


def write(out: Path, meta: dict, runs: list, started: float) -> dict:
    meta = {**meta, "load_after": os.getloadavg(), "seconds": round(time.time() - started, 1)}
    rows = merged(previous_rows(out), runs)
    results = {"meta": meta, "title": "Churn soak: 3 hosts, kills on a schedule", "rows": rows,
               "markdown": report.table(rows, meta)}
    out.write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(f"# {results['title']}\n\n{results['markdown']}\n")
    return results


def row_key(row: dict) -> tuple:
    return row["mode"], row["kill_every_s"], row["seconds"]


def previous_rows(out: Path) -> list:
    """The rows ``out`` holds, each with the date it was measured (older files kept it in meta)."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    return [{**row, "date": row.get("date", old.get("meta", {}).get("date", "?"))} for row in old.get("rows", [])]


def merged(old: list, new: list) -> list:
    """``new`` in place of the rows of ``old`` it measured again; the others kept, in their order."""
    fresh = {row_key(r): r for r in new}
    rows = [fresh.pop(row_key(r), r) for r in old]
    return rows + [r for r in new if row_key(r) in fresh]


if __name__ == "__main__":
    sys.exit(main())
