"""Random number generator state of one process: seed, capture, restore.

A checkpoint holds every rank's RNG state so that a resumed run draws the same dropout masks
and shuffles as the run that was never interrupted.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """Rank ``rank``'s seed for a job seeded with ``seed``: ``seed`` itself on rank 0 (it draws
    what the single-process script draws), an independent stream on every other rank (numpy's
    SeedSequence mixes the pair, so nearby seeds and ranks do not overlap)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """This process's generator states, as plain picklable objects."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
