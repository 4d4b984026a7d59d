"""Data-parallel optimizer: gradients averaged across workers by the engine's allreduce (``ctx.comm``).

``wrap(model, optimizer, ctx)`` returns a :class:`DistributedOptimizer`: a
``torch.optim.Optimizer`` that holds the user's optimizer and shares its parameter groups and
state (no dynamic subclassing, so user optimizer subclasses keep working). Each parameter's
gradient is handed to an asynchronous allreduce as soon as backward has finished
accumulating it in the last micro-batch, so communication overlaps the rest of backward;
``step()`` waits for the results, then unscales (fp16), clips and steps.

What differs between plain data parallelism and ZeRO (``shard=``) is one part chosen before the
gradient exchange is built: the *update* (:class:`ReplicatedUpdate` here,
:mod:`distrib.sharding.update` for stages 1 and 2), which says which reducer carries the gradients
and how the averaged gradients become a step. Nothing is built and then thrown away.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch

from distrib.step.broadcast import broadcast_training_state
from distrib.compression.local_sgd import LocalSGDUpdate, check_local_sgd
from distrib.step.buffers import BufferSync
from distrib.step.gradients import GradientExchange, SharedStateOnly, unscale_clip_step
from distrib.step.reducers import make_reducer
from distrib.sharding.update import check_sharding, sharded_update
from distrib.step.sync_batchnorm import SyncBatchNorm

PRECISIONS = ("fp32", "bf16", "fp16")
COMPRESSIONS = ("none", "fp16", "powersgd")
OPS = ("average", "adasum")


def _through_wrapped_optimizer(name: str) -> property:
    """An attribute of :class:`DistributedOptimizer` that is the wrapped optimizer's own."""
    return property(lambda self: getattr(self.optimizer, name),
                    lambda self, value: setattr(self.optimizer, name, value))


