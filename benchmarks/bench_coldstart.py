"""Section "coldstart": from launching the command to the first completed training step, distrib
(project launcher) against torchrun + DDP, alternated."""
from __future__ import annotations

import json
import time

from benchmarks import launchers, stats
from benchmarks.bench_step import STEP, _command


def _cold_command(impl, argv, opts, env):
    # distrib as users start it, without --controller: the launcher's own choice is part of the start.
    if impl == "distrib" and launchers.has_project_launcher():
        return launchers.distrib_cmd(opts.np, argv, "auto", env)
    return _command(impl, argv, opts, env)


def run(opts) -> dict:
    cold = {"distrib": [], "ddp": []}
    for r in range(opts.rounds):
        for impl in stats.rotate(list(cold), r):
            out = opts.work / f"cold-{impl}.json"
            out.unlink(missing_ok=True)
            env = launchers.worker_env()
            argv = [STEP, "--impl", impl, "--model", "mlp", "--warmup", "0", "--steps", "1", "--out", str(out)]
            t0 = time.time()
            launchers.run(_cold_command(impl, argv, opts, env), env)
            cold[impl].append(json.loads(out.read_text())["by_model"]["mlp"]["first_step_unix"] - t0)
    row = {"seconds": {i: stats.summary(v) for i, v in cold.items()},
           "distrib_vs_torchrun": stats.ratios(cold["distrib"], cold["ddp"])}
    launcher = "python -m launch" if launchers.has_project_launcher() else f"{opts.controller} launcher directly"
    md = ("| distrib / torchrun | distrib s | torchrun s |\n|---|---|---|\n"
          f"| {stats.fmt(row['distrib_vs_torchrun'])} | {stats.fmt_value(row['seconds']['distrib'], 's', 2)} | "
          f"{stats.fmt_value(row['seconds']['ddp'], 's', 2)} |\n\ndistrib started by: {launcher} (controller chosen by the launcher).")
    return {"title": "Cold start: launch to first completed step (2 workers, MLP)", "rows": [row], "markdown": md}
