"""Section "coldstart": from launching the command to the first completed training step, distrib
(project launcher, controller chosen by it) against torchrun + DDP over Gloo, alternated."""
from __future__ import annotations

import json
import time

from benchmarks import launchers, stats
from benchmarks.bench_step import STEP

COMMANDS = {
    # distrib as users start it, without --controller: the launcher's own choice is part of the start.
    "distrib": lambda n, argv: [launchers.PY, "-m", "launch", "-np", str(n), *argv],
    "torchrun": launchers.torchrun,
}
IMPL = {"distrib": "distrib", "torchrun": "ddp"}


def run(opts) -> dict:
    cold = {name: [] for name in COMMANDS}
    for r in range(opts.rounds):
        for name in stats.rotate(list(cold), r):
            out = opts.work / f"cold-{name}.json"
            out.unlink(missing_ok=True)
            env = launchers.worker_env()
            variant = "buckets" if name == "distrib" else "default"
            argv = [STEP, "--impl", IMPL[name], "--variants", variant, "--model", "mlp", "--warmup", "0",
                    "--steps", "1", "--out", str(out)]
            t0 = time.time()
            launchers.run(COMMANDS[name](opts.np, argv), env)
            cold[name].append(json.loads(out.read_text())["by_model"]["mlp"]["first_step_unix"] - t0)
    row = {"seconds": {i: stats.summary(v) for i, v in cold.items()},
           "ratios": {"distrib_vs_torchrun": {"a": "distrib", "b": "torchrun", "what": "launch to first step",
                                              **stats.ratios(cold["distrib"], cold["torchrun"])}}}
    md = ("| distrib / torchrun | distrib s | torchrun s |\n|---|---|---|\n"
          f"| {stats.fmt(row['ratios']['distrib_vs_torchrun'])} | {stats.fmt_value(row['seconds']['distrib'], 's', 2)} | "
          f"{stats.fmt_value(row['seconds']['torchrun'], 's', 2)} |\n\ndistrib: `python -m launch -np 2` (controller "
          "chosen by the launcher); torchrun: `torchrun --nproc_per_node 2` with DDP over Gloo; the 4.2 M-parameter MLP.")
    return {"title": "Cold start: launch to first completed step (2 workers, MLP)", "rows": [row], "markdown": md}
