"""What :class:`distrib.Run` wraps around the optimizer: phase timing and the elastic guard.

The optimizer's ``synchronize`` (the gradient wait) and ``step`` are timed as the ``allreduce``
and ``optimizer`` phases of the breakdown. Under Horovod Elastic a peer's death surfaces as a
``HorovodInternalError`` in whatever collective runs next, often the optimizer's, inside the
user's loop body, where Horovod's retry loop (now inside ``Run.steps()``) cannot catch it: the
guard keeps the error and makes the rest of that step do nothing, and ``Run.steps()`` raises it
between two steps, where it rolls back to the last commit.
"""
from __future__ import annotations

import functools
from typing import Callable, ContextManager, Optional, Tuple


class StepGuard:
    """Wraps ``optimizer``'s ``synchronize``/``step`` (timed with ``phase(name)``) and, when
    ``failures`` (the engine's peer-failure errors, ``ctx.comm.failures``; elastic mode only)
    are given, also ``backward``/``zero_grad``, as instance attributes; :meth:`remove` takes
    them off. ``broken`` is the peer-failure error kept from this step, or None."""

    PHASES = {"backward": None, "synchronize": "allreduce", "step": "optimizer", "zero_grad": None}

    def __init__(self, optimizer, phase: Callable[[str], ContextManager], *, failures: Tuple[type, ...] = ()):
        self.optimizer, self._phase = optimizer, phase
        self.broken: Optional[BaseException] = None
        self._internal_error = tuple(failures)
        elastic = bool(self._internal_error)
        self._originals = {name: getattr(optimizer, name) for name in self.PHASES
                           if callable(getattr(optimizer, name, None))}
        for name in self._originals:
            if name in ("synchronize", "step") or elastic:
                setattr(optimizer, name, self._guarded(name))

    def _guarded(self, name: str):
        method, phase = self._originals[name], self.PHASES[name]

        @functools.wraps(method)
        def call(*args, **kwargs):
            if self.broken is not None:
                return None  # the rest of a broken step: rolled back anyway
            try:
                if phase is None:
                    return method(*args, **kwargs)
                with self._phase(phase):
                    if name == "step" and "synchronize" in self._originals:
                        with self._phase("allreduce"):
                            self._originals["synchronize"]()  # the step then does not exchange again
                    return method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - only the engine's peer-failure error is kept
                if not self._internal_error or not isinstance(exc, self._internal_error):
                    raise
                self.broken = exc
                return None
        return call

    def remove(self) -> None:
        for name in self._originals:
            self.optimizer.__dict__.pop(name, None)
