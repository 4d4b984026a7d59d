"""Data-parallel optimizer: gradients averaged across workers with Horovod's allreduce.

``wrap(model, optimizer, ctx)`` returns a :class:`DistributedOptimizer` that *holds* the
user's optimizer (it does not subclass it dynamically, so user optimizer subclasses keep
working). Each parameter's gradient is handed to Horovod's asynchronous allreduce as soon
as backward has finished accumulating it, so communication overlaps the rest of backward;
``step()`` waits for the results, then unscales (fp16), clips and steps.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

from distrib.broadcast import broadcast_training_state
from distrib.context import _import_horovod
from distrib.heartbeat import beat
from distrib.reducers import make_reducer

PRECISIONS = ("fp32", "bf16", "fp16")
COMPRESSIONS = ("none", "fp16")
OPS = ("average", "adasum")


class DistributedOptimizer:
    """Averages gradients over all workers, then steps the wrapped optimizer.

    Per step, on every rank: ``accumulate`` calls of :meth:`backward` (or ``loss.backward()``),
    then one :meth:`step`, then :meth:`zero_grad`. Gradients of the ``accumulate``
    micro-batches are summed locally with no communication and averaged (over micro-batches
    and workers) by one allreduce launched during the last backward.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx, *,
                 accumulate: int = 1, compression: str = "none", op: str = "average",
                 max_grad_norm: Optional[float] = None, precision: str = "fp32", broadcast: bool = True):
        _check_choice("precision", precision, PRECISIONS)
        _check_choice("compression", compression, COMPRESSIONS)
        _check_choice("op", op, OPS)
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1 micro-batches per step, got {accumulate}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None to disable clipping), got {max_grad_norm}")
        if precision == "fp16" and op == "adasum":
            raise ValueError("op='adasum' with precision='fp16' is not supported: the loss scale would "
                             "enter Adasum's dot products; use precision='bf16' or op='average'")
        self._hvd = _import_horovod()
        self.model, self.optimizer, self.ctx = model, optimizer, ctx
        self.accumulate, self.compression, self.op = accumulate, compression, op
        self.max_grad_norm, self.precision = max_grad_norm, precision
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=(precision == "fp16"))
        self.last_grad_norm: Optional[float] = None

        self._named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._passes_left: Dict[torch.Tensor, int] = {p: accumulate for _, p in self._named_params}
        self._reducer = make_reducer(self._named_params, self._hvd, compression=compression, op=op)
        self._hook_handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                              for _, p in self._named_params]
        # Under Horovod Elastic no collective may run outside the elastic retry loop (a worker
        # joining later would pair this broadcast with its peers' state sync and hang);
        # ElasticState.sync() broadcasts the same state inside the loop instead.
        if broadcast and not ctx.elastic:
            self.broadcast_state()

    # -- the training-loop API -------------------------------------------------------------
    def autocast(self):
        """Context manager for the forward pass: bf16/fp16 autocast, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.ctx.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the gradient scaler when training in fp16."""
        self.scaler.scale(loss).backward()

    def synchronize(self) -> None:
        """Wait until every gradient is averaged across workers. Called by :meth:`step`;
        call it yourself to time the wait, or to inspect averaged gradients before the step."""
        beat()  # before every collective distrib waits for: see distrib/heartbeat.py
        for p in self._params():
            left = self._passes_left[p]
            if left == 0:
                continue  # its allreduce was launched during backward
            if left != self.accumulate:
                raise RuntimeError(
                    f"step() was called after {self.accumulate - left} of the {self.accumulate} "
                    "backward passes of this step (accumulate); call backward once per micro-batch")
            # No gradient reached this parameter in this step on this rank (unused in the
            # forward pass). Every rank must still join its allreduce, with zeros.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._grad_ready(p)
        self._reducer.synchronize()
        for p in self._params():
            self._passes_left[p] = self.accumulate

    def step(self, closure=None) -> Optional[torch.Tensor]:
        """Synchronize, unscale (fp16), clip (after averaging, so every rank clips the same
        global gradient), then step. Must be called on all ranks."""
        if closure is not None:
            raise ValueError("closures are not supported: a closure would re-run backward after the allreduce")
        self.synchronize()
        self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params(), self.max_grad_norm)
            self.last_grad_norm = float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._reducer.in_flight():
            raise RuntimeError(
                "zero_grad() was called after loss.backward() but before step(): the gradients are "
                "still being averaged; call step() (or synchronize()) first")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self) -> Dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def broadcast_state(self, root_rank: int = 0) -> None:
        """Make every rank's parameters and optimizer state equal to ``root_rank``'s.
        Must be called on all ranks (it is a collective)."""
        broadcast_training_state(self.model, self.optimizer, self._hvd, root_rank)

    def reset(self) -> None:
        """Forget in-flight communication and partial accumulation: after a peer died the
        ring was re-formed and the old allreduce handles are void (elastic mode)."""
        self._reducer = make_reducer(self._named_params, self._hvd, compression=self.compression, op=self.op)
        for p in self._params():
            self._passes_left[p] = self.accumulate

    def close(self) -> None:
        """Remove the gradient hooks (the model trains locally again)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    # -- internals -------------------------------------------------------------------------
    def _params(self) -> Iterator[torch.Tensor]:
        return (p for _, p in self._named_params)

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        self._passes_left[p] -= 1
        if self._passes_left[p] == 0:
            self._grad_ready(p)

    def _grad_ready(self, p: torch.Tensor) -> None:
        if self.accumulate > 1:
            p.grad.div_(self.accumulate)  # mean over micro-batches, before the mean over workers
        self._reducer.grad_ready(p)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx, **options) -> DistributedOptimizer:
    """Make ``optimizer`` data-parallel. Must be called on all ranks, after the model is on
    ``ctx.device``. Broadcasts rank 0's parameters and optimizer state. Options: see
    :class:`DistributedOptimizer` (accumulate, compression, op, max_grad_norm, precision)."""
    return DistributedOptimizer(model, optimizer, ctx, **options)
