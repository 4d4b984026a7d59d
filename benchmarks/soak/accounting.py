"""What a soak's step logs say: the steps the final state kept, the samples they trained on,
and how long each kill cost. Pure functions of the records the worker wrote (worker.py).

Which records the final state kept: a run that rolls back (elastic) or restarts from a
checkpoint trains the same step numbers again. Each process's lines form *segments* of
consecutive steps. A record of step ``s`` was undone when a segment that began after it starts
at a step before ``s``, or at ``s`` itself once the record's step had ended (the world went back
and trained ``s`` again). The members of one world begin a step before any of them ends it (they
wait for each other in its allreduce), so the segments of the record's own world, which begin at
``s`` a few milliseconds apart, do not undo it. Every other record is part of the final state's
history.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from distrib.data import epoch_order


@dataclass(frozen=True)
class Record:
    """One step of one rank: samples (B line) and, when it got there, its end (E line)."""
    proc: str          # host.pid: the process that wrote it
    segment: int       # which run of consecutive steps of that process
    step: int          # steps done before this one (distrib.Run's numbering)
    epoch: int
    rank: int
    size: int
    began: float
    ended: Optional[float]
    samples: Tuple[int, ...]


def read_records(out: Path) -> List[Record]:
    """Every record in OUT/steps.*.log; a torn last line (a process killed mid-write) is skipped."""
    records = []
    for path in sorted(out.glob("steps.*.log")):
        proc = path.name[len("steps."):-len(".log")]
        began: Dict[int, dict] = {}
        order: List[int] = []
        segment, previous = 0, None
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            try:
                if parts[0] == "B" and len(parts) == 7:
                    step = int(parts[2])
                    if previous is not None and step != previous + 1:
                        segment += 1
                    previous = step
                    samples = tuple(int(i) for i in parts[6].split(",")) if parts[6] else ()
                    began[len(order)] = dict(proc=proc, segment=segment, step=step, epoch=int(parts[3]),
                                             rank=int(parts[4]), size=int(parts[5]), began=float(parts[1]),
                                             ended=None, samples=samples)
                    order.append(step)
                elif parts[0] == "E" and len(parts) == 5 and order and int(parts[2]) == order[-1]:
                    began[len(order) - 1]["ended"] = float(parts[1])
            except ValueError:
                continue
        records += [Record(**r) for r in began.values()]
    return records


def read_phases(out: Path) -> Dict[str, Dict[str, float]]:
    """Each process's start-up times (worker.py's P lines): host.pid -> phase -> time."""
    phases: Dict[str, Dict[str, float]] = {}
    for path in sorted(out.glob("steps.*.log")):
        proc = path.name[len("steps."):-len(".log")]
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if parts[0] == "P" and len(parts) == 3:
                try:
                    phases.setdefault(proc, {})[parts[2]] = float(parts[1])
                except ValueError:
                    continue
    return phases


def kept(records: Sequence[Record]) -> List[Record]:
    """The records of the final state's history (module docstring), in time order."""
    starts = {}
    for r in records:
        key = (r.proc, r.segment)
        if key not in starts or r.began < starts[key][0]:
            starts[key] = (r.began, r.step)
    restarts = sorted(starts.values())  # (time, first step) of every segment
    return sorted((r for r in records if not any(_redoes(t, first, r) for t, first in restarts)),
                  key=lambda r: r.began)


def _redoes(t: float, first: int, r: Record) -> bool:
    """Does a segment that began at ``t`` with step ``first`` train ``r``'s step again?"""
    if t <= r.began or first > r.step:
        return False
    if first < r.step:
        return True
    # The same step: a redo only once r's step had ended (a rank killed mid-step never ends it).
    return r.ended is None or t > r.ended


def steps_done_by(history: Sequence[Record], deadline: float) -> int:
    """Steps of the final history completed by ``deadline`` (numbered from 0: the count is max + 1)."""
    done = [r.step for r in history if r.ended is not None and r.ended <= deadline]
    return max(done) + 1 if done else 0


def first_step_time(records: Sequence[Record]) -> Optional[float]:
    ends = [r.ended for r in records if r.ended is not None]
    return min(ends) if ends else None


def kill_to_next_step(history: Sequence[Record], t_kill: float) -> Optional[float]:
    """Seconds from a kill to the end of the first kept step begun after it (a step begun after
    the kill that broke and was redone is not progress)."""
    ends = [r.ended for r in history if r.began > t_kill and r.ended is not None]
    return min(ends) - t_kill if ends else None


def sample_accounting(history: Sequence[Record], dataset_len: int, seed: int) -> dict:
    """Per epoch: samples trained twice, and those missing. An epoch that ended may miss only the
    tail of its order that could not fill a global batch (ShardedLoader's drop_last; shorter than the
    largest global batch); the epoch still running must have trained exactly a prefix of its order."""
    by_epoch: Dict[int, List[int]] = {}
    global_batch = 0
    for r in history:
        by_epoch.setdefault(r.epoch, []).extend(r.samples)
        global_batch = max(global_batch, r.size * len(r.samples))
    epochs = []
    last = max(by_epoch) if by_epoch else -1
    for epoch, trained in sorted(by_epoch.items()):
        order = epoch_order(dataset_len, seed, epoch)
        seen = set(trained)
        twice = len(trained) - len(seen)
        expected = set(order if epoch < last else order[:len(seen)])
        missing = sorted(expected - seen)
        extra = sorted(seen - expected)  # trained, though a prefix of the order would not hold them
        tail_ok = epoch == last or (set(missing) == set(order[len(order) - len(missing):])
                                    and len(missing) < global_batch)
        epochs.append({"epoch": epoch, "trained": len(trained), "twice": twice, "missing": len(missing),
                       "out_of_order": len(extra), "missing_is_tail": tail_ok, "ended": epoch < last})
    ok = all(e["twice"] == 0 and e["out_of_order"] == 0 and (e["missing"] == 0 or e["missing_is_tail"])
             and (e["ended"] or e["missing"] == 0) for e in epochs)
    return {"epochs": epochs, "samples": sum(e["trained"] for e in epochs),
            "twice": sum(e["twice"] for e in epochs), "ok": ok}
