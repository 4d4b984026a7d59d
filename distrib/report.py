"""Plots and a text summary of a finished (or running, or crashed) run from its metrics.jsonl.

    python -m distrib.report RUN_DIR [--out DIR]

writes into ``RUN_DIR/report/`` (or ``--out``):

* ``loss_lr.png``     training loss and learning rate over steps, every evaluation metric
                      (``val_<name>`` in ``eval``/``final`` events, as :class:`distrib.Run` logs
                      them) as points: losses on the loss axis, the others on their own;
* ``throughput.png``  samples/s and the number of workers over wall-clock time, with restarts,
                      resumes, preemptions and world-size changes marked (when the records have
                      ``time`` and ``samples_per_s``);
* ``breakdown.png``   where a step's time goes (data, compute, allreduce, optimizer, checkpoint),
                      when the records carry the ``t_*`` breakdown;
* ``summary.txt``     the figures a user checks first, also printed; ``summary.json`` the same
                      for programs.

Reading the log is separate from drawing it (:func:`load_run` -> :class:`RunLog`), so the
summary needs no matplotlib and the tests can check the numbers without looking at pixels.
Bad input (no such directory, no metrics, nothing parseable) is one line on stderr and exit 2;
nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from distrib.watch.timing import PHASES as STEP_PHASES

PHASES = tuple(f"t_{phase}" for phase in STEP_PHASES) + ("t_other",)  # the fields metrics.jsonl has
PHASE_LABELS = {"t_data": "waiting for data", "t_compute": "forward + backward",
                "t_allreduce": "waiting for allreduce", "t_optimizer": "optimizer step",
                "t_checkpoint": "checkpoint stall", "t_other": "other"}
NUMERIC_FIELDS = ("loss", "lr", "samples_per_s", "world_size", "time", "restarts", "val_loss") + PHASES
EVAL_PREFIX = "val_"  # evaluation metrics in events: val_loss, val_accuracy, ...
# Events drawn as vertical lines, with their colour, most important first: when several happen
# at once (a restart is followed by a resume), the line takes the first one's colour.
MARKED_EVENTS = {"restart": "tab:red", "resize": "tab:purple", "preempted": "tab:brown",
                 "resume": "tab:orange"}


class ReportError(Exception):
    """Bad input to the report: the message names the problem and the fix."""


@dataclass
class RunLog:
    """The records of one run directory's metrics.jsonl, split by kind (in file order)."""
    run_dir: Path
    steps: List[dict]                   # per-step records (have "loss"), every attempt
    events: List[dict]                  # {"event": ..., "step": ..., "time": ...}
    skipped_lines: int = 0
    markers: List[dict] = field(default_factory=list)  # derived: what the throughput plot marks

    def final_history(self) -> List[dict]:
        """One record per step, the last one written: after a rollback (restart from an older
        checkpoint, elastic reset) the steps that were redone replace the abandoned ones."""
        by_step: Dict[int, dict] = {}
        for rec in self.steps:
            by_step[rec["step"]] = rec
        return [by_step[s] for s in sorted(by_step)]


def load_run(run_dir) -> RunLog:
    """Read ``run_dir/metrics.jsonl``; raises :class:`ReportError` for unusable input."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory; pass the --run-dir of a training run")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} does not exist; pass the --run-dir of a run that logged at least one step")
    steps, events, skipped = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1  # a line cut short by a killed run
                continue
            if not _well_formed(rec):
                skipped += 1
            elif "event" in rec:
                events.append(rec)
            elif "loss" in rec:
                steps.append(rec)
            else:
                skipped += 1
    if not steps:
        raise ReportError(f"{path} has no step records ({skipped} unreadable lines); "
                          "log steps with distrib.watch.metrics.MetricsLogger (train_lm --log-every N)")
    log = RunLog(run_dir, steps, events, skipped)
    log.markers = _markers(log)
    return log


def _well_formed(rec) -> bool:
    """A record the report can use: a dict with an integer step whose known fields are numbers
    (a hand-edited or foreign line is skipped, not drawn as garbage or crashed on)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
        return False
    if "event" in rec and not isinstance(rec["event"], str):
        return False
    return all(isinstance(rec[k], (int, float)) and not isinstance(rec[k], bool)
               for k in rec if k in NUMERIC_FIELDS or k.startswith(EVAL_PREFIX))


def eval_names(events: Sequence[dict]) -> List[str]:
    """The evaluation metrics the events carry (``val_loss``, ``val_accuracy``, ...), in order seen."""
    names: Dict[str, None] = {}
    for e in events:
        for key in e:
            if key.startswith(EVAL_PREFIX):
                names.setdefault(key)
    return list(names)


