"""Local SGD and DiLoCo: ``distrib.wrap(..., local_sgd=distrib.LocalSGD(every=H, ...))``.

For links where even low-rank gradients cost too much: every rank steps its own optimizer on
its own gradients (no communication at all in backward or step), and every ``every`` steps the
ranks average their parameters, one allreduce of the whole model (``every`` times fewer bytes
per step than data parallelism). The average goes through an *outer* optimizer (DiLoCo, Douillard
et al. 2023): the ranks start each round from the same *anchor* parameters, and after the round::

    delta  = anchor - mean_ranks(params)     # the pseudo-gradient: what the round moved, on average
    anchor = outer_sgd_step(anchor, delta)   # SGD with outer_lr, outer_momentum, nesterov
    params = anchor                          # on every rank

``outer_lr=1`` without momentum is plain local SGD (the anchor becomes the average); with
``every=1`` and an inner SGD (momentum and weight decay included: all linear) that is ordinary
data parallelism, exactly. DiLoCo's setting: an inner AdamW, ``LocalSGD.diloco(every)`` (outer
Nesterov, lr 0.7, momentum 0.9).

This is the optimizer's *update* part (:class:`LocalSGDUpdate`, chosen in ``wrap()`` instead of
:class:`distrib.step.optim.ReplicatedUpdate`), and its reducer (:class:`LocalReducer`) moves nothing.
What the checkpoint keeps: the anchor, the outer optimizer's state and the step count with the
optimizer's state (the same on every rank); each rank's own parameters and inner optimizer state
in the per-rank file (they differ between averages). At another world size the per-rank part
belongs to ranks that are not there: every rank restarts from the anchor (the last average) with
rank 0's inner optimizer state, the averages stay on the same steps, and a log line says so.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from distrib.step.gradients import unscale_clip_step

_LOG = logging.getLogger("distrib.compression")


@dataclasses.dataclass(frozen=True)
class LocalSGD:
    """Configuration of ``distrib.wrap(..., local_sgd=LocalSGD(...))``.

    ``every``: optimizer steps between two averages (H; 1 averages after every step).
    ``outer_lr``, ``outer_momentum``, ``nesterov``: the outer SGD applied to the averaged
    pseudo-gradient (1, 0, False: the anchor becomes the plain average).
    """
    every: int = 8
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"LocalSGD every must be an int >= 1 (steps between averages), got {self.every!r}; "
                             "try every=8")
        if not self.outer_lr > 0:
            raise ValueError(f"LocalSGD outer_lr must be > 0, got {self.outer_lr!r}; 1.0 is plain local SGD")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"LocalSGD outer_momentum must be in [0, 1), got {self.outer_momentum!r}; "
                             "try 0.9 (DiLoCo) or 0")
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("LocalSGD nesterov=True needs outer_momentum > 0; e.g. LocalSGD.diloco(every=...)")

    @classmethod
    def diloco(cls, every: int = 100, outer_lr: float = 0.7, outer_momentum: float = 0.9) -> "LocalSGD":
        """DiLoCo's outer optimizer (Nesterov momentum 0.9, lr 0.7); use an inner AdamW."""
        return cls(every=every, outer_lr=outer_lr, outer_momentum=outer_momentum, nesterov=True)


def check_local_sgd(config, ctx, *, compression: str, shard, op: str, precision: str) -> None:
    """ValueError unless ``local_sgd=config`` combines with the other ``wrap()`` options."""
    if config is None:
        return
    if not isinstance(config, LocalSGD):
        raise ValueError(f"local_sgd= takes a distrib.LocalSGD(every=...), got {type(config).__name__}; "
                         "e.g. local_sgd=distrib.LocalSGD(every=8)")
    for bad, why in ((compression != "none", f"compression={compression!r} (nothing is sent per step)"),
                     (shard is not None, f"shard={shard!r} (every rank steps its whole model)"),
                     (op != "average", f"op={op!r} (parameters are averaged)"),
                     (precision == "fp16", "precision='fp16' (each rank's loss scale would drift apart; use bf16)")):
        if bad:
            raise ValueError(f"local_sgd= does not combine with {why}; drop one of the two")
    if ctx.elastic:
        raise ValueError("local_sgd= cannot run under Horovod Elastic (a worker that joins has no anchor or round "
                         "of its own); run without --elastic: the job resumes from its checkpoints on any size")


class LocalReducer:
    """The gradient exchange's reducer when nothing travels per step: gradients stay this rank's.
    Parameters without a gradient here are reported unused (so they get ``grad = None``)."""

    def __init__(self):
        self._unused: List[torch.Tensor] = []

    def grad_ready(self, p: torch.Tensor, used: bool = True) -> None:
        if not used:
            self._unused.append(p)

    def synchronize(self) -> FrozenSet[torch.Tensor]:
        unused, self._unused = frozenset(self._unused), []
        return unused

    def in_flight(self) -> bool:
        return False


