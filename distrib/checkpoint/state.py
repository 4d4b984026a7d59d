"""What goes into a checkpoint and back: state dicts, CPU snapshots, compatibility, RNG per rank.

Pure functions over objects in one process (no Horovod, no files), tested directly.
"""
from __future__ import annotations

import copy
import random
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch



def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def check_state_types(state: Mapping[str, Any]) -> None:
    """Every entry must have ``state_dict()/load_state_dict()`` or be a dict of plain values."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict name -> object, got {type(state).__name__}")
    for name, obj in state.items():
        if not (_is_stateful(obj) or isinstance(obj, dict)):
            raise TypeError(
                f"state[{name!r}] is a {type(obj).__name__} without state_dict()/load_state_dict(); "
                "put plain values in a dict, e.g. state['extra'] = {'best_loss': x}")


def collect(state: Mapping[str, Any]) -> Dict[str, Any]:
    """``name -> state_dict()`` (or a shallow copy of a plain dict). Shares tensors with the
    live objects: see :func:`cpu_snapshot` before handing it to another thread."""
    return {name: obj.state_dict() if _is_stateful(obj) else dict(obj) for name, obj in state.items()}


def cpu_snapshot(obj: Any, reuse: Any = None) -> Any:
    """A deep copy with every tensor copied to CPU memory.

    The copy owns its storage: the training loop may keep mutating parameters and optimizer
    moments in place while a background thread writes the snapshot. ``reuse``, a previous
    snapshot of the same structure that nobody reads any more, lends its tensors as
    buffers: copying into memory that is already mapped is several times faster than
    allocating fresh pages for every save.
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if (isinstance(reuse, torch.Tensor) and reuse.shape == src.shape and reuse.dtype == src.dtype
                and reuse.device.type == "cpu" and reuse.is_contiguous() and src.is_contiguous()):
            return reuse.copy_(src)
        return src.to("cpu", copy=True)
    if type(obj) in (dict, OrderedDict):
        old = reuse if isinstance(reuse, Mapping) else {}
        return type(obj)((k, cpu_snapshot(v, old.get(k))) for k, v in obj.items())
    if type(obj) in (list, tuple):
        old = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(cpu_snapshot(v, r) for v, r in zip(obj, old))
    return copy.deepcopy(obj)


def _is_tensor_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def config_mismatch(saved: Optional[Mapping[str, Any]], current: Optional[Mapping[str, Any]]) -> Optional[str]:
    """``"n_layer=4, ... / n_layer=2, ..."``-style description of differing keys, or None.

    Returns the pair (saved part, current part) joined for the caller's message; None when
    either side gave no config or they agree.
    """
    if saved is None or current is None:
        return None
    keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    if not keys:
        return None
    mine = ", ".join(f"{k}={_short(saved.get(k, '<absent>'))}" for k in keys)
    theirs = ", ".join(f"{k}={_short(current.get(k, '<absent>'))}" for k in keys)
    return f"model config {mine}, this run has {theirs}"


def incompatibility(state: Mapping[str, Any], saved: Mapping[str, Any]) -> Optional[str]:
    """Why ``saved`` (name -> state dict) cannot be loaded into ``state``, or None.

    Checked before anything is loaded: every name of this run must be in the checkpoint, and
    every tensor dict (a module's state dict) must have the same keys and shapes.
    """
    missing = [name for name in state if name not in saved]
    if missing:
        return f"it has no {', '.join(repr(m) for m in missing)} state"
    for name, obj in state.items():
        if not _is_stateful(obj):
            continue
        ours, theirs = obj.state_dict(), saved[name]
        if not (_is_tensor_dict(ours) and _is_tensor_dict(theirs)):
            continue
        only_ckpt = sorted(set(theirs) - set(ours))
        only_run = sorted(set(ours) - set(theirs))
        if only_ckpt or only_run:
            what = (f"{name} has {_short(only_ckpt[0])} only in the checkpoint" if only_ckpt
                    else f"{name} has {_short(only_run[0])} only in this run")
            return f"{what} ({len(only_ckpt)} keys only in the checkpoint, {len(only_run)} only in this run)"
        for key, tensor in ours.items():
            if tuple(theirs[key].shape) != tuple(tensor.shape):
                return (f"{name}.{key} has shape {tuple(theirs[key].shape)} in the checkpoint, "
                        f"{tuple(tensor.shape)} in this run")
    return None


def apply(state: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Load ``saved`` into the live objects of ``state`` (plain dicts are updated in place)."""
    for name, obj in state.items():
        if _is_stateful(obj):
            obj.load_state_dict(saved[name])
        else:
            obj.clear()
            obj.update(saved[name])


def derived_seed(seed: int, rank: int, step: int) -> int:
    """A seed for a rank that did not exist in the saved run: a function of (seed, rank, step)
    only, so every resume of the same checkpoint with the same world size draws the same."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def rng_for_rank(saved: List[Dict[str, Any]], rank: int, seed: int, step: int) -> Optional[Dict[str, Any]]:
    """Rank ``rank``'s saved RNG states, or None when the saved run had fewer ranks."""
    return saved[rank] if rank < len(saved) else None


def seed_rank(seed: int, rank: int, step: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from :func:`derived_seed`."""
    s = derived_seed(seed, rank, step)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def local_states(state: Mapping[str, Any]) -> Dict[str, Any]:
    """This rank's own state of each entry that has one (``local_state_dict()`` not None: a
    wrapped optimizer with PowerSGD keeps its error feedback there), copied to CPU."""
    found = {}
    for name, obj in state.items():
        local = obj.local_state_dict() if callable(getattr(obj, "local_state_dict", None)) else None
        if local is not None:
            found[name] = cpu_snapshot(local)
    return found


def apply_local(state: Mapping[str, Any], saved: Optional[List[Dict[str, Any]]], rank: int, size: int) -> None:
    """Give every entry with per-rank state this rank's saved part. When the checkpoint has none
    that fits (none saved, or saved by another number of ranks: the parts belong to ranks that
    no longer exist, and a subset of them is no state of this world either), the entry gets
    ``None`` and the reason, and restarts that part in its own documented way."""
    for name, obj in state.items():
        if not callable(getattr(obj, "load_local_state_dict", None)) or obj.local_state_dict() is None:
            continue
        if saved is not None and len(saved) == size and name in saved[rank]:
            obj.load_local_state_dict(saved[rank][name])
        elif saved is None or not any(name in s for s in saved):
            obj.load_local_state_dict(None, reason="the checkpoint has no per-rank state for it")
        else:
            obj.load_local_state_dict(None, reason=f"the checkpoint was written by {len(saved)} ranks, "
                                                   f"this run has {size}")