class DistributedOptimizer(torch.optim.Optimizer):
    """Averages gradients over all workers, then steps the wrapped optimizer.

    A real ``torch.optim.Optimizer`` (LR schedulers, Lightning and Hugging Face check
    ``isinstance``) that *shares* the user's optimizer's ``param_groups``, ``state`` and
    ``defaults`` instead of subclassing its class: user optimizer subclasses keep working, and
    a scheduler that changes the learning rate changes it for the optimizer that steps.

    Per step, on every rank: ``accumulate`` calls of :meth:`backward` (or ``loss.backward()``),
    optionally :meth:`synchronize`, then one :meth:`step`, then :meth:`zero_grad`. Gradients of
    the micro-batches are summed locally with no communication and averaged (over micro-batches
    and workers) during the last backward; see :mod:`distrib.step.gradients` for the state machine.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx, *,
                 accumulate: int = 1, compression: str = "none", op: str = "average",
                 max_grad_norm: Optional[float] = None, precision: str = "fp32", broadcast: bool = True,
                 sync_buffers: bool = False, name: Optional[str] = None, shard: Optional[str] = None,
                 powersgd=None, local_sgd=None):
        _check_choice("precision", precision, PRECISIONS)
        _check_choice("compression", compression, COMPRESSIONS)
        _check_choice("op", op, OPS)
        check_powersgd_options(compression, powersgd, op)
        check_local_sgd(local_sgd, ctx, compression=compression, shard=shard, op=op, precision=precision)
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1 micro-batches per step, got {accumulate}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None to disable clipping), got {max_grad_norm}")
        if precision == "fp16" and op == "adasum":
            raise ValueError("op='adasum' with precision='fp16' is not supported: the loss scale would "
                             "enter Adasum's dot products; use precision='bf16' or op='average'")
        if isinstance(optimizer, DistributedOptimizer):
            raise ValueError("this optimizer is already wrapped by distrib.wrap(); wrap the plain torch optimizer once")
        self._comm = ctx.comm
        if op == "adasum" and not self._comm.supports_adasum:
            raise ValueError(f"op='adasum' needs the Horovod engine (this run uses {self._comm.engine}); "
                             "use op='average' or start the job with the Horovod engine")
        if shard is not None:
            if compression == "powersgd":
                raise ValueError("compression='powersgd' does not combine with shard=: PowerSGD needs each rank's "
                                 "whole gradient matrices; drop one of the two")
            check_sharding(shard, optimizer, ctx, op)
        self.optimizer = optimizer  # first: param_groups, state and defaults are read through it
        # torch.optim.Optimizer.__init__ without its parameter handling (the groups are the inner
        # optimizer's): the hook tables and the profiled step, so optimizer hooks work as usual.
        for table in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                      "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                      "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, table, collections.OrderedDict())
        self._patch_step_function()
        self.model, self.ctx = model, ctx
        self.max_grad_norm, self.precision = max_grad_norm, precision
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=(precision == "fp16"))
        # A tensor on the device: reading it (float(), .item()) waits for the step to finish.
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.name = name if name is not None else f"opt{next(_WRAP_COUNTER)}"
        self._extra_params = optimizer_only_parameters(model, optimizer)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + self._extra_params
        for module in model.modules():
            if isinstance(module, SyncBatchNorm):
                module.comm = self._comm  # its statistics travel over this world
        self._buffer_sync = BufferSync(model, self._comm, prefix=f"distrib.{self.name}") if sync_buffers else None
        # Under Horovod Elastic no collective may run outside the elastic retry loop (a worker
        # joining later would pair this broadcast with its peers' state sync and hang);
        # ElasticState.sync() broadcasts the same state inside the loop instead.
        if broadcast and not ctx.elastic:
            self._broadcast(root_rank=0)  # before the update part is built: its first anchor is rank 0's
        allreduce = functools.partial(make_reducer, named, self._comm, compression=compression, op=op,
                                      prefix=f"distrib.{self.name}")
        self._powersgd = None
        if compression == "powersgd":  # another way to carry the gradients, kept across reset()
            from distrib.compression.reducer import powersgd_factory
            self._powersgd, allreduce = powersgd_factory(named, self._comm, powersgd, prefix=f"distrib.{self.name}")
        # Chosen before the exchange is built: its reducer is the update's (after the broadcast,
        # because a sharded update keeps this rank's slice of rank 0's optimizer state).
        if local_sgd is not None:
            self._update = LocalSGDUpdate(optimizer, named, self._comm, local_sgd, prefix=f"distrib.{self.name}")
        elif shard is not None:
            self._update = sharded_update(shard, optimizer, ctx, name=self.name, named_params=named,
                                          compression=compression, make_allreduce=allreduce)
        else:
            self._update = ReplicatedUpdate(optimizer, allreduce)
        self._exchange = GradientExchange(named, self._update.make_reducer, accumulate=accumulate)
        self._overlap_step = overlap_step_enabled()
        self._phase: Callable[[str], ContextManager] = _untimed

    def time_phases(self, phase: Optional[Callable[[str], ContextManager]]) -> None:
        """Charge the gradient wait to ``phase("allreduce")`` and the step to ``phase("optimizer")``
        (``distrib.Run`` passes its metrics' timer; None stops timing)."""
        self._phase = phase if phase is not None else _untimed

    @property
    def accumulate(self) -> int:
        return self._exchange.accumulate

    @property
    def shard(self) -> Optional[str]:
        """None (every rank holds the whole optimizer state), "optimizer" or "gradients" (ZeRO)."""
        return self._update.shard

    @property
    def owned_ranges(self):
        """Sharded only: ``owned_ranges()`` gives the ``(param index, start, end)`` of the elements this
        rank owns (checkpoints save them per rank and re-cut them); None when not sharded."""
        return getattr(self._update, "owned_ranges", None)

    def gradient_nbytes(self) -> int:
        """Bytes of averaged gradient this rank holds between synchronize() and step(): full
        ``param.grad`` buffers (unsharded, stage 1) or its chunks of the buckets (stage 2)."""
        return self._update.gradient_nbytes()

    # The inner optimizer's, always read through it: its load_state_dict() replaces these
    # objects, so a copy taken at wrap time would go stale (an LR scheduler would then set
    # the learning rate of a list the optimizer no longer steps with).
    param_groups = _through_wrapped_optimizer("param_groups")
    state = _through_wrapped_optimizer("state")
    defaults = _through_wrapped_optimizer("defaults")

    # -- the training-loop API -------------------------------------------------------------
    def autocast(self):
        """Context manager for the forward pass: bf16/fp16 autocast, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.ctx.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor, **backward_options) -> None:
        """``loss.backward()``, through the gradient scaler when training in fp16."""
        self.scaler.scale(loss).backward(**backward_options)

    def no_sync(self):
        """Context manager: backward passes inside it accumulate locally and are not counted as
        micro-batches (DDP's ``no_sync``). Use it for all but the last of several backward
        passes over one micro-batch (two losses with ``retain_graph=True``)."""
        return self._exchange.no_sync()

    def synchronize(self) -> None:
        """Wait until every gradient is averaged across workers. :meth:`step` calls it; call it
        yourself to time the wait or to read averaged gradients before the step: the step then
        does not exchange them again. Parameters that no rank used get ``grad = None``.
        Must be called on all ranks."""
        with self._phase("allreduce"):
            self._exchange.synchronize()

    def step(self, closure=None) -> Optional[torch.Tensor]:
        """Synchronize (unless already done), unscale (fp16), clip (after averaging, so every rank
        clips the same global gradient), then step. Must be called on all ranks. Nothing in it
        waits for the device (fp16: only GradScaler's own read of its inf flag, as in plain torch);
        the norm is kept as a tensor in ``last_grad_norm``."""
        if closure is not None:
            raise ValueError("closures are not supported: a closure would re-run backward after the allreduce")
        with self._phase("optimizer"):
            if self._overlap_step and self._exchange.overlaps_buckets() and self._update.steps_by_bucket(
                    self.scaler, self.max_grad_norm):
                with self._phase("allreduce"):
                    self._exchange.synchronize(on_bucket=self._update.step_params)
                norm = None
            else:
                self.synchronize()  # nothing left to wait for when the script called it already
                norm = self._update.step(self.scaler, self.max_grad_norm, self._exchange.named_params)
        if norm is not None:
            self.last_grad_norm = norm
        self._exchange.end_step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._exchange.end_step()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict) -> None:
        raise RuntimeError("add parameter groups to the optimizer before distrib.wrap(): their gradients "
                           "must be hooked and broadcast on every rank")

    def state_dict(self) -> Dict:
        """The wrapped optimizer's ``state_dict()`` in torch's own format (a plain optimizer of the
        same class loads it), plus the fp16 grad scaler's state under ``"grad_scaler"``."""
        state = self._update.state_dict()
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        if self._powersgd is not None:
            state["powersgd"] = self._powersgd.shared_state_dict()
        return state

    def load_state_dict(self, state: Dict) -> None:
        if "optimizer" in state and "param_groups" not in state:  # distrib <= 0.1 checkpoints
            state = {**state["optimizer"], "grad_scaler": state.get("scaler")}
        scaler = state.get("grad_scaler")
        self._update.load_state_dict({k: v for k, v in state.items() if k not in ("grad_scaler", "powersgd")})
        if scaler:
            self.scaler.load_state_dict(scaler)
        if self._powersgd is not None and "powersgd" in state:
            self._powersgd.load_shared_state_dict(state["powersgd"])

    # Per-rank state that the checkpoint keeps beside the replicated one (CheckpointManager
    # gathers it with the RNG states): PowerSGD's error feedback differs on every rank, and so do
    # local SGD's parameters and inner optimizer state between averages.
    def local_state_dict(self) -> Optional[Dict]:
        if self._powersgd is not None:
            return {"powersgd_error": self._powersgd.error_state_dict()}
        return self._update.local_state_dict()

    def load_local_state_dict(self, state: Optional[Dict], reason: Optional[str] = None) -> None:
        """This rank's saved :meth:`local_state_dict`, or None with the ``reason`` there is none
        (another world size): PowerSGD's error feedback then restarts at zero, local SGD at the
        last average, each with a log line."""
        self._update.load_local_state_dict(state, reason)
        if self._powersgd is None:
            return
        if state is None:
            self._powersgd.restart_error_feedback()
            _LOG.warning("PowerSGD error feedback restarts at zero: %s (the averaged gradients lose the "
                         "residual the old ranks still owed, once)", reason)
        else:
            self._powersgd.load_error_state_dict(state["powersgd_error"])

    def broadcast_state(self, root_rank: int = 0) -> None:
        """Make every rank's parameters, buffers and optimizer state equal to ``root_rank``'s.
        Must be called on all ranks (it is a collective)."""
        self._broadcast(root_rank)
        self._update.restart_from_parameters()  # local SGD: the broadcast parameters are the new anchor

    def _broadcast(self, root_rank: int) -> None:
        broadcast_training_state(self.model, self.optimizer, self._comm, root_rank,
                                 extra_params=self._extra_params)
        if self.scaler.is_enabled():  # the loss scale: a worker that joined late has a fresh one
            scaler_state = self._comm.broadcast_object(self.scaler.state_dict(), root=root_rank,
                                                       name=f"distrib.{self.name}.grad_scaler")
            self.scaler.load_state_dict(scaler_state)

    def adopt_world(self, ctx) -> None:
        """The world changed (elastic: the ring re-formed, see :mod:`distrib.elastic`): forget
        in-flight communication, partial accumulation and the gradients of the abandoned step;
        the old handles are void. PowerSGD starts over (warm-up, initial Q, no error feedback)
        on every rank alike, logged."""
        if ctx.comm is not self._comm:
            raise ValueError("adopt_world() needs the re-formed world of the same engine (ctx.comm is another "
                             "object); wrap the model again for a new engine")
        self.ctx = ctx
        self._comm.clear_broken()
        self._exchange.reset()
        self.optimizer.zero_grad(set_to_none=True)
        if self._powersgd is not None:
            self._powersgd.restart()
            _LOG.warning("PowerSGD restarts after the elastic reset (world size %d): %d plain steps, then "
                         "low-rank from the initial Q with no error feedback", self._comm.size,
                         self._powersgd.config.start_step)

    def close(self) -> None:
        """Remove the gradient and buffer hooks (the model trains locally again)."""
        self._exchange.close()
        if self._buffer_sync is not None:
            self._buffer_sync.close()

    @property
    def _reducer(self):  # for tests and benchmarks that inspect the strategy in use
        return self._exchange.reducer


class ReplicatedUpdate(SharedStateOnly):
    """Plain data parallelism's step: every rank holds the whole optimizer state and steps every
    parameter with the allreduced gradients."""

    shard = None

    def __init__(self, optimizer: torch.optim.Optimizer, make_reducer):
        self.optimizer, self.make_reducer = optimizer, make_reducer
        self._subsets: Dict[tuple, List[List[torch.Tensor]]] = {}  # a bucket's parameter ids -> its part of each group

    def step(self, scaler, max_grad_norm: Optional[float],
             named_params: List[Tuple[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """Unscale (fp16), clip (the norm stays a tensor), step; the norm when clipping, else None."""
        return unscale_clip_step(self.optimizer, scaler, max_grad_norm, named_params)

    def steps_by_bucket(self, scaler, max_grad_norm: Optional[float]) -> bool:
        """Whether stepping the parameters bucket by bucket gives the same numbers as one step:
        for torch's own per-parameter optimizers (exactly these classes: a subclass or another
        optimizer may couple parameters), with nothing that needs every gradient first (clipping's
        global norm, fp16's inf check)."""
        return (type(self.optimizer) in PER_PARAMETER_OPTIMIZERS and max_grad_norm is None
                and not scaler.is_enabled())

    def step_params(self, params: List[torch.Tensor]) -> None:
        """One optimizer step of ``params`` only: each group's parameter list cut to them for the
        call (the state, learning rates and other options stay the group's)."""
        # Keyed by the parameters themselves (they live as long as the model), not by the list that
        # holds them: a reducer rebuilt after reset() makes new lists, which may reuse a dead one's id.
        key = tuple(map(id, params))
        subsets = self._subsets.get(key)
        if subsets is None:
            members = set(params)
            subsets = self._subsets[key] = [[p for p in g["params"] if p in members]
                                            for g in self.optimizer.param_groups]
        groups = self.optimizer.param_groups
        whole = [g["params"] for g in groups]
        try:
            for group, subset in zip(groups, subsets):
                group["params"] = subset
            self.optimizer.step()
        finally:
            for group, params_of_group in zip(groups, whole):
                group["params"] = params_of_group

    def state_dict(self) -> Dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.optimizer.load_state_dict(state)

    def gradient_nbytes(self) -> int:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


_LOG = logging.getLogger("distrib.compression")

# torch's optimizers whose step treats each parameter on its own (no norm or statistic across
# parameters): stepping the parameters in several calls gives the bits of one call.
PER_PARAMETER_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad,
                            torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
                            torch.optim.Adadelta, torch.optim.Rprop)


def overlap_step_enabled() -> bool:
    """Whether to step each bucket's parameters as its average arrives, while the later buckets
    are still in flight: only when ``DISTRIB_OVERLAP_STEP=1``. A candidate, not the default: two
    runs of the network section disagree. One measured it 1.02x, slower in every round, on lm8 at
    1 Gbit/s; the other 0.995x there and 0.94x at 10 Gbit/s (benchmarks/results.md keeps the latter,
    its ``candidate_overlap_step`` row). Both hosts share this machine's two cores, so the
    optimizer's work competes with the transfer's own CPU time; on separate hosts it may pay."""
    forced = os.environ.get("DISTRIB_OVERLAP_STEP", "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"DISTRIB_OVERLAP_STEP={forced!r} must be 0 or 1")
    return forced == "1"


def _untimed(phase: str) -> ContextManager:
    return contextlib.nullcontext()

# Names each wrapped optimizer's collectives; every rank wraps its optimizers in the same
# order, so the n-th wrap has the same name everywhere.
_WRAP_COUNTER = itertools.count()


def optimizer_only_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(name, parameter) for trainable parameters the optimizer steps but the model does not own
    (a learned temperature kept outside the module, say): they are averaged and broadcast too,
    or each rank would step its own copy and the ranks would drift apart."""
    owned = {id(p) for p in model.parameters()}
    return [(f"optimizer.group{g}.param{i}", p)
            for g, group in enumerate(optimizer.param_groups)
            for i, p in enumerate(group["params"]) if id(p) not in owned and p.requires_grad]


def check_powersgd_options(compression: str, powersgd, op: str) -> None:
    if powersgd is not None and compression != "powersgd":
        raise ValueError(f"powersgd= is only used with compression='powersgd' (got compression={compression!r}); "
                         "pass compression='powersgd' too, or drop powersgd=")
    if compression == "powersgd" and op != "average":
        raise ValueError(f"compression='powersgd' needs op='average', got op={op!r}: PowerSGD averages "
                         "low-rank factors, Adasum combines whole gradients")
    if powersgd is not None and type(powersgd).__name__ != "PowerSGD":
        raise ValueError(f"powersgd= takes a distrib.PowerSGD(rank=..., start_step=...), got "
                         f"{type(powersgd).__name__}; e.g. powersgd=distrib.PowerSGD(rank=4)")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx, **options) -> DistributedOptimizer:
    """Make ``optimizer`` data-parallel. Must be called on all ranks, after the model is on
    ``ctx.device``, in the same order on every rank when several models are wrapped.
    Broadcasts rank 0's parameters, buffers and optimizer state. Options: ``accumulate``,
    ``compression`` ("none", "fp16"), ``op`` ("average", "adasum"), ``max_grad_norm``,
    ``precision`` ("fp32", "bf16", "fp16"), ``powersgd`` (a :class:`distrib.PowerSGD` with
    ``compression="powersgd"``: rank, warm-up steps; see :mod:`distrib.compression`), ``local_sgd`` (a
    :class:`distrib.LocalSGD`: local steps, parameters averaged every H; see
    :mod:`distrib.compression.local_sgd`), ``sync_buffers`` (broadcast rank 0's buffers before
    each training forward, as DDP does), ``name`` (of the collectives; default: the wrap's
    ordinal), ``shard`` ("optimizer" or "gradients": ZeRO stages 1 and 2, see
    :mod:`distrib.sharding`; default None, no sharding)."""
    return DistributedOptimizer(model, optimizer, ctx, **options)
