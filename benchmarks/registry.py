"""The sections of ``python -m benchmarks``, in the order they run.

A section is a module with ``run(opts) -> {"title": str, "rows": [...], "markdown": str}``;
``opts`` has ``quick``, ``rounds``, ``np``, ``controller`` and ``work`` (a scratch folder).
Later issues add their own module here: the checkpoint and recovery figures live in
``benchmarks/bench_checkpoint.py`` (included automatically when the file exists; any other
``bench_<name>.py`` listed in OPTIONAL is too).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, List


@dataclass(frozen=True)
class Section:
    name: str
    module: str

    def load(self) -> Callable:
        return importlib.import_module(self.module).run


CORE = [
    Section("allreduce", "benchmarks.bench_allreduce"),
    Section("step", "benchmarks.bench_step"),        # step time; also the weak-scaling table
    Section("coldstart", "benchmarks.bench_coldstart"),
]
OPTIONAL = [
    Section("checkpoint", "benchmarks.bench_checkpoint"),  # written by the checkpoint engineer
    Section("recovery", "benchmarks.bench_recovery"),
]


def available() -> List[Section]:
    """The core sections, then the optional ones whose module exists."""
    return CORE + [s for s in OPTIONAL if importlib.util.find_spec(s.module) is not None]


def select(only: str | None) -> List[Section]:
    """The sections named in ``only`` (comma-separated), or all available ones."""
    sections = available()
    if not only:
        return sections
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name: s for s in sections}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: no such section; choose from {', '.join(known)}")
    return [known[n] for n in names]
