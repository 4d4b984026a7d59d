"""One step's gradient traffic: which backward pass is the last, when a gradient is final,
and which parameters no rank used.

A step is ``accumulate`` backward passes (micro-batches), then :meth:`GradientExchange.synchronize`
(called by the optimizer's ``step()``, or by the user before it), then :meth:`end_step`. The
state is explicit and moves one way::

    ACCUMULATING --(last backward pass ends)--> REDUCING --synchronize()--> SYNCHRONIZED --end_step()--> ACCUMULATING

* Backward passes are counted with an end-of-backward callback (queued from the first gradient
  hook of each pass, as DDP's reducer does), not per parameter, so a parameter may skip some
  micro-batches, or all of them.
* In the last pass a parameter's gradient is final as soon as autograd has accumulated it:
  it goes to the reducer at once and its allreduce overlaps the rest of backward. When that
  pass ends, every parameter it did not reach is handed over too: with its gradient from the
  earlier micro-batches, or with zeros and ``used=False`` when it has none on this rank.
* ``synchronize()`` is idempotent within a step: ``synchronize(); step()`` exchanges once.
* A gradient that arrives after its parameter was sent (more backward passes than
  ``accumulate``, ``retain_graph`` with two losses, reentrant activation checkpointing) is
  refused with an error that says what to do, instead of being silently lost.
"""
from __future__ import annotations

import contextlib
import enum
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch



class Phase(enum.Enum):
    ACCUMULATING = "accumulating"   # backward passes of this step are running or to come
    REDUCING = "reducing"           # the last pass ended: every gradient is with the reducer
    SYNCHRONIZED = "synchronized"   # averaged gradients are in p.grad; the optimizer may step


