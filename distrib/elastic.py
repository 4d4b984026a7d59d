"""Elastic training on Horovod Elastic: one state object, and the one recovery loop.

    state = ElasticState(ctx, model=model, optimizer=optimizer, loader=loader, schedule=schedule)

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
:meth:`ElasticState.reset` hands the re-formed world to every part that follows one (the one
protocol: ``part.adopt_world(ctx)``): the optimizer drops its in-flight exchange, the loader
re-shards the rest of the epoch (its position is a count of consumed samples, so nothing is
skipped or seen twice), the LR schedule rescales. Then each attempt starts by fitting the torch
threads to the workers now on each machine.

:func:`recovering` is that loop, written once: :func:`run` drives it with the user's function,
:meth:`distrib.Run.steps` with its step generator (whose loop body is not a function it could
call, so a failure inside it is deferred by the communication layer to the step boundary, see
:meth:`distrib.comm.Comm.failures_deferred`).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, TypeVar

from distrib.comm.horovod import elastic_state_base, hosts_updated_interrupt, notification_manager
from distrib.context import Context, share_cores

ELASTIC_ENGINE_REFUSAL = ("elastic mode runs on Horovod Elastic only; this run uses the {engine} engine: restart "
                          "failed jobs with python -m launch --max-restarts N (they resume from their checkpoints)")

T = TypeVar("T")


class ElasticState(elastic_state_base()):
    """Model, optimizer, loader, schedule, step and user values, committed together.

    ``optimizer`` comes from :func:`distrib.wrap` (its ``broadcast_state`` syncs the model and
    the optimizer). ``extra`` names more objects with ``state_dict()/load_state_dict()`` (a
    torch LR scheduler, :class:`distrib.job.user_state.UserState`), treated like the loader:
    committed, restored, and synced from rank 0. Objects with ``state_dict()/load_state_dict()``
    are snapshotted with a deep copy on :meth:`commit`; plain values given as keyword arguments
    are attributes (``state.best``) and are committed too. ``state.ctx`` is the current Context:
    read it after a reset, never keep an old copy.
    """

    def __init__(self, ctx: Context, *, model, optimizer, loader=None, schedule=None, step: int = 0,
                 extra: Optional[Dict[str, Any]] = None, **user_values: Any):
        if ctx.engine not in ("horovod", "local"):
            raise ValueError(ELASTIC_ENGINE_REFUSAL.format(engine=ctx.engine))
        if not callable(getattr(optimizer, "broadcast_state", None)):
            raise ValueError(f"ElasticState needs the optimizer distrib.wrap() returns, got {type(optimizer).__name__}; "
                             "pass optimizer=distrib.wrap(model, optimizer, ctx)")
        self.ctx = ctx
        self.step = step
        self.model, self.optimizer = model, optimizer
        self._stateful = {name: obj for name, obj in
                          (("model", model), ("optimizer", optimizer), ("loader", loader), ("schedule", schedule))
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
        """Rank 0's state on every worker. Must be called on all ranks (:func:`recovering` does)."""
        self.optimizer.broadcast_state(root_rank=0)  # parameters, buffers, optimizer state, loss scale
        small = {"step": self.step, "user": {n: getattr(self, n) for n in self._user_names},
                 "stateful": {n: o.state_dict() for n, o in self._stateful.items()
                              if n not in ("model", "optimizer")}}
        small = self.ctx.comm.broadcast_object(small, root=0, name="distrib.elastic.sync")
        self.step = small["step"]
        for name, value in small["user"].items():
            setattr(self, name, value)
        for name, value in small["stateful"].items():
            self._stateful[name].load_state_dict(value)
        self.save()

    def reset(self) -> None:
        """Called after the ring re-formed: every part adopts the new world."""
        self.ctx = self.ctx.reformed()
        if self.ctx.device.type == "cpu":  # what init() does: a first guess from the engine's local size,
            share_cores(self.ctx.comm, collective=False)  # refined by fit_threads() in the next attempt
        loader = self._stateful.get("loader")
        # A loader that keeps its global batch re-divides it: the learning rate must stay too.
        keeps_batch = loader is not None and getattr(loader, "keep_global_batch", False)
        for name, part in self._stateful.items():
            adopt = getattr(part, "adopt_world", None)
            if adopt is not None and not (name == "schedule" and keeps_batch):
                adopt(self.ctx)
        for callback in self._after_reset:
            callback(self)

    def fit_threads(self) -> None:
        """On CPU, this worker's torch threads for the workers now on its machine (a collective:
        Horovod Elastic allows none outside the recovery loop, so init() could only guess)."""
        if self.ctx.device.type == "cpu":
            share_cores(self.ctx.comm, collective=True)

    def on_world_change(self, callback: Callable[["ElasticState"], None]) -> None:
        """``callback(state)`` runs on every worker after each re-formation (e.g. to log it,
        or to point a CheckpointManager at ``state.ctx``)."""
        self._after_reset.append(callback)


def recovering(state: ElasticState, attempt: Callable[[], Generator[Any, None, T]]) -> Generator[Any, None, T]:
    """Horovod's elastic retry loop (``horovod.common.elastic.run_fn``), the one copy in distrib.

    Runs the generator ``attempt()`` from the state's current position, passing on what it
    yields, and returns what it returns. When a peer dies inside it, the state rolls back to the
    last commit; when hosts changed at a commit, the state is kept; then the ring re-forms, the
    state adopts the new world, rank 0's state is synced to every worker (one that joined too),
    the threads are fitted to the machine, and ``attempt()`` starts again.
    """
    manager = notification_manager()
    manager.init()  # host changes reach the state, raised at its next commit
    manager.register_listener(state)
    peer_failures, hosts_updated = state.ctx.comm.failures, hosts_updated_interrupt()
    need_sync = True
    try:
        while True:
            try:
                if need_sync:
                    state.sync()
                state.fit_threads()  # every rank, once per attempt: the workers per machine changed
                return (yield from attempt())
            except peer_failures:
                state.restore()  # a peer died: back to the last commit
                need_sync = True
            except hosts_updated as interrupt:
                need_sync = not interrupt.skip_sync  # a host came or went at a commit: state is current
            state.ctx.comm.reform()  # Horovod's shutdown and init; the broken-world latch opens
            state.on_reset()  # Horovod's State: clears its host messages, then reset() above
    finally:
        manager.remove_listener(state)


def run(func: Callable[..., T]) -> Callable[..., T]:
    """The recovery loop around ``func(state, ...)``: it is called again after every world
    change, from the last commit (a peer died) or from where it was (hosts changed)."""

    @functools.wraps(func)
    def wrapper(state: ElasticState, *args, **kwargs) -> T:
        def attempt() -> Generator[Any, None, T]:
            return func(state, *args, **kwargs)
            yield  # a generator that yields nothing: recovering() drives generators

        return _drained(recovering(state, attempt))
    return wrapper


def _drained(steps: Iterator[Any]) -> Any:
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
