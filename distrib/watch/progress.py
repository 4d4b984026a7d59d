"""Progress for a person watching rank 0: a tqdm bar on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(step: int, total: int, loss: Optional[float], samples_per_s: float, eta_s: Optional[float]) -> str:
    eta = format_duration(eta_s) if eta_s is not None else "?"
    shown = f" | loss {loss:.3f}" if loss is not None else ""
    return f"step {step}/{total}{shown} | {samples_per_s:,.0f} samples/s | eta {eta}"


class Progress:
    """``update`` after each logged window. A TTY gets a live bar (tqdm); a log file (CI, Slurm)
    gets one plain line per window, so logs stay greppable."""

    def __init__(self, total: int, start: int = 0, stream: TextIO = sys.stderr, tty: Optional[bool] = None):
        self.total, self.stream = total, stream
        self.tty = stream.isatty() if tty is None else tty
        self._bar = None
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start, file=stream, unit="step", dynamic_ncols=True)

    def set_total(self, total: int) -> None:
        """The run's length changed (epoch-based training after an elastic resize)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total

    def update(self, step: int, loss: Optional[float], samples_per_s: float, eta_s: Optional[float]) -> None:
        if self._bar is not None:
            self._bar.n = step
            shown = f"loss {loss:.3f} | " if loss is not None else ""
            self._bar.set_postfix_str(f"{shown}{samples_per_s:,.0f} samples/s", refresh=True)
        else:
            print(progress_line(step, self.total, loss, samples_per_s, eta_s), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
