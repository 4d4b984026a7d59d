"""The training script's own state, checkpointed and rolled back with the rest of a :class:`distrib.Run`.

Two kinds, because they behave differently when the number of workers changes:

* :class:`UserState` (``run.state``): values every rank holds alike (the best validation
  loss, a plateau counter, a tracker object). Rank 0's copy is saved; every rank gets it back.
* :class:`RankState` (``run.rank_state``): values each rank holds for itself (a recurrent
  hidden state of this rank's stream columns). Every rank's copy is saved; at the same world
  size each rank gets its own back. At another world size (a resume on more or fewer workers, an
  elastic resize) an entry is re-sharded by its ``reshard`` function when it has one
  (:func:`split_concat` for tensors split along a batch dimension), else reset to the value it
  was given to ``Run``.

Both are dicts: the script reads and writes ``run.state["best"]``. A value with
``state_dict()/load_state_dict()`` is loaded in place (keep your reference to it); any other
value must be picklable and is replaced in the dict by the restored one (read it back from the
dict after a resume, never keep a copy of it across the loop).
"""
from __future__ import annotations

import copy
import pickle
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

Reshard = Callable[[Sequence[Any], int, int], Any]


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _check_picklable(kind: str, name: str, value: Any) -> None:
    if _is_stateful(value):
        return
    try:
        pickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - pickling raises many types
        raise ValueError(f"{kind}[{name!r}] ({type(value).__name__}) cannot be checkpointed: neither "
                         f"state_dict()/load_state_dict() nor picklable ({exc}); store plain values or "
                         "tensors, or give the object state_dict/load_state_dict") from None


def _value_state(value: Any) -> Any:
    """A copy the checkpoint owns: later in-place changes of the live value do not reach it."""
    if _is_stateful(value):
        return copy.deepcopy(value.state_dict())
    return copy.deepcopy(value)


class UserState(dict):
    """``name -> value`` replicated on every rank (see the module docstring). Saved as one entry
    of the checkpoint's state; names missing from an older checkpoint keep their current value."""

    def __init__(self, values: Optional[Mapping[str, Any]] = None):
        super().__init__(values or {})
        for name, value in self.items():
            _check_picklable("state", name, value)

    def state_dict(self) -> Dict[str, Any]:
        return {name: _value_state(value) for name, value in self.items()}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        for name, value in saved.items():
            if name in self and _is_stateful(self[name]):
                self[name].load_state_dict(copy.deepcopy(value))
            else:
                self[name] = copy.deepcopy(value)


class RankState(dict):
    """``name -> value`` of this rank alone (see the module docstring). ``reshard`` maps names to
    ``fn(saved_values_of_every_old_rank, rank, size) -> this rank's value`` for a world of another
    size; names without one are reset to their initial value there."""

    def __init__(self, values: Optional[Mapping[str, Any]] = None,
                 reshard: Optional[Mapping[str, Reshard]] = None):
        super().__init__(values or {})
        unknown = sorted(set(reshard or {}) - set(self))
        if unknown:
            raise ValueError(f"reshard names {unknown} that are not in rank_state ({sorted(self)}); "
                             "give a reshard function only for a rank_state entry")
        for name, value in self.items():
            _check_picklable("rank_state", name, value)
        self.reshard = dict(reshard or {})
        self._initial = {name: _value_state(value) for name, value in self.items()}

    def state_dict(self) -> Dict[str, Any]:
        return {name: _value_state(value) for name, value in self.items()}

    def _set(self, name: str, value: Any) -> None:
        if _is_stateful(self[name]):
            self[name].load_state_dict(copy.deepcopy(value))
        else:
            self[name] = copy.deepcopy(value)

    def load_all(self, saved: Optional[List[Optional[Mapping[str, Any]]]], rank: int, size: int) -> List[str]:
        """Adopt this rank's part of ``saved`` (every old rank's :meth:`state_dict`, in rank
        order; None when nothing was saved): its own entry at the same world size, re-sharded or
        reset at another. Returns the names that were reset, for the caller's log."""
        reset = []
        same_world = saved is not None and len(saved) == size
        for name in list(self):
            values = [s.get(name) if s is not None else None for s in saved] if saved is not None else None
            if values is not None and all(v is not None for v in values):
                if same_world:
                    self._set(name, values[rank])
                    continue
                if name in self.reshard:
                    self._set(name, self.reshard[name](values, rank, size))
                    continue
            self._set(name, self._initial[name])
            reset.append(name)
        return reset


def split_concat(dim: int = 0) -> Reshard:
    """A ``reshard`` function for a tensor (or a tuple/list of tensors, e.g. an LSTM's ``(h, c)``)
    whose dimension ``dim`` holds this rank's contiguous share of a global batch: the old ranks'
    tensors are concatenated in rank order and cut into ``size`` equal parts. It matches
    :class:`distrib.ShardedLoader` (rank r takes the r-th contiguous chunk of each global batch)
    when the global batch stays the same (``keep_global_batch=True``)."""

    def reshard(values: Sequence[Any], rank: int, size: int) -> Any:
        first = values[0]
        if isinstance(first, (tuple, list)):
            return type(first)(reshard([v[i] for v in values], rank, size) for i in range(len(first)))
        whole = torch.cat(list(values), dim=dim)
        if whole.shape[dim] % size:
            raise ValueError(f"cannot split a rank state of {whole.shape[dim]} rows (dimension {dim}) over "
                             f"{size} workers; use a global batch divisible by every world size")
        return whole.chunk(size, dim=dim)[rank].clone()

    return reshard


class GatheredRankStates:
    """Elastic: every rank's :class:`RankState` at the last commit (the same list on every rank),
    committed, rolled back and synced like the other state objects."""

    def __init__(self):
        self.states: Optional[List[Dict[str, Any]]] = None
        self.size = 0
        self.adopted_after = 0  # the elastic reset count this rank last adopted them after

    def state_dict(self) -> Dict[str, Any]:
        return {"states": self.states, "size": self.size}

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        self.states, self.size = saved["states"], saved["size"]
