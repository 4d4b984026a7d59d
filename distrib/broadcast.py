"""Rank 0's parameters and optimizer state on every rank, without Horovod's hidden step.

``hvd.broadcast_optimizer_state`` initialises an optimizer that has no state yet (every
freshly built one) by giving each parameter a zero gradient and calling ``optimizer.step()``.
That step is not free: with decoupled weight decay (AdamW) it moves the parameters
(``p -= lr * wd * p``), and it counts as Adam's first step, so the first real update is
bias-corrected as the second and comes out ~0.7x too small. The distributed run would then
start from other weights than the single-process script it replaces. Here an empty state is
left empty: there is nothing to copy but the hyper-parameters.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch


def _hyperparameters(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, hvd, root_rank: int = 0) -> None:
    """Make every rank's optimizer state and hyper-parameters equal to ``root_rank``'s.

    Must be called on all ranks (collectives: every rank takes the same branch, decided from
    what all of them hold). Never steps the optimizer.
    """
    has_state = hvd.allgather_object(bool(optimizer.state), name="distrib.optimizer.has_state")
    if not has_state[root_rank]:
        groups = hvd.broadcast_object(_hyperparameters(optimizer), root_rank,
                                      name="distrib.optimizer.hyperparameters")
        optimizer.state.clear()
        for group, options in zip(optimizer.param_groups, groups):
            group.update(options)
    elif all(has_state):
        # Every rank has state of its own (resumed from the same checkpoint, say): Horovod
        # copies it tensor by tensor and, with no empty state anywhere, takes no step.
        hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)
    else:
        # Some ranks have none, and Horovod would step them: send rank 0's state whole.
        state = hvd.broadcast_object(optimizer.state_dict() if hvd.rank() == root_rank else None,
                                     root_rank, name="distrib.optimizer.state")
        if hvd.rank() != root_rank:
            optimizer.load_state_dict(state)


def broadcast_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, hvd,
                             root_rank: int = 0, extra_params=()) -> None:
    """``root_rank``'s parameters, buffers and optimizer state on every rank; ``extra_params``
    are (name, tensor) pairs the optimizer steps outside the model. Must be called on all ranks."""
    hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
    if extra_params:
        hvd.broadcast_parameters([(name, p.detach()) for name, p in extra_params], root_rank=root_rank)
    broadcast_optimizer_state(optimizer, hvd, root_rank)
