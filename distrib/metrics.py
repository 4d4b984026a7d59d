"""RUN_DIR/metrics.jsonl, the progress display and the end-of-run time breakdown (rank 0).

One JSON object per logged window of steps::

    {"step": 120, "loss": 2.31, "lr": 0.0015, "samples_per_s": 1234.5, "world_size": 2,
     "time": 1795571245.8, "restarts": 0, "t_data": 0.4, "t_compute": 80.1, "t_allreduce": 9.7,
     "t_optimizer": 2.0, "t_checkpoint": 0.0, "t_other": 1.1}

(``t_*`` in milliseconds per step, averaged over the window), and one object per event
(``{"event": "resume", "step": 300, ...}``): resume, restart, resize, preempted, eval, final,
and straggler (the launcher found a rank persistently slower than its peers: its rank, host,
slowest phase and ratio; every rank hands its phase times to distrib/heartbeat.py for that).
The file is appended to, so a resumed run continues it; each line is written whole and
flushed, and readers skip a last line cut short by a crash.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, TextIO, Union

import torch

from distrib import heartbeat
from distrib.progress import Progress
from distrib.timing import PHASES
from launch.status_channel import RESTART_COUNT_ENV  # set by the launcher on each attempt

METRICS_FILE = "metrics.jsonl"


class NestedPhaseTimer:
    """Seconds per named phase, where a phase opened inside another is not counted twice: the
    outer phase is charged only for its time outside the inner one (``distrib.Run`` times the
    whole loop body as "compute" and the optimizer's step inside it as "optimizer")."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._totals: Dict[str, float] = {}
        self._open: List[str] = []   # the phases entered and not left, innermost last
        self._since = 0.0            # when the innermost open phase last started counting

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = self._clock()
        if self._open:
            self._charge(now)
        self._open.append(name)
        self._since = now
        try:
            yield
        finally:
            self._charge(self._clock())
            self._open.pop()
            self._since = self._clock()

    def _charge(self, now: float) -> None:
        name = self._open[-1]
        self._totals[name] = self._totals.get(name, 0.0) + now - self._since

    def take(self) -> Dict[str, float]:
        """The totals since the last call (phases still open keep counting into the next)."""
        if self._open:
            now = self._clock()
            self._charge(now)
            self._since = now
        totals, self._totals = self._totals, {}
        return totals


class MetricsLogger:
    """Per-step bookkeeping for the training loop: ``metrics.jsonl``, the progress display and
    the time breakdown. Call it on every rank; only rank 0 writes and prints, the others only
    time their phases (microseconds). :class:`distrib.Run` makes and drives one for you.

    ``total_steps`` is the run's length for the progress display (see :meth:`set_total`),
    ``start_step`` where it starts (a resumed run), ``global_batch`` the samples of one
    optimizer step over all workers (for samples/s: dataset items, whatever one item is),
    ``tokens_per_sample`` adds ``tokens_per_s`` (items of a fixed number of tokens).

    The logged metrics are this rank's (rank 0's in the file) unless ``average`` is given:
    ``average(means) -> means`` then runs on every rank at every logged window with this rank's
    window means, and must return the same dict everywhere (:class:`distrib.Run` passes a
    gather over the workers for ``average_logged=True``); it is the only collective here.
    """

    def __init__(self, run_dir, ctx, *, total_steps: int, start_step: int = 0, log_every: int = 10,
                 tensorboard: bool = False, global_batch: int = 1, stream: TextIO = sys.stderr,
                 tty: Optional[bool] = None, clock=time.perf_counter, wall_clock=time.time,
                 average: Optional[Callable[[Dict[str, float]], Dict[str, float]]] = None,
                 tokens_per_sample: Optional[int] = None):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1 step, got {log_every}")
        if tokens_per_sample is not None and tokens_per_sample < 1:
            raise ValueError(f"tokens_per_sample must be >= 1 (tokens in one dataset item), got {tokens_per_sample}")
        self.ctx, self.total_steps, self.log_every = ctx, total_steps, log_every
        self.global_batch, self.tokens_per_sample, self._average = global_batch, tokens_per_sample, average
        self.enabled = ctx.rank == 0
        self.timer = NestedPhaseTimer(clock=clock)
        self._clock, self._wall = clock, wall_clock
        self._restarts = int(os.environ.get(RESTART_COUNT_ENV, "0") or 0)
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

    def adopt_world(self, ctx, *, step: int, global_batch: int) -> None:
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

    def set_total(self, total_steps: int) -> None:
        """A new run length for the progress display and ETA (an epoch-based run whose world
        size changed now needs another number of steps)."""
        self.total_steps = total_steps
        if self._progress is not None:
            self._progress.set_total(total_steps)

    def phase(self, name: str):
        """``with log.phase("compute"): ...``: time one part of the step. Phases may nest; the
        outer one is charged only for the time outside the inner one."""
        return self.timer.phase(name)

    def step(self, step: int, *, loss=None, lr: Optional[float] = None, **metrics) -> None:
        """End of optimizer step ``step`` (1-based count of steps done). ``loss`` and the other
        ``metrics`` (numbers or one-element tensors) are averaged over the steps of the logged
        window. A tensor is summed on its device and read once, when the window is written:
        logging it every step does not make the host wait for a GPU every step (do not change
        it in place before then; :meth:`distrib.Run.log` hands over a copy)."""
        now = self._clock()
        phases = self.timer.take()
        elapsed = now - self._last_step_end
        self._last_step_end = now
        values = {name: metric_value(name, value) for name, value in metrics.items()}
        if loss is not None:
            values["loss"] = metric_value("loss", loss)
        self._window.add(elapsed, values, phases)
        self._run.add(elapsed, {}, phases)  # the summary table needs only the times
        heartbeat.step_done(step, phases, elapsed)  # the launcher compares the ranks' phases: stragglers
        self._write_notices(step)
        if step % self.log_every == 0 or step == self.total_steps:
            self._flush_window(step, lr)

    def _write_notices(self, step: int) -> None:
        """The launcher's straggler reports, as events (they reach rank 0 through its heartbeat)."""
        for notice in heartbeat.take_notices():
            if self.enabled and notice.get("event") == "straggler":
                fields = {k: v for k, v in notice.items() if k not in ("kind", "event")}
                self._write({"event": "straggler", "step": step, "time": self._wall(), **fields})

    def _flush_window(self, step: int, lr: Optional[float]) -> None:
        w, self._window = self._window, _Window()
        if not self.enabled and self._average is None:
            return  # nothing to write and no collective: leave the values unread
        means = w.means()  # the one read of the window's tensors
        if self._average is not None:
            means = self._average(means)  # on every rank: a collective
        if not self.enabled or not w.steps:
            return
        samples_per_s = self.global_batch * w.steps / w.seconds if w.seconds > 0 else 0.0
        record = {"step": step, **means, "samples_per_s": samples_per_s,
                  "world_size": self.ctx.size, "time": self._wall(), "restarts": self._restarts}
        if self.tokens_per_sample is not None:
            record["tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if lr is not None:
            record["lr"] = lr
        record.update(w.per_step_ms())
        self._write(record)
        steps_left = max(0, self.total_steps - step)
        eta = steps_left * w.seconds / w.steps if w.seconds > 0 else None
        self._progress.update(step, record.get("loss"), samples_per_s, eta)
        if self._tb is not None:
            for key in (*means, "lr", "samples_per_s", "tokens_per_s"):
                if key in record:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
            for key, value in w.per_step_ms().items():
                self._tb.add_scalar(f"time_ms/{key[2:]}", value, step)

    def event(self, name: str, *, step: int, **info) -> None:
        """A line ``{"event": name, "step": step, ...}`` (rank 0); the next step's time does not
        include what happened between (a restart, an evaluation)."""
        self.timer.take()  # time spent on the event (an evaluation) belongs to no step
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
        heartbeat.flush()  # the last phase windows, before the process ends
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
        self.steps, self.seconds = 0, 0.0
        self.sums: Dict[str, Union[float, torch.Tensor]] = {}  # metric -> sum over the steps that logged it
        self.counts: Dict[str, int] = {}
        self.phases: Dict[str, float] = {}

    def add(self, seconds: float, values: Dict[str, float], phases: Dict[str, float]) -> None:
        self.steps += 1
        self.seconds += seconds
        for name, value in values.items():
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
            self.counts[name] = self.counts.get(name, 0) + 1
        for name, value in phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + value

    def means(self) -> Dict[str, float]:
        """The mean per metric as Python floats; the tensor sums are read together (one wait)."""
        on_device = [name for name, total in self.sums.items() if isinstance(total, torch.Tensor)]
        read = dict(zip(on_device, _read_together([self.sums[name] for name in on_device])))
        return {name: read.get(name, total) / self.counts[name] for name, total in self.sums.items()}

    def per_step_ms(self) -> Dict[str, float]:
        if not self.steps:
            return {}
        names = list(PHASES) + sorted(set(self.phases) - set(PHASES))
        out = {f"t_{n}": 1000 * self.phases.get(n, 0.0) / self.steps for n in names}
        out["t_other"] = max(0.0, 1000 * self.seconds / self.steps - sum(out.values()))
        return out


def metric_value(name: str, value, *, copy: bool = False) -> Union[float, torch.Tensor]:
    """A logged value as a window sums it: a number as a float; a one-element tensor as a
    float64 scalar tensor on its device, detached and not read (``copy``: never the caller's
    own tensor, so a later in-place change does not reach the log)."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    if value.numel() != 1:
        raise ValueError(f"logged metric {name!r} is a tensor of shape {tuple(value.shape)}; log a number or "
                         f"a one-element tensor (for example {name}=value.mean())")
    return value.detach().to(torch.float64, copy=copy).reshape(())


def _read_together(tensors: List[torch.Tensor]) -> List[float]:
    """Scalar tensors -> floats in one host read (stacked on the first one's device)."""
    if not tensors:
        return []
    return torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()


def breakdown_table(per_step_ms: Dict[str, float], steps: int) -> str:
    total = sum(per_step_ms.values()) or 1.0
    lines = [f"time per step over {steps} steps:", f"  {'phase':<12}{'ms/step':>10}{'share':>8}"]
    for key, value in per_step_ms.items():
        lines.append(f"  {key[2:]:<12}{value:>10.2f}{100 * value / total:>7.1f}%")
    lines.append(f"  {'total':<12}{total:>10.2f}{100.0:>7.1f}%")
    return "\n".join(lines)


def mean_over_ranks(gathered: List[Dict[str, float]]) -> Dict[str, float]:
    """Every rank's window means (allgathered) -> their mean per metric, over the ranks that
    logged it: the same on every rank (each averages the same gathered list in the same order)."""
    names = sorted(set().union(*gathered))
    return {n: sum(g[n] for g in gathered if n in g) / sum(1 for g in gathered if n in g) for n in names}


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
