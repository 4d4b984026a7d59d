"""Crash-safe, asynchronous, validated checkpoints and exact resume.

    from distrib.checkpoint import CheckpointManager, CheckpointError
    ckpt = CheckpointManager(run_dir, ctx, keep=3, async_save=True)
    step = ckpt.restore(state, resume="auto", model_config=cfg)   # all ranks; None = fresh start
    ckpt.save(step, state, model_config=cfg)                      # all ranks, at step boundaries
    ckpt.close()                                                  # all ranks: flush, raise failures

``state`` maps names to objects with ``state_dict()/load_state_dict()`` (model, optimizer,
scheduler, scaler, loader) or to dicts of plain values (``"extra"``). The on-disk format is
in :mod:`distrib.checkpoint.store`, the state handling in :mod:`distrib.checkpoint.state`.
"""
from distrib.checkpoint.manager import CheckpointManager
from distrib.checkpoint.store import CheckpointError, DamagedCheckpoint, checkpoints_dir, newest_valid, validate

__all__ = ["CheckpointManager", "CheckpointError", "DamagedCheckpoint", "checkpoints_dir", "newest_valid", "validate"]
