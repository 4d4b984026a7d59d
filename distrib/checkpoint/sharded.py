"""Checkpoints of sharded optimizer state (``distrib.wrap(..., shard=...)``): one file per rank,
re-cut for any world size on load, consolidated only when asked.

Saving: every rank writes its own pieces (``shard-<rank>.pt``) into a staging folder of the step,
fsyncs it and leaves a note with its size and sha256 (or its error); rank 0's writer waits for
every note, moves the shard files into its temporary checkpoint folder and lists them in the
marker with their checksums, so the commit stays one atomic rename and validation covers every
shard. Rank 0's ``state.pt`` keeps the rest of the optimizer entry: hyper-parameters, shapes
and the global offsets of every rank's pieces (``owners``).

Loading: a sharded run reads only the shard files whose offsets overlap the element ranges it
owns now (memory-mapped), whatever the saved world size; an unsharded run, or
:func:`consolidate`, assembles the plain torch optimizer state from all of them.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from distrib.checkpoint import state as st
from distrib.checkpoint import store
from distrib.checkpoint.background import BackgroundWrite
from distrib.checkpoint.store import CheckpointError
from distrib.sharding.optimizer import SHARDED_FORMAT, per_element

NOTE_TIMEOUT_S = 600.0  # how long rank 0's writer waits for the other ranks' shards


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.pt"


def staging_dir(root: Path, step: int) -> Path:
    """Where the ranks write their shards of ``step`` before rank 0 commits them (a ``.tmp-``
    name: a crash leaves nothing loadable, and the next save removes it)."""
    return Path(root) / f"{store.TMP_PREFIX}shards-{store.step_dirname(step)}"


def is_sharded(entry: Any) -> bool:
    return isinstance(entry, Mapping) and entry.get("format") == SHARDED_FORMAT


def sharded_names(state: Mapping[str, Any]) -> List[str]:
    """The entries of a training state that are sharded (a wrapped optimizer with ``shard=``)."""
    return [name for name, obj in state.items() if callable(getattr(obj, "owned_ranges", None))]


def strip(collected: Dict[str, Any]) -> Dict[str, Any]:
    """Rank 0's ``state.pt`` content: sharded entries without their pieces (each rank writes its own)."""
    return {name: ({k: v for k, v in entry.items() if k != "pieces"} if is_sharded(entry) else entry)
            for name, entry in collected.items()}


# -- saving, on every rank ------------------------------------------------------------------------
class ShardWriter:
    """Writes this rank's pieces, in a thread when saving asynchronously (one write at a time)."""

    def __init__(self):
        self._writer = BackgroundWrite("checkpoint-shard")
        self._snapshot: Any = None  # the last CPU copy, reused as the next one's memory

    def start(self, state: Mapping[str, Any], folder: Path, rank: int, async_save: bool) -> None:
        """Snapshot this rank's pieces of every sharded entry and write them to ``folder``.
        Call :meth:`join` first."""
        pieces = {name: state[name].state_dict()["pieces"] for name in sharded_names(state)}
        if async_save:
            pieces = self._snapshot = st.cpu_snapshot(pieces, reuse=self._snapshot)
        self._writer.run(self._write, pieces, Path(folder), rank, asynchronous=async_save)

    @staticmethod
    def _write(pieces: Dict[str, Any], folder: Path, rank: int) -> Optional[str]:
        name = shard_file(rank)
        failure = None
        try:
            note = store._save_file(folder / name, pieces)
        except OSError as exc:
            note = {"error": store.io_error_message(folder, exc)}
        except BaseException as exc:  # noqa: BLE001 - a background failure must never be lost
            note = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" in note:
            failure = f"rank {rank} could not write its optimizer shard: {note['error']}"
        try:
            tmp = folder / f"{name}.note.tmp"
            tmp.write_text(json.dumps(note))
            os.replace(tmp, folder / f"{name}.note")
        except OSError as exc:
            failure = failure or f"rank {rank}: {store.io_error_message(folder, exc)}"
        return failure

    def join(self) -> Optional[str]:
        """Wait for the write in flight; its failure (one line), or None."""
        return self._writer.join()