class GradientExchange:
    """Averages the gradients of ``named_params`` over all workers, once per step.

    ``make_reducer()`` builds the reducer that carries the gradients (the bucketed allreduce, or
    ZeRO stage 2's reduce-scatter), now and after every :meth:`reset`: chosen by the caller before
    the exchange exists. Every method that communicates must be called on all ranks, in the same order.
    """

    def __init__(self, named_params: List[Tuple[str, torch.Tensor]], make_reducer: Callable[[], object], *,
                 accumulate: int):
        self.named_params = named_params
        self.accumulate = accumulate
        self._names = {p: n for n, p in named_params}
        self._make_reducer = make_reducer
        self._reducer = make_reducer()
        self.phase = Phase.ACCUMULATING
        self.passes_done = 0        # backward passes finished in this step
        self._pass_open = False     # a backward pass is running and its end callback is queued
        self._sent: Set[torch.Tensor] = set()
        self._paused = 0            # depth of no_sync() blocks
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_accumulated)
                       for _, p in named_params]

    # -- what the optimizer calls -------------------------------------------------------------
    def synchronize(self, on_bucket: Optional[Callable[[List[torch.Tensor]], None]] = None) -> None:
        """Wait until every gradient is averaged; parameters no rank used get ``grad = None``
        (so the optimizer skips them, as single-process torch does). Idempotent within a step.
        ``on_bucket(params)``: called as each bucket's average arrives, while the later ones are
        still in flight (see :meth:`overlaps_buckets`). Must be called on all ranks."""
        if self.phase is Phase.SYNCHRONIZED:
            return
        if self.phase is Phase.ACCUMULATING:
            raise RuntimeError(
                f"step() was called after {self.passes_done} of the {self.accumulate} backward passes of "
                f"this step (accumulate={self.accumulate}); call backward once per micro-batch")
        if on_bucket is None:
            for p in self._reducer.synchronize():
                p.grad = None
        else:
            for params, unused in self._reducer.completed_buckets():
                for p in unused:
                    p.grad = None
                on_bucket(params)
        self.phase = Phase.SYNCHRONIZED

    def overlaps_buckets(self) -> bool:
        """Whether the reducer's buckets arrive one by one, so that work on the first ones
        overlaps the transfer of the rest (``synchronize(on_bucket=)``), and none has arrived."""
        return self.phase is Phase.REDUCING and getattr(self._reducer, "completes_in_order", False)

    def end_step(self) -> None:
        """Forget this step (after the optimizer stepped, or the user zeroed the gradients)."""
        if self.phase is Phase.REDUCING:
            raise RuntimeError(
                "zero_grad() was called after loss.backward() but before step(): the gradients are "
                "still being averaged; call step() (or synchronize()) first")
        self.phase = Phase.ACCUMULATING
        self.passes_done = 0
        self._sent.clear()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside this block only accumulate gradients locally: they are not
        micro-batches of ``accumulate`` and send nothing. For a second backward over the same
        micro-batch (two losses with ``retain_graph=True``): all but the last one go in here."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def reset(self) -> None:
        """Drop in-flight communication and partial accumulation: after a peer died the ring was
        re-formed and the old handles are void (elastic mode)."""
        self._reducer = self._make_reducer()
        self.phase, self.passes_done, self._pass_open = Phase.ACCUMULATING, 0, False
        self._sent.clear()

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @property
    def reducer(self):
        return self._reducer

    # -- autograd callbacks -------------------------------------------------------------------
    def _on_grad_accumulated(self, p: torch.Tensor) -> None:
        if self._paused:
            return
        if self.phase is Phase.SYNCHRONIZED:
            raise RuntimeError(
                f"a backward pass reached {self._names[p]!r} after synchronize() and before step(); "
                "call step() (or zero_grad()) before the next backward")
        if p in self._sent:
            raise RuntimeError(
                f"{self._names[p]!r} received a gradient after its average was already sent: more backward "
                f"passes than accumulate={self.accumulate} in this step, or a parameter reached twice in one "
                "pass (reentrant checkpointing); sum the losses and call backward once, run the extra "
                "backward inside `with optimizer.no_sync():`, or use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)")
        if not self._pass_open:
            self._pass_open = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        if self.passes_done + 1 == self.accumulate:
            self._send(p, used=True)  # final for this step: overlap its allreduce with backward

    def _on_backward_end(self) -> None:
        self._pass_open = False
        self.passes_done += 1
        if self.passes_done != self.accumulate:
            return
        for _, p in self.named_params:
            if p not in self._sent:
                self._send(p, used=p.grad is not None)
        self.phase = Phase.REDUCING

    def _send(self, p: torch.Tensor, *, used: bool) -> None:
        if used and self.accumulate > 1:
            p.grad.div_(self.accumulate)  # mean over micro-batches, before the mean over workers
        self._sent.add(p)
        self._reducer.grad_ready(p, used)


def unscale_clip_step(optimizer: torch.optim.Optimizer, scaler, max_grad_norm: Optional[float],
                      named_params: List[Tuple[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    """The step on gradients that are ready (averaged, or a rank's own under local SGD): unscale
    (fp16), clip (the norm stays a tensor: no wait for the device), step, update the loss scale.
    Returns the norm when clipping, else None."""
    scaler.unscale_(optimizer)
    norm = None
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in named_params if p.grad is not None], max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return norm


class SharedStateOnly:
    """The part of the update protocol that only local SGD fills in: an update part whose state is
    the same on every rank (plain data parallelism, ZeRO) has no per-rank checkpoint state and
    nothing to redo after :meth:`DistributedOptimizer.broadcast_state`."""

    def local_state_dict(self) -> Optional[Dict]:
        return None

    def steps_by_bucket(self, scaler, max_grad_norm: Optional[float]) -> bool:
        """Whether :meth:`step_params` may step the parameters bucket by bucket as their averages
        arrive (plain data parallelism, :class:`distrib.step.optim.ReplicatedUpdate`, may)."""
        return False

    def load_local_state_dict(self, state: Optional[Dict], reason: Optional[str] = None) -> None:
        pass

    def restart_from_parameters(self) -> None:
        pass
