"""RUN_DIR/metrics.jsonl, the progress display and the end-of-run time breakdown (rank 0).

One JSON object per logged window of steps::

    {"step": 120, "loss": 2.31, "lr": 0.0015, "samples_per_s": 1234.5, "world_size": 2,
     "time": 1795571245.8, "restarts": 0, "t_data": 0.4, "t_compute": 80.1, "t_allreduce": 9.7,
     "t_optimizer": 2.0, "t_checkpoint": 0.0, "t_other": 1.1}

(``t_*`` in milliseconds per step, averaged over the window), and one object per event
(``{"event": "resume", "step": 300, ...}``): resume, restart, resize, preempted, eval, final.
The file is appended to, so a resumed run continues it; each line is written whole and
flushed, and readers skip a last line cut short by a crash.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional, TextIO

from distrib.progress import Progress
from distrib.timing import PHASES, PhaseTimer

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Per-step bookkeeping for the training loop. Call it on every rank; only rank 0 writes
    and prints, the others only time their phases (microseconds)."""

    def __init__(self, run_dir, ctx, *, total_steps: int, start_step: int = 0, log_every: int = 10,
                 tensorboard: bool = False, global_batch: int = 1, stream: TextIO = sys.stderr,
                 tty: Optional[bool] = None, clock=time.perf_counter, wall_clock=time.time):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1 step, got {log_every}")
        self.ctx, self.total_steps, self.log_every = ctx, total_steps, log_every
        self.global_batch = global_batch
        self.enabled = ctx.rank == 0
        self.timer = PhaseTimer(clock=clock)
        self._clock, self._wall = clock, wall_clock
        self._restarts = int(os.environ.get("DISTRIB_RESTART_COUNT", "0") or 0)
        self._window = _Window()
        self._run = _Window()  # the whole run, for the summary table
        self._last_step_end = clock()
        self._file = self._progress = self._tb = None
        self._run_dir, self._tty, self._tensorboard, self._stream = run_dir, tty, tensorboard, stream
        if self.enabled:
            self._open(start_step)

    def _open(self, start_step: int) -> None:
        path = Path(self._run_dir) / METRICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        self._progress = Progress(self.total_steps, start_step, stream=self._stream, tty=self._tty)
        self._tb = _tensorboard_writer(self._run_dir, self._stream) if self._tensorboard else None

    def set_context(self, ctx, *, step: int, global_batch: int) -> None:
        """Adopt a new world (Horovod Elastic re-formed it): the worker that is now rank 0
        takes over the file and the display; world_size and samples/s follow."""
        was_main, self.ctx, self.global_batch = self.enabled, ctx, global_batch
        self._window = _Window()  # its steps ran in the old world, partly rolled back
        self.enabled = ctx.rank == 0
        if self.enabled and not was_main:
            self._open(step)
        elif was_main and not self.enabled:
            self._progress.close()
            self._file.close()
            self._file = None

    def phase(self, name: str):
        """``with log.phase("compute"): ...``: time one part of the step."""
        return self.timer.phase(name)

    def step(self, step: int, *, loss: float, lr: float, **extra) -> None:
        """End of optimizer step ``step`` (1-based count of steps done)."""
        now = self._clock()
        phases = self.timer.take()
        elapsed = now - self._last_step_end
        self._last_step_end = now
        for window in (self._window, self._run):
            window.add(elapsed, loss, phases)
        if step % self.log_every == 0 or step == self.total_steps:
            self._flush_window(step, lr, extra)

    def _flush_window(self, step: int, lr: float, extra: Dict) -> None:
        w, self._window = self._window, _Window()
        if not self.enabled or not w.steps:
            return
        samples_per_s = self.global_batch * w.steps / w.seconds if w.seconds > 0 else 0.0
        record = {"step": step, "loss": w.loss / w.steps, "lr": lr, "samples_per_s": samples_per_s,
                  "world_size": self.ctx.size, "time": self._wall(), "restarts": self._restarts}
        record.update(w.per_step_ms())
        record.update(extra)
        self._write(record)
        steps_left = self.total_steps - step
        eta = steps_left * w.seconds / w.steps if w.seconds > 0 else None
        self._progress.update(step, record["loss"], samples_per_s, eta)
        if self._tb is not None:
            for key in ("loss", "lr", "samples_per_s"):
                self._tb.add_scalar(f"train/{key}", record[key], step)
            for key, value in w.per_step_ms().items():
                self._tb.add_scalar(f"time_ms/{key[2:]}", value, step)

    def event(self, name: str, *, step: int, **info) -> None:
        """A line ``{"event": name, "step": step, ...}`` (rank 0); the next step's time does not
        include what happened between (a restart, an evaluation)."""
        if self.enabled:
            self._write({"event": name, "step": step, "world_size": self.ctx.size, "time": self._wall(),
                         "restarts": self._restarts, **info})
        self._last_step_end = self._clock()

    def _write(self, record: Dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def summary(self) -> str:
        """The time breakdown of the run so far as a table (mean ms per step and share)."""
        return breakdown_table(self._run.per_step_ms(), self._run.steps)

    def close(self) -> None:
        """Flush, and print the breakdown table (rank 0). Must be called on all ranks."""
        if not self.enabled or self._file is None:
            return
        self._progress.close()
        if self._run.steps:
            print(self.summary(), file=self._stream, flush=True)
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        self._file = None


class _Window:
    """Sums over a run of steps."""

    def __init__(self):
        self.steps, self.seconds, self.loss = 0, 0.0, 0.0
        self.phases: Dict[str, float] = {}

    def add(self, seconds: float, loss: float, phases: Dict[str, float]) -> None:
        self.steps += 1
        self.seconds += seconds
        self.loss += loss
        for name, value in phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + value

    def per_step_ms(self) -> Dict[str, float]:
        if not self.steps:
            return {}
        names = list(PHASES) + sorted(set(self.phases) - set(PHASES))
        out = {f"t_{n}": 1000 * self.phases.get(n, 0.0) / self.steps for n in names}
        out["t_other"] = max(0.0, 1000 * self.seconds / self.steps - sum(out.values()))
        return out


def breakdown_table(per_step_ms: Dict[str, float], steps: int) -> str:
    total = sum(per_step_ms.values()) or 1.0
    lines = [f"time per step over {steps} steps:", f"  {'phase':<12}{'ms/step':>10}{'share':>8}"]
    for key, value in per_step_ms.items():
        lines.append(f"  {key[2:]:<12}{value:>10.2f}{100 * value / total:>7.1f}%")
    lines.append(f"  {'total':<12}{total:>10.2f}{100.0:>7.1f}%")
    return "\n".join(lines)


def read_metrics(path) -> list:
    """The records of a metrics.jsonl, skipping a last line cut short by a crash."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a partial line from a killed run
    return records


def _tensorboard_writer(run_dir, stream):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("distrib: --tensorboard asked for, but tensorboard is not installed "
              "(.venv/bin/pip install tensorboard); continuing without it", file=stream, flush=True)
        return None
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
