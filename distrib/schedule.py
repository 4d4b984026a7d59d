"""Learning-rate scaling with the world size, with warm-up and decay.

The learning rate is a pure function of (step, world size), so a run resumed on a different
number of workers follows the new size: the state saved in a checkpoint is only the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

SCALINGS = ("linear", "sqrt", "none")
DECAYS = ("cosine", "linear", "constant")


def scaled_lr(base_lr: float, world_size: int, scaling: str = "linear") -> float:
    """``base_lr`` is tuned for one worker; the global batch grows with the world size.

    "linear" (Goyal et al., 2017) multiplies by the world size, "sqrt" by its square root
    (common for Adam), "none" keeps it.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"lr scaling {scaling!r} is not one of {', '.join(SCALINGS)}")
    factor = {"linear": world_size, "sqrt": math.sqrt(world_size), "none": 1.0}[scaling]
    return base_lr * factor


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "cosine", min_factor: float = 0.1) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up from ~0, then decay
    to ``min_factor`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_factor + (1.0 - min_factor) * shape


@dataclass
class LRSchedule:
    """Sets the optimizer's learning rate each step. ``optimizer`` may be a torch optimizer or
    a :class:`distrib.DistributedOptimizer` (anything with ``param_groups``).

    The peak rate is ``base_lr`` (tuned for one worker) scaled for ``world_size`` by
    ``scaling``; it warms up linearly over ``warmup_steps`` and then decays (``cosine``,
    ``linear``) to a tenth at ``total_steps``, or stays (``constant``, which needs no
    ``total_steps``). Call :meth:`step` once per optimizer step (:class:`distrib.Run` does).
    Its checkpointed state is the step count only.
    """

    optimizer: object
    base_lr: float
    world_size: int
    total_steps: Optional[int] = None
    warmup_steps: int = 0
    scaling: str = "linear"
    decay: str = "cosine"
    step_count: int = 0

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"lr decay {self.decay!r} is not one of {', '.join(DECAYS)}")
        if self.total_steps is None and self.decay != "constant":
            raise ValueError(f"lr decay {self.decay!r} needs total_steps (when it reaches its end); give "
                             "total_steps, or decay='constant'")
        if self.warmup_steps < 0 or (self.total_steps is not None and self.total_steps < 1):
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {self.warmup_steps}, {self.total_steps}")
        self.peak_lr = scaled_lr(self.base_lr, self.world_size, self.scaling)
        self._apply()

    @property
    def lr(self) -> float:
        total = self.total_steps if self.total_steps is not None else self.warmup_steps
        return self.peak_lr * lr_factor(self.step_count, self.warmup_steps, total, self.decay)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def adopt_world(self, ctx) -> None:
        """Follow an elastic resize to ``ctx.size`` workers: the peak learning rate is rescaled
        by the same policy."""
        self.world_size = ctx.size
        self.peak_lr = scaled_lr(self.base_lr, ctx.size, self.scaling)
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def state_dict(self) -> Dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step_count = state["step_count"]
        self._apply()


def is_plateau(scheduler) -> bool:
    """A scheduler stepped with a metric (after evaluations), not once per step or epoch."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def check_lr_scheduler(lr_scheduler, every: str, schedule) -> None:
    """``distrib.Run``'s torch-scheduler arguments; ValueError naming the fix."""
    if lr_scheduler is None:
        return
    if schedule is not None:
        raise ValueError("give Run either schedule= (a distrib.LRSchedule) or lr_scheduler= (a torch scheduler), "
                         "not both: each sets the learning rate")
    if not (callable(getattr(lr_scheduler, "step", None)) and callable(getattr(lr_scheduler, "state_dict", None))):
        raise ValueError(f"lr_scheduler must be a torch LR scheduler (step/state_dict), got {type(lr_scheduler).__name__}")
    if every not in ("step", "epoch"):
        raise ValueError(f"lr_scheduler_every must be 'step' or 'epoch', got {every!r}")