def _markers(log: RunLog) -> List[dict]:
    """Moments worth a vertical line: marked events, a change of the restart count (the launcher
    started the job again) and a change of world size between consecutive records."""
    out = [{"time": e["time"], "step": e["step"], "label": f"{e['event']} @ step {e['step']}", "kind": e["event"]}
           for e in log.events if e["event"] in MARKED_EVENTS and "time" in e]
    records = sorted(log.steps + log.events, key=lambda r: r.get("time", 0.0))
    prev = None
    for rec in records:
        if prev is not None and "time" in rec:
            if rec.get("restarts", 0) > prev.get("restarts", 0):
                out.append({"time": rec["time"], "step": rec["step"], "label": f"restart {rec['restarts']}",
                            "kind": "restart"})
            if rec.get("world_size") != prev.get("world_size") and rec.get("world_size") is not None:
                out.append({"time": rec["time"], "step": rec["step"],
                            "label": f"{prev.get('world_size')} -> {rec['world_size']} workers", "kind": "resize"})
        prev = rec
    return sorted(out, key=lambda m: m["time"])


def breakdown(steps: Sequence[dict]) -> Dict[str, float]:
    """Mean ms per step of each phase over the records that carry the breakdown."""
    timed = [r for r in steps if all(k in r for k in PHASES)]
    return {k: statistics.fmean(r[k] for r in timed) for k in PHASES} if timed else {}


def summarize(log: RunLog) -> Dict[str, object]:
    history = log.final_history()
    rates = [r["samples_per_s"] for r in log.steps if isinstance(r.get("samples_per_s"), (int, float))]
    val = [e["val_loss"] for e in log.events if "val_loss" in e]
    last_eval = next((e for e in reversed(log.events) if any(k.startswith(EVAL_PREFIX) for k in e)), {})
    times = [r["time"] for r in log.steps + log.events if "time" in r]
    return {
        "run_dir": str(log.run_dir),
        "last_step": history[-1]["step"],
        "logged_steps": len(history),
        "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        "min_loss": min(r["loss"] for r in history),
        "final_val_loss": val[-1] if val else None,
        "final_eval": {k: v for k, v in last_eval.items() if k.startswith(EVAL_PREFIX)},
        "median_samples_per_s": statistics.median(rates) if rates else None,
        "world_sizes": sorted({r["world_size"] for r in log.steps + log.events if "world_size" in r}),
        "restarts": max((r.get("restarts", 0) for r in log.steps + log.events), default=0),
        "events": {name: sum(1 for e in log.events if e["event"] == name)
                   for name in sorted({e["event"] for e in log.events})},
        "wall_s": (max(times) - min(times)) if len(times) > 1 else 0.0,
        "breakdown_ms": breakdown(log.steps),
        "stragglers": stragglers(log.events),
        "skipped_lines": log.skipped_lines,
    }


def stragglers(events: Sequence[dict]) -> List[Dict[str, object]]:
    """The ranks the launcher flagged as persistently slower than their peers (``straggler``
    events, written by rank 0 when the notice reached it): rank, host, slow phase and the step
    at which it was flagged (the event's own step is when rank 0 wrote it, a few steps later)."""
    out = []
    for e in events:
        if e["event"] != "straggler":
            continue
        out.append({"rank": e.get("rank"), "host": e.get("host"), "phase": e.get("phase"),
                    "step": e.get("flagged_step", e["step"]), "ratio": e.get("ratio"),
                    "phase_ms": e.get("phase_ms"), "peers_phase_ms": e.get("peers_phase_ms")})
    return out


def _straggler_line(s: Dict[str, object]) -> str:
    def num(v, fmt):
        return "?" if not isinstance(v, (int, float)) else format(v, fmt)
    return (f"straggler: rank {s['rank']} on {s['host']} flagged at step {s['step']}, slowest phase {s['phase']} "
            f"({num(s['phase_ms'], '.1f')} ms/step against {num(s['peers_phase_ms'], '.1f')} ms on the others; "
            f"{num(s['ratio'], '.2f')}x its peers' work per step)")


