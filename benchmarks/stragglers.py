"""python -m benchmarks.stragglers [--runs 10] [--healthy-steps 1000]: how reliably a slow rank is
flagged, and that a healthy run flags none (issue: "a rank slowed 1.5x is flagged within 50 steps
in 10 of 10 runs and no rank is flagged in a 1000-step run without one"). Not in ``make bench``.

Each run is tests/scripts/faults.py under ``python -m launch -np 2`` (the script of the fault table:
~20 ms of compute a step and two named allreduces): ``--fault slow`` makes rank 1's compute take
1.5 times as long from the first step, and the run ends once rank 0's metrics.jsonl holds the
launcher's straggler event (or after 1000 steps); ``--fault none`` runs ``--healthy-steps`` steps.
Writes benchmarks/results-stragglers.json and its .md (``--out``).
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "scripts" / "faults.py"
WITHIN = 50  # the bar: flagged within this many steps


def launch(fault: str, steps: int, run_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch", "-np", "2", "--hang-timeout", "600", str(FAULTS), "--fault", fault,
           "--steps", str(steps), "--run-dir", str(run_dir)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def straggler_events(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "straggler":
            events.append(rec)
    return events


def one_run(fault: str, steps: int, work: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"straggler-{fault}-", dir=work))
    t = time.time()
    proc = launch(fault, steps, run_dir)
    flagged_lines = [line for line in proc.stderr.splitlines() if "is a straggler" in line]
    events = straggler_events(run_dir)
    first: Optional[dict] = events[0] if events else None
    return {"fault": fault, "exit": proc.returncode, "seconds": round(time.time() - t, 1),
            "log_lines": flagged_lines, "events": len(events),
            "rank": first and first.get("rank"), "host": first and first.get("host"),
            "phase": first and first.get("phase"), "flagged_step": first and first.get("flagged_step"),
            "ratio": first and first.get("ratio"), "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stragglers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="runs with rank 1 slowed 1.5x")
    p.add_argument("--healthy-steps", type=int, default=1000, help="steps of the run without a slow rank")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-stragglers.json")
    args = p.parse_args(argv)
    if args.runs < 1 or args.healthy_steps < 1:
        p.error("--runs and --healthy-steps must be >= 1")
    work = REPO / "benchmarks" / "_work"
    work.mkdir(parents=True, exist_ok=True)
    slow = []
    for k in range(args.runs):
        run = one_run("slow", 1000, work)
        ok = run["exit"] == 0 and run["rank"] == 1 and run["phase"] == "compute" and run["events"] == 1 \
            and len(run["log_lines"]) == 1 and run["flagged_step"] is not None and run["flagged_step"] <= WITHIN
        run["ok"] = ok
        slow.append(run)
        print(f"[stragglers] slow run {k + 1}/{args.runs}: flagged at step {run['flagged_step']} (rank {run['rank']} "
              f"on {run['host']}, phase {run['phase']}, {run['ratio']}x), exit {run['exit']}, "
              f"{'ok' if ok else 'MISSED'}", flush=True)
    healthy = one_run("none", args.healthy_steps, work)
    healthy["ok"] = healthy["exit"] == 0 and not healthy["log_lines"] and healthy["events"] == 0
    print(f"[stragglers] healthy run of {args.healthy_steps} steps: {len(healthy['log_lines'])} flagged, "
          f"exit {healthy['exit']}", flush=True)
    hits = sum(r["ok"] for r in slow)
    steps = [r["flagged_step"] for r in slow]
    md = ("| runs with rank 1 slowed 1.5x | flagged within 50 steps (rank 1, phase compute) | step flagged, each run "
          "| healthy run | ranks flagged |\n|---|---|---|---|---|\n"
          f"| {args.runs} | {hits}/{args.runs} | {', '.join(map(str, steps))} | {args.healthy_steps} steps | "
          f"{len(healthy['log_lines'])} |\n\n"
          f"`python -m benchmarks.stragglers` on {socket.gethostname()}: tests/scripts/faults.py under "
          "`python -m launch -np 2` (~20 ms of compute a step, two named allreduces), rank 1's compute 1.5 times "
          "as long from the first step (a sleep); the step is the launcher's `flagged_step` in rank 0's "
          "metrics.jsonl (phase times come in windows of 10 steps).")
    result = {"title": "Stragglers: a rank slowed 1.5x, and a healthy run", "runs": slow, "healthy": healthy,
              "flagged": hits, "markdown": md}
    args.out.write_text(json.dumps(result, indent=1, default=str))
    args.out.with_suffix(".md").write_text(f"# {result['title']}\n\n{md}\n")
    print(md, flush=True)
    return 0 if hits == args.runs and healthy["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
