"""Rank 0's parameters and optimizer state on every rank, without Horovod's hidden step.

``hvd.broadcast_optimizer_state`` initialises an optimizer that has no state yet (every
freshly built one) by giving each parameter a zero gradient and calling ``optimizer.step()``.
That step is not free: with decoupled weight decay (AdamW) it moves the parameters
(``p -= lr * wd * p``), and it counts as Adam's first step, so the first real update is
bias-corrected as the second and comes out ~0.7x too small. The distributed run would then
start from other weights than the single-process script it replaces. Here an empty state is
left empty: there is nothing to copy but the hyper-parameters. Every collective goes through
the engine's ``comm`` (:mod:`distrib.comm`).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch


def _hyperparameters(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, comm, root_rank: int = 0) -> None:
    """Make every rank's optimizer state and hyper-parameters equal to ``root_rank``'s.

    Must be called on all ranks (collectives: every rank takes the same branch, decided from
    what all of them hold). Never steps the optimizer.
    """
    has_state = comm.allgather_object(bool(optimizer.state), name="distrib.optimizer.has_state")
    if not has_state[root_rank]:
        groups = comm.broadcast_object(_hyperparameters(optimizer), root=root_rank,
                                       name="distrib.optimizer.hyperparameters")
        optimizer.state.clear()
        for group, options in zip(optimizer.param_groups, groups):
            group.update(options)
    elif all(has_state):
        # Every rank has state of its own (resumed from the same checkpoint, say): the tensors
        # are copied in place, one broadcast each; hyper-parameters and plain values as one object.
        _broadcast_existing_state(optimizer, comm, root_rank)
    else:
        # Some ranks have none: send rank 0's state whole.
        state = comm.broadcast_object(optimizer.state_dict() if comm.rank == root_rank else None,
                                      root=root_rank, name="distrib.optimizer.state")
        if comm.rank != root_rank:
            optimizer.load_state_dict(state)


def _broadcast_existing_state(optimizer: torch.optim.Optimizer, comm, root_rank: int) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    states = [optimizer.state.get(p, {}) for p in params]
    plain = comm.broadcast_object(
        {"groups": _hyperparameters(optimizer),
         "values": [{k: v for k, v in s.items() if not torch.is_tensor(v)} for s in states]},
        root=root_rank, name="distrib.optimizer.plain_state")
    for group, options in zip(optimizer.param_groups, plain["groups"]):
        group.update(options)
    for state, values in zip(states, plain["values"]):
        state.update(values)
    tensors = [(f"{i}.{key}", value) for i, s in enumerate(states) for key, value in sorted(s.items())
               if torch.is_tensor(value)]
    comm.broadcast_tensors(tensors, root=root_rank, prefix="distrib.optimizer.state")


def broadcast_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, comm,
                             root_rank: int = 0, extra_params=()) -> None:
    """``root_rank``'s parameters, buffers and optimizer state on every rank; ``extra_params``
    are (name, tensor) pairs the optimizer steps outside the model. Must be called on all ranks."""
    comm.broadcast_tensors(sorted(model.state_dict().items()), root=root_rank, prefix="distrib.model")
    if extra_params:
        comm.broadcast_tensors([(name, p.detach()) for name, p in extra_params], root=root_rank,
                               prefix="distrib.extra")
    broadcast_optimizer_state(optimizer, comm, root_rank)