class LocalSGDUpdate:
    """Each rank steps its optimizer alone; every ``config.every`` steps the parameters are
    averaged through the outer optimizer. Built after rank 0's state was broadcast, so the
    first anchor is the same on every rank."""

    shard = None

    def __init__(self, optimizer: torch.optim.Optimizer, named_params: List[Tuple[str, torch.Tensor]], comm,
                 config: LocalSGD, *, prefix: str):
        self.optimizer, self.config, self._comm, self._prefix = optimizer, config, comm, prefix
        self.params = [p for _, p in named_params]
        self.anchor = [p.detach().clone() for p in self.params]
        self.outer = torch.optim.SGD(self.anchor, lr=config.outer_lr, momentum=config.outer_momentum,
                                     nesterov=config.nesterov)
        self.steps = 0  # optimizer steps taken (decides when to average; the same on every rank)
        # one flat buffer per dtype: one allreduce each, whatever the number of tensors
        self._by_dtype: Dict[torch.dtype, List[int]] = {}
        for i, p in enumerate(self.params):
            self._by_dtype.setdefault(p.dtype, []).append(i)

    @staticmethod
    def make_reducer() -> LocalReducer:
        return LocalReducer()

    @staticmethod
    def steps_by_bucket(scaler, max_grad_norm: Optional[float]) -> bool:
        return False  # no gradient travels: each rank steps on its own

    def step(self, scaler, max_grad_norm: Optional[float],
             named_params: List[Tuple[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """Clip this rank's own gradient (the ranks do not share it), step; every ``every``-th
        step also average. Must be called on all ranks; the local norm when clipping, else None."""
        norm = unscale_clip_step(self.optimizer, scaler, max_grad_norm, named_params)
        self.steps += 1
        if self.steps % self.config.every == 0:
            self.average()
        return norm

    @torch.no_grad()
    def average(self) -> None:
        """The outer step on the mean of every rank's parameters; every rank ends with the new
        anchor. Must be called on all ranks (one allreduce per parameter dtype)."""
        for dtype, members in self._by_dtype.items():
            flat = torch.cat([self.params[i].reshape(-1) for i in members])
            self._comm.allreduce_async_(flat, name=f"{self._prefix}.local_sgd.{str(dtype)[6:]}").wait()
            at = 0
            for i in members:
                n = self.params[i].numel()
                a = self.anchor[i]
                a.grad = a - flat[at:at + n].view_as(a)  # the pseudo-gradient
                at += n
        self.outer.step()
        for p, a in zip(self.params, self.anchor):
            p.copy_(a)
            a.grad = None

    @torch.no_grad()
    def restart_from_parameters(self) -> None:
        """The parameters (equal on every rank: just broadcast) become the anchor; the outer
        momentum and the step count are kept."""
        for p, a in zip(self.params, self.anchor):
            a.copy_(p)

    # -- what a checkpoint keeps --------------------------------------------------------------
    def state_dict(self) -> Dict:
        """The inner optimizer's state (this rank's; rank 0's is what a checkpoint saves) and,
        under ``"local_sgd"``, what every rank holds alike: anchor, outer state, step count."""
        return {**self.optimizer.state_dict(),
                "local_sgd": {"steps": self.steps, "anchor": [a.detach().clone() for a in self.anchor],
                              "outer": copy.deepcopy(self.outer.state_dict())}}

    def load_state_dict(self, state: Dict) -> None:
        state = dict(state)
        mine = state.pop("local_sgd", None)
        self.optimizer.load_state_dict(state)
        if mine is None:  # a checkpoint of plain data parallelism: its parameters are the anchor
            self.restart_from_parameters()
            return
        if [tuple(a.shape) for a in mine["anchor"]] != [tuple(a.shape) for a in self.anchor]:
            raise ValueError("the checkpoint's local SGD anchor is of another model; resume with the same model")
        with torch.no_grad():
            for a, saved in zip(self.anchor, mine["anchor"]):
                a.copy_(saved)
        self.outer.load_state_dict(mine["outer"])
        self.steps = int(mine["steps"])

    def local_state_dict(self) -> Dict:
        """This rank's own parameters and inner optimizer state (they differ between averages)."""
        return {"local_sgd_params": [p.detach().clone() for p in self.params],
                "local_sgd_inner": copy.deepcopy(self.optimizer.state_dict())}

    def load_local_state_dict(self, state: Optional[Dict], reason: Optional[str] = None) -> None:
        """This rank's saved :meth:`local_state_dict`; None (another world size, ``reason``):
        restart this round from the anchor, with rank 0's inner optimizer state, logged."""
        with torch.no_grad():
            if state is None:
                for p, a in zip(self.params, self.anchor):
                    p.copy_(a)
                _LOG.warning("local SGD restarts from the last average: %s (each rank's progress of the %d steps "
                             "since that average is dropped; every rank continues from it with rank 0's optimizer "
                             "state)", reason, self.steps % self.config.every)
                return
            for p, saved in zip(self.params, state["local_sgd_params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["local_sgd_inner"])

    def gradient_nbytes(self) -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