def adopt(staging: Path, world: int, timeout_s: float = NOTE_TIMEOUT_S):
    """For :func:`distrib.checkpoint.store.write_checkpoint` on rank 0: a callable that waits for
    every rank's note, moves the shards into the temporary checkpoint folder and returns their
    checksums for the marker (raises CheckpointError naming the rank that failed)."""
    def move_into(tmp: Path) -> Dict[str, Dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        sums = {}
        for rank in range(world):
            note_path = staging / f"{shard_file(rank)}.note"
            while not note_path.exists():
                if time.monotonic() > deadline:
                    raise CheckpointError(f"rank {rank} did not write its optimizer shard to {staging} "
                                          f"within {timeout_s:.0f} s")
                time.sleep(0.005)
            note = json.loads(note_path.read_text())
            if "error" in note:
                raise CheckpointError(f"rank {rank} could not write its optimizer shard: {note['error']}")
            os.replace(staging / shard_file(rank), tmp / shard_file(rank))
            sums[shard_file(rank)] = note
        shutil.rmtree(staging, ignore_errors=True)
        return sums
    return move_into


# -- loading --------------------------------------------------------------------------------------
def _load_shard(folder: Path, rank: int) -> Dict[str, Any]:
    # Memory-mapped: only the pages of the pieces this rank copies are read.
    return torch.load(Path(folder) / shard_file(rank), map_location="cpu", mmap=True, weights_only=True)


def _overlapping_ranks(entry: Mapping[str, Any], wanted: List[Tuple[int, int, int]]) -> List[int]:
    want: Dict[int, List[Tuple[int, int]]] = {}
    for index, start, end in wanted:
        want.setdefault(index, []).append((start, end))
    ranks = []
    for rank, ranges in enumerate(entry["owners"]):
        if any(s < e2 and s2 < e for index, s, e in ranges for s2, e2 in want.get(index, ())):
            ranks.append(rank)
    return ranks


def recut(entry: Mapping[str, Any], folder: Path, name: str, wanted: List[Tuple[int, int, int]]) -> Dict[str, Any]:
    """The sharded entry ``name`` cut for a rank that owns the element ranges ``wanted``
    ``(index, start, end)``: reads only the shard files that overlap them."""
    saved: Dict[int, List[Dict[str, Any]]] = {}
    for rank in _overlapping_ranks(entry, wanted):
        for piece in _load_shard(folder, rank)[name]:
            saved.setdefault(piece["index"], []).append(piece)
    pieces = []
    for index, start, end in wanted:
        state = _assemble(saved.get(index, []), start, end, folder, index)
        if state:
            pieces.append({"index": index, "start": start, "end": end, "state": state})
    return {**entry, "pieces": pieces}


def _assemble(pieces: List[Dict[str, Any]], start: int, end: int, folder: Path, index: int) -> Dict[str, Any]:
    """Elements ``[start, end)`` of one parameter's state, from the saved pieces that overlap."""
    out: Dict[str, Any] = {}
    covered = 0
    for piece in pieces:
        lo, hi = max(start, piece["start"]), min(end, piece["end"])
        if lo >= hi:
            continue
        covered += hi - lo
        for key, value in piece["state"].items():
            if per_element(key, value):
                if key not in out:
                    out[key] = torch.empty(end - start, dtype=value.dtype)
                out[key][lo - start:hi - start].copy_(value[lo - piece["start"]:hi - piece["start"]])
            else:
                out[key] = value.clone() if torch.is_tensor(value) else value
    if out and covered != end - start:
        raise CheckpointError(f"checkpoint {folder}: the optimizer shards cover {covered} of elements "
                              f"[{start}, {end}) of parameter {index}; the checkpoint is incomplete")
    return out


def consolidate_entry(entry: Mapping[str, Any], folder: Path, name: str) -> Dict[str, Any]:
    """The plain torch optimizer state dict (plus ``grad_scaler``) of a sharded entry: reads every
    shard file, one at a time. The whole state ends up in this process's memory."""
    numels = [int(torch.Size(s).numel()) for s in entry["shapes"]]
    owned = {index for ranges in entry["owners"] for index, _, _ in ranges}  # frozen ones are not
    full = recut(entry, folder, name, [(i, 0, n) for i, n in enumerate(numels) if i in owned])
    state = {p["index"]: {k: v.reshape(entry["shapes"][p["index"]]) if per_element(k, v) else v
                          for k, v in p["state"].items()} for p in full["pieces"]}
    out = {"state": state, "param_groups": entry["param_groups"]}
    if entry.get("grad_scaler"):
        out["grad_scaler"] = entry["grad_scaler"]
    return out


def resolve(state: Mapping[str, Any], saved: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """``saved`` (``state.pt``'s state) ready for ``load_state_dict`` on this rank: each sharded
    entry re-cut for the live object's element ranges when that object is sharded (any world
    size), consolidated to plain torch form when it is not. Call on every rank."""
    live_sharded = set(sharded_names(state))
    out = dict(saved)
    for name, entry in saved.items():
        if not is_sharded(entry) or name not in state:
            continue
        if name in live_sharded:
            out[name] = recut(entry, folder, name, state[name].owned_ranges())
        else:
            out[name] = consolidate_entry(entry, folder, name)
    return out


def consolidate(checkpoint_dir) -> Dict[str, Any]:
    """The full state of a checkpoint folder with every sharded optimizer entry consolidated to
    plain torch form: ``{"step", "state": {name: state dict}}``, as an unsharded checkpoint's
    ``state.pt`` holds. Validates the folder (marker, sizes, sha256) first. One process, no
    Horovod; the whole optimizer state is materialised in memory (that is what it is for)."""
    folder = Path(checkpoint_dir)
    store.validate(folder)
    payload = store.load_file(folder, store.STATE_FILE)
    payload["state"] = {name: consolidate_entry(entry, folder, name) if is_sharded(entry) else entry
                        for name, entry in payload["state"].items()}
    return payload
