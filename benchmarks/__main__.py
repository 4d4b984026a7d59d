"""python -m benchmarks [--quick] [--only allreduce,step,...] [--rounds N] [--out FILE.json]

Writes benchmarks/results.json (every figure with its spread) and results.md (tables);
``python -m benchmarks.render_readme`` turns them into the README's Performance section.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from benchmarks import registry

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short smoke run (fewer sizes, steps, rounds)")
    p.add_argument("--only", default=None, help="comma-separated sections: "
                   + ", ".join(s.name for s in registry.available()))
    p.add_argument("--rounds", type=int, default=None, help="A/B alternations per figure (default 3, quick 1)")
    p.add_argument("--np", type=int, default=2, help="workers")
    p.add_argument("--out", type=Path, default=None,
                   help="results file, .json (a .md beside it). Default: benchmarks/results.json for a full run, "
                        "benchmarks/results-quick.json for --quick, benchmarks/_work/results.json with --only "
                        "or --rounds: a partial run never replaces the committed results")
    args = p.parse_args(argv)
    if args.out is None:
        partial = args.only or args.rounds
        args.out = HERE / "_work" / "results.json" if partial else HERE / ("results-quick.json" if args.quick
                                                                           else "results.json")
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.rounds < 1 or args.np < 2:
        p.error("--rounds must be >= 1 and --np >= 2")
    return args


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        sections = registry.select(opts.only)
    except ValueError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    opts.work = HERE / "_work"
    opts.work.mkdir(exist_ok=True)
    started = time.time()
    results = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "host": platform.node(), "cpus": os.cpu_count(), "np": opts.np, "rounds": opts.rounds,
                        "quick": opts.quick, "only": opts.only, "torch": _version("torch"),
                        "horovod": _version("horovod"), "load_before": os.getloadavg()}, "sections": {}}
    failed = False
    for section in sections:
        t = time.time()
        print(f"[benchmarks] {section.name} ...", flush=True)
        try:
            res = section.load()(opts)
        except Exception as exc:  # one broken section must not hide the others' figures
            failed = True
            res = {"title": section.name, "error": f"{type(exc).__name__}: {exc}", "rows": [],
                   "markdown": f"FAILED: `{type(exc).__name__}: {str(exc)[:500]}`"}
            traceback.print_exc()
        res["seconds"] = round(time.time() - t, 1)
        results["sections"][section.name] = res
        print(f"[benchmarks] {section.name} done in {res['seconds']} s", flush=True)
        print(res["markdown"], flush=True)
    results["meta"]["load_after"] = os.getloadavg()
    results["meta"]["seconds"] = round(time.time() - started, 1)
    write(results, opts.out)
    print(f"[benchmarks] {results['meta']['seconds'] / 60:.1f} min; wrote {opts.out} and its .md", flush=True)
    return 1 if failed else 0


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    md = ["# distrib benchmarks", "",
          f"{meta['date']}, {meta['cpus']} CPUs, {meta['np']} workers x 1 thread, "
          f"{meta['rounds']} alternated rounds{' (quick)' if meta['quick'] else ''}, torch {meta['torch']}, "
          f"Horovod {meta['horovod']}, load average {meta['load_before'][0]:.1f} -> {meta['load_after'][0]:.1f}, "
          f"{meta['seconds'] / 60:.1f} min. Figures: median over rounds (min-max). Produced by `make bench`."
          + "".join(f" The {name} section: a separate run at {r['date']} ({r['why']})."
                    for name, r in meta.get("reruns", {}).items()), ""]
    for name, res in results["sections"].items():
        md += [f"## {res['title']}", "", res["markdown"], ""]
    out.with_suffix(".md").write_text("\n".join(md))
    out.write_text(json.dumps(results, indent=1, default=str))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
