"""Elastic training on Horovod Elastic: one state object for everything a training loop owns.

    state = ElasticState(ctx, model=model, optimizer=optimizer, loader=loader, scheduler=schedule)

    @distrib.elastic.run
    def train(state):
        while state.step < total_steps:
            ...one step on state.ctx...
            state.step += 1
            if state.step % commit_every == 0:
                state.commit()

    train(state)

The protocol is Horovod's: ``commit()`` snapshots the state in memory (and lets workers that
came back join), ``restore()`` rolls back to the last commit when a peer died, ``sync()``
copies rank 0's state to every worker after the ring re-formed. After every re-formation
:meth:`ElasticState.on_reset` rebuilds the :class:`~distrib.context.Context`, re-shards the
rest of the epoch over the new world size (the loader's position is a count of consumed
samples, so nothing is skipped or seen twice), and rescales the learning rate.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

from distrib.broadcast import broadcast_training_state
from distrib.comm.horovod import elastic_run, elastic_state_base
from distrib.context import Context, init

ELASTIC_ENGINE_REFUSAL = ("elastic mode runs on Horovod Elastic only; this run uses the {engine} engine: restart "
                          "failed jobs with python -m launch --max-restarts N (they resume from their checkpoints)")


class ElasticState(elastic_state_base()):
    """Model, optimizer, loader, scheduler, step and user values, committed together.

    ``extra`` names more objects with ``state_dict()/load_state_dict()`` (a torch LR scheduler,
    :class:`distrib.user_state.UserState`), treated like the loader: committed, restored, and
    synced from rank 0. Objects with ``state_dict()/load_state_dict()`` are snapshotted with a deep copy on
    :meth:`commit`; plain values given as keyword arguments are attributes (``state.best``)
    and are committed too. ``state.ctx`` is the current Context: read it after a reset,
    never keep an old copy.
    """

    def __init__(self, ctx: Context, *, model, optimizer, loader=None, scheduler=None, step: int = 0,
                 extra: Optional[Dict[str, Any]] = None, **user_values: Any):
        if ctx.engine not in ("horovod", "local"):
            raise ValueError(ELASTIC_ENGINE_REFUSAL.format(engine=ctx.engine))
        self.ctx = ctx
        self.step = step
        self.resets = 0
        self._stateful = {name: obj for name, obj in
                          (("model", model), ("optimizer", optimizer), ("loader", loader), ("scheduler", scheduler))
                          if obj is not None}
        for name, obj in (extra or {}).items():  # more objects with state_dict/load_state_dict
            if name in self._stateful:
                raise ValueError(f"extra object {name!r} clashes with ElasticState's own {name!r}; rename it")
            self._stateful[name] = obj
        self._user_names = sorted(user_values)
        for name, value in user_values.items():
            setattr(self, name, value)
        self._saved: Dict[str, Any] = {}
        self._after_reset: List[Callable[["ElasticState"], None]] = []
        # Horovod's State broadcasts its host-update check with these (at commit()).
        super().__init__(bcast_object=lambda obj: self.ctx.comm.broadcast_object(obj, name="distrib.elastic.hosts"),
                         get_rank=lambda: self.ctx.comm.rank)
        self.save()

    # Horovod's State protocol ---------------------------------------------------------
    def save(self) -> None:
        self._saved = {
            "stateful": {n: copy.deepcopy(o.state_dict()) for n, o in self._stateful.items()},
            "step": self.step,
            "user": copy.deepcopy({n: getattr(self, n) for n in self._user_names}),
        }

    def restore(self) -> None:
        for name, obj in self._stateful.items():
            obj.load_state_dict(copy.deepcopy(self._saved["stateful"][name]))
        self.step = self._saved["step"]
        for name, value in copy.deepcopy(self._saved["user"]).items():
            setattr(self, name, value)

    def sync(self) -> None:
        """Rank 0's state on every worker. Must be called on all ranks (Horovod does it)."""
        comm = self.ctx.comm
        model, optimizer = self._stateful["model"], self._stateful["optimizer"]
        broadcast_training_state(model, getattr(optimizer, "optimizer", optimizer), comm, root_rank=0,
                                 extra_params=getattr(optimizer, "_extra_params", ()))
        small = {"step": self.step, "user": {n: getattr(self, n) for n in self._user_names},
                 "stateful": {n: o.state_dict() for n, o in self._stateful.items()
                              if n not in ("model", "optimizer")}}
        if hasattr(optimizer, "scaler"):
            small["scaler"] = optimizer.scaler.state_dict()
        small = comm.broadcast_object(small, root=0, name="distrib.elastic.sync")
        self.step = small["step"]
        for name, value in small["user"].items():
            setattr(self, name, value)
        for name, value in small["stateful"].items():
            self._stateful[name].load_state_dict(value)
        if "scaler" in small and small["scaler"]:
            optimizer.scaler.load_state_dict(small["scaler"])
        self.save()

    def reset(self) -> None:
        """Called by Horovod after the ring re-formed: adopt the new world."""
        self.resets += 1
        self.ctx = init()
        optimizer = self._stateful["optimizer"]
        if hasattr(optimizer, "reset"):
            optimizer.reset()
        loader = self._stateful.get("loader")
        if loader is not None:
            loader.set_world(self.ctx.rank, self.ctx.size)
        scheduler = self._stateful.get("scheduler")
        # A loader that keeps its global batch re-divides it: the learning rate must stay too.
        keeps_batch = loader is not None and getattr(loader, "keep_global_batch", False)
        if scheduler is not None and hasattr(scheduler, "set_world_size") and not keeps_batch:
            scheduler.set_world_size(self.ctx.size)
        for callback in self._after_reset:
            callback(self)

    def on_world_change(self, callback: Callable[["ElasticState"], None]) -> None:
        """``callback(state)`` runs on every worker after each re-formation (e.g. to log it,
        or to point a CheckpointManager at ``state.ctx``)."""
        self._after_reset.append(callback)


def run(func: Callable) -> Callable:
    """Horovod's elastic retry loop around ``func(state, ...)``: on a peer's failure the state
    is restored to the last commit, on a host change it is kept; then the ring re-forms, the
    state is synced from rank 0, and ``func`` is called again."""
    return elastic_run(func)
