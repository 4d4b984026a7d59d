"""The reducer behind ``distrib.wrap(..., compression="powersgd")``.

Same contract as the reducers of :mod:`distrib.step.reducers` (``grad_ready(p, used)``, then
``synchronize()`` leaves every ``p.grad`` averaged and returns the parameters no rank used).
For the first ``start_step`` steps it is the default bucketed allreduce; from then on, two
collectives per step, whatever the number of tensors (each one a round trip, which on a slow
link costs more than the few bytes):

1. one flat buffer, averaged, started as soon as the last gradient of the step is ready: the
   tensors PowerSGD does not compress (vectors, small matrices), the used-flags, and every
   compressed matrix's P;
2. every compressed matrix's Q, in one flat buffer, averaged (it needs 1's result).

The math is :class:`distrib.compression.powersgd.PowerSGDState`; this module only moves it.
"""
from __future__ import annotations

from typing import FrozenSet, List, Tuple

import torch

from distrib.comm import priority
from distrib.compression.powersgd import PowerSGDState
from distrib.step.reducers import BucketedReducer


class PowerSGDReducer:
    """PowerSGD-averaged gradients over ``comm`` (any engine's :class:`distrib.comm.Comm`).
    ``state`` outlives the reducer (a reset after a peer died builds a new reducer on the same
    state). Every rank must hand it the same parameters each step
    (:class:`distrib.step.gradients.GradientExchange` does). Nothing reads a device value on the
    host: the used-flags are written from the host once per step without waiting, and read
    back only on a step where this rank left a parameter without a gradient."""

    def __init__(self, named_params: List[Tuple[str, torch.Tensor]], comm, *, state: PowerSGDState,
                 prefix: str):
        self._comm, self._state, self._prefix = comm, state, prefix
        self._params = [p for _, p in named_params]
        self._index = {p: i for i, p in enumerate(self._params)}
        self._plain = BucketedReducer(named_params, comm, prefix=f"{prefix}.warmup")
        self._used: List[bool] = [False] * len(self._params)
        self._pending = len(self._params)
        self._handles = None  # (dense buffer, its handle, P handle) once launched
        # The engine's polling threads at this nice value while the step computes, raised for the
        # collectives after backward (distrib/comm/priority.py); 0: left alone.
        self._idle_nice = priority.engine_nice() if priority.may_raise_back() else 0

    @property
    def compressing(self) -> bool:
        """Whether this step goes low-rank (after the plain-allreduce warm-up)."""
        return self._state.step >= self._state.config.start_step

    def grad_ready(self, p: torch.Tensor, used: bool = True) -> None:
        if not self.compressing:
            self._plain.grad_ready(p, used)
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        self._used[self._index[p]] = used
        self._pending -= 1
        if self._pending == 0:
            self._launch()

    def _launch(self) -> None:
        state, grads = self._state, [p.grad for p in self._params]
        wire = torch.cat([grads[i].detach().reshape(-1).to(state.dtype) for i in state.uncompressed]
                         + [torch.empty(len(self._params), dtype=state.dtype, device=state.device),
                            state.start(grads)])
        # The host's flags, written without waiting for the device (as the bucketed reducer
        # does): a fill when all agree, else a staged copy.
        at = sum(self._params[i].numel() for i in state.uncompressed)
        flags = wire[at:at + len(self._params)]
        if all(self._used) or not any(self._used):
            flags.fill_(float(self._used[0]))
        else:
            flags.copy_(torch.tensor(self._used, dtype=state.dtype), non_blocking=True)
        if self._idle_nice:
            self._comm.set_engine_priority(0)  # the collectives start: the engine's threads at full priority
        self._handles = (wire, self._comm.allreduce_async_(wire, name=f"{self._prefix}.powersgd.first"))

    def synchronize(self) -> FrozenSet[torch.Tensor]:
        """Wait for the averages; return the parameters that no rank used."""
        state = self._state
        if not self.compressing:
            unused = self._plain.synchronize()
            state.step += 1
            return unused
        if self._handles is None:
            raise RuntimeError(f"synchronize() before every gradient was ready ({self._pending} missing)")
        wire, handle = self._handles
        handle.wait()
        grads = [p.grad for p in self._params]
        at = 0
        for i in state.uncompressed:
            n = grads[i].numel()
            grads[i].copy_(wire[at:at + n].view_as(grads[i]))
            at += n
        flags = wire[at:at + len(self._params)]
        q = state.after_p_mean(wire[at + len(self._params):])
        q_handle = self._comm.allreduce_async_(q, name=f"{self._prefix}.powersgd.q")
        used_here = all(self._used)
        applied = None if used_here else {i: (flags[i] > 0).to(state.dtype) for i in state.compressed}
        q_handle.wait()
        if self._idle_nice:  # nothing more to send this step: the engine's polling yields to the compute
            self._comm.set_engine_priority(self._idle_nice)
        state.finish(q, grads, applied)
        state.step += 1
        self._handles, self._pending = None, len(self._params)
        if used_here:  # each parameter was used here, so somewhere: nothing to read
            return frozenset()
        # This rank left some parameter without a gradient: one small device-to-host copy.
        return frozenset(p for p, used in zip(self._params, flags.tolist()) if used == 0)

    def in_flight(self) -> bool:
        return self._handles is not None or self._plain.in_flight()


def powersgd_factory(named_params: List[Tuple[str, torch.Tensor]], comm, config, *, prefix: str):
    """(the PowerSGD state, a factory of reducers sharing it) for these parameters. ``config``:
    a :class:`~distrib.compression.powersgd.PowerSGD` or None (its defaults)."""
    from distrib.compression.powersgd import PowerSGD
    params = [p for _, p in named_params]
    if not params:
        raise ValueError("compression='powersgd' needs parameters that require grad; the optimizer has none")
    dtype = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
    state = PowerSGDState([p.shape for p in params], config or PowerSGD(), dtype=dtype, device=params[0].device)
    return state, lambda: PowerSGDReducer(named_params, comm, state=state, prefix=prefix)
