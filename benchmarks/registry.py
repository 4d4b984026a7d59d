"""The sections of ``python -m benchmarks``, in the order they run.

A section is a module with ``run(opts) -> {"title": str, "rows": [...], "markdown": str}``;
``opts`` has ``quick``, ``rounds``, ``np`` and ``work`` (a scratch folder). A section another
issue adds goes into OPTIONAL: it runs when its module exists.
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
    Section("step", "benchmarks.bench_step"),              # step time, levers, one-host weak scaling
    Section("network", "benchmarks.bench_network"),        # 2 hosts over 1 and 10 Gbit/s (needs root)
    Section("coldstart", "benchmarks.bench_coldstart"),
    Section("checkpoint", "benchmarks.bench_checkpoint"),  # cost during training, blocked time, resume
    Section("recovery", "benchmarks.bench_recovery"),
]
OPTIONAL: List[Section] = [Section("memory", "benchmarks.bench_memory"),   # ZeRO memory and step time
                           Section("diagnosis", "benchmarks.bench_diagnosis")]  # the heartbeat's cost


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