def summary_text(s: Dict[str, object]) -> str:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    lines = [f"run: {s['run_dir']}",
             f"steps: {s['last_step']} ({s['logged_steps']} logged), wall time {s['wall_s'] / 60:.1f} min",
             f"loss: {s['first_loss']:.4f} -> {s['final_loss']:.4f} (min {s['min_loss']:.4f}), "
             f"validation {num(s['final_val_loss'], '.4f')}",
             f"throughput: median {num(s['median_samples_per_s'], '.1f')} samples/s",
             f"world sizes: {', '.join(map(str, s['world_sizes']))}; restarts: {s['restarts']}",
             "events: " + (", ".join(f"{k} x{v}" for k, v in s["events"].items()) or "none")]
    lines += [_straggler_line(x) for x in s.get("stragglers", [])]
    if s.get("final_eval"):
        lines.append("last evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in s["final_eval"].items()))
    if s["skipped_lines"]:
        lines.append(f"skipped {s['skipped_lines']} unreadable lines (a run killed mid-write leaves one)")
    bd = s["breakdown_ms"]
    if bd:
        total = sum(bd.values()) or 1.0
        lines.append("time per step (mean over logged steps):")
        lines += [f"  {PHASE_LABELS[k]:<22}{v:9.2f} ms {100 * v / total:6.1f}%" for k, v in bd.items()]
        lines.append(f"  {'total':<22}{total:9.2f} ms  100.0%")
    return "\n".join(lines) + "\n"


# -- drawing ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: works on a headless node
    import matplotlib.pyplot as plt
    return plt


def plot_loss_lr(log: RunLog, path: Path) -> None:
    plt = _pyplot()
    history = log.final_history()
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1.3]})
    ax_loss.plot([r["step"] for r in history], [r["loss"] for r in history], color="tab:blue",
                 lw=1.5, label="training loss")
    names = eval_names(log.events)
    others = [n for n in names if "loss" not in n]
    ax_other = ax_loss.twinx() if others else None
    markers = iter(["o", "s", "^", "D", "v", "P", "X"] * 4)
    for name in names:
        points = [e for e in log.events if name in e]
        ax = ax_other if name in others else ax_loss
        ax.plot([e["step"] for e in points], [e[name] for e in points], next(markers), ms=6, ls="none",
                color="tab:green" if ax is ax_loss else "tab:purple", label=name.replace("_", " ", 1))
    if ax_other is not None:
        ax_other.set_ylabel(", ".join(n[len(EVAL_PREFIX):] for n in others), color="tab:purple")
    lr = [r for r in history if "lr" in r]
    ax_lr.plot([r["step"] for r in lr], [r["lr"] for r in lr], color="tab:orange", lw=1.5)
    if not lr:
        ax_lr.text(0.5, 0.5, "no learning rate in metrics.jsonl", ha="center", va="center",
                   transform=ax_lr.transAxes, color="tab:gray")
    # Where training went on from a checkpoint or in a new world: explains a jump in the
    # learning rate (a resumed run with a new --steps) or in the loss.
    by_step: Dict[int, List[dict]] = {}
    for m in log.markers:
        by_step.setdefault(m["step"], []).append(m)
    seen = set()
    for at, group in sorted(by_step.items()):
        kinds = "/".join(k for k in MARKED_EVENTS if any(m["kind"] == k for m in group))
        for ax in (ax_loss, ax_lr):
            ax.axvline(at, color=MARKED_EVENTS[_main_kind(group)], ls=":", lw=1.2,
                       label=f"{kinds} (from this step)" if ax is ax_loss and kinds not in seen else None)
        seen.add(kinds)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"Loss and learning rate - {log.run_dir.name}")
    ax_loss.grid(alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    if ax_other is not None:
        more = ax_other.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax_loss.legend(handles, labels, loc="upper right")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_unit(span_s: float):
    """(divisor, name) so that a run's wall time reads in sensible units."""
    if span_s < 120:
        return 1.0, "s"
    if span_s < 2 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def _segments(records: List[dict], cuts: Sequence[float]) -> List[List[dict]]:
    """Split time-ordered records at each cut time: no line is drawn across a restart or resize."""
    segments: List[List[dict]] = [[]]
    cut_iter = iter(sorted(cuts))
    next_cut = next(cut_iter, None)
    for rec in records:
        crossed = False
        while next_cut is not None and rec["time"] >= next_cut:
            crossed, next_cut = True, next(cut_iter, None)
        if crossed and segments[-1]:
            segments.append([])
        segments[-1].append(rec)
    return [seg for seg in segments if seg]


def _group_markers(markers: Sequence[dict], span: float) -> List[List[dict]]:
    """Markers within 1% of the time span of each other (a restart and the resume it leads
    to) share one line and one label, or their labels would be drawn over each other."""
    groups: List[List[dict]] = []
    for m in markers:
        if groups and m["time"] - groups[-1][0]["time"] <= 0.01 * span:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def _main_kind(group: Sequence[dict]) -> str:
    return min((m["kind"] for m in group), key=list(MARKED_EVENTS).index)


def plot_throughput(log: RunLog, path: Path) -> None:
    plt = _pyplot()
    timed = sorted((r for r in log.steps if "time" in r and "samples_per_s" in r), key=lambda r: r["time"])
    sized = sorted((r for r in log.steps + log.events if "time" in r and "world_size" in r), key=lambda r: r["time"])
    times = [r["time"] for r in timed + sized] + [m["time"] for m in log.markers]
    t0 = min(times) if times else 0.0
    span = (max(times) - t0) if times else 0.0
    scale, unit = _time_unit(span)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, seg in enumerate(_segments(timed, [m["time"] for m in log.markers])):
        ax.plot([(r["time"] - t0) / scale for r in seg], [r["samples_per_s"] for r in seg], ".-",
                color="tab:blue", lw=1, ms=3, label="samples/s (all workers)" if i == 0 else None)
    top = max((r["samples_per_s"] for r in timed), default=1.0) or 1.0
    groups = _group_markers(log.markers, max(span, 1e-9))
    seen = set()
    for group in groups:
        x = (group[0]["time"] - t0) / scale
        kind = _main_kind(group)
        colour = MARKED_EVENTS[kind]
        ax.axvline(x, color=colour, ls="--", lw=1.2, label=kind if kind not in seen else None)
        # x in data units, y as a fraction of the axes: the label hangs from the top edge.
        ax.text(x, 0.98, "; ".join(m["label"] for m in group) + " ", rotation=90, va="top", ha="right",
                fontsize=8, color=colour, transform=ax.get_xaxis_transform())
        seen.add(kind)
    ax.set_ylim(0, top * 1.8 if groups else top * 1.15)  # room for the labels
    ax.set_xlabel(f"wall-clock time since the first record ({unit})")
    ax.set_ylabel("samples/s (all workers)")
    ax.set_title(f"Throughput - {log.run_dir.name}")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if sized:
        # The world size as a step line on its own axis: a resize shows without reading labels.
        ax_w = ax.twinx()
        ax_w.step([(r["time"] - t0) / scale for r in sized], [r["world_size"] for r in sized], where="post",
                  color="tab:gray", lw=1.5, alpha=0.7, label="workers")
        biggest = max(r["world_size"] for r in sized)
        ax_w.set_ylim(0, biggest * 2.2)  # the lower half: clear of the throughput curve's labels
        ax_w.set_yticks(sorted({r["world_size"] for r in sized} | {0}))
        ax_w.set_ylabel("workers", color="tab:gray")
        more_handles, more_labels = ax_w.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # Below the plot: inside it would cover the marker labels hanging from the top edge.
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(handles), fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_breakdown(bd: Dict[str, float], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    total = sum(bd.values()) or 1.0
    names = [PHASE_LABELS[k] for k in bd]
    ax.barh(names[::-1], list(bd.values())[::-1], color="tab:blue")
    for y, v in enumerate(list(bd.values())[::-1]):
        ax.text(v, y, f" {v:.1f} ms ({100 * v / total:.0f}%)", va="center", fontsize=9)
    ax.set_xlim(0, max(bd.values()) * 1.3 if bd else 1)
    ax.set_xlabel("mean ms per step (rank 0)")
    ax.set_title(f"Where a step's time goes ({total:.1f} ms per step)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir, out: Optional[Path] = None) -> List[Path]:
    """Read the run, then write the plots and summary.txt; returns the paths written."""
    log = load_run(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {out} ({exc.strerror}); pass --out DIR somewhere writable") from exc
    stats = summarize(log)
    written = [out / "loss_lr.png"]
    plot_loss_lr(log, written[0])
    if any("time" in r and "samples_per_s" in r for r in log.steps):
        written.append(out / "throughput.png")
        plot_throughput(log, written[-1])
    if stats["breakdown_ms"]:
        written.append(out / "breakdown.png")
        plot_breakdown(stats["breakdown_ms"], written[-1])
    text = summary_text(stats)
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(json.dumps(stats, indent=1) + "\n")
    return written + [out / "summary.txt", out / "summary.json"]


class _OneLineParser(argparse.ArgumentParser):
    """Errors as one line with the fix (argparse would print its usage block first)."""

    def error(self, message: str):
        sys.stderr.write(f"distrib.report: error: {message}; see python -m distrib.report --help\n")
        sys.exit(2)


def main(argv=None) -> int:
    p = _OneLineParser(prog="python -m distrib.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a training run's --run-dir (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/report)")
    args = p.parse_args(argv)
    try:
        paths = write_report(args.run_dir, args.out)
    except ReportError as exc:
        print(f"distrib.report: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an --out folder that exists but cannot be written
        print(f"distrib.report: error: cannot write the report: {exc.strerror}: {exc.filename}; "
              "pass --out a folder you can write", file=sys.stderr)
        return 2
    print(paths[-2].read_text(), end="")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
