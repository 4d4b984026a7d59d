"""Sharded, resumable data loading.

Every epoch has one global order: a permutation of the dataset drawn from ``(seed, epoch)``.
Each training step consumes the next *global batch* of ``batch_size * world_size`` samples of
that order, and rank ``r`` takes the ``r``-th contiguous chunk of it. Hence:

* the ranks' shards of an epoch are disjoint and together cover it;
* N workers with batch ``b`` see exactly the samples one worker with batch ``N*b`` sees, step
  for step (the defining property of synchronous data parallelism, tested);
* the position inside the epoch is one number, ``consumed`` (samples of the epoch's order
  consumed by all ranks together). It does not depend on the world size, so a run resumed
  with a different number of workers continues with the first unconsumed sample: nothing is
  seen twice and nothing is skipped.

The order with ``shuffle=False`` is the dataset's own: global batch ``i`` of an epoch is items
``i*G .. (i+1)*G - 1`` (``G`` the global batch) and rank ``r`` takes the ``r``-th contiguous
chunk of it. A dataset whose item ``i*G + c`` is column ``c`` of a token stream at position
``i`` therefore gives every rank the same stream columns step after step (what a model that
carries a hidden state across batches needs; the default ``shuffle=True`` breaks that).

The global batch across a world change: by default each worker keeps its ``batch_size``, so
the global batch follows the number of workers (and :class:`distrib.LRSchedule` rescales the
learning rate). ``keep_global_batch=True`` fixes it at ``batch_size * ctx.size`` of the first
world instead: after an elastic resize (or on a resume with another ``batch_size`` per worker
giving the same global batch) the global batch is re-divided over the workers, so the steps per
epoch, the samples per step and the learning rate stay those of the uninterrupted run. The
global batch must then be divisible by every world size the job takes.

Datasets not divisible by the global batch: with ``drop_last=True`` (the default) the tail
of the epoch's order that cannot fill a global batch is dropped; because the order is
reshuffled every epoch, a different tail is dropped each time. With ``drop_last=False``
the last global batch is completed with samples from the start of the epoch's order (so a
few samples are seen twice in that epoch, as in ``torch.utils.data.DistributedSampler``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List

import torch
from torch.utils.data import DataLoader, Dataset


def epoch_order(dataset_len: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """The global order of one epoch: identical on every rank, reproducible from (seed, epoch)."""
    if not shuffle:
        return list(range(dataset_len))
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(dataset_len, generator=generator).tolist()


def remaining_batches(order: List[int], consumed: int, global_batch: int, drop_last: bool) -> List[List[int]]:
    """The global batches left in an epoch after ``consumed`` samples of ``order``."""
    rest = order[consumed:]
    full, tail = divmod(len(rest), global_batch)
    batches = [rest[i * global_batch:(i + 1) * global_batch] for i in range(full)]
    if tail and not drop_last:
        padding = order[:global_batch - tail]
        batches.append(rest[full * global_batch:] + padding)
    return batches


def rank_slice(global_batch: List[int], rank: int, size: int) -> List[int]:
    """Rank ``rank``'s contiguous chunk of one global batch."""
    per_rank = len(global_batch) // size
    return global_batch[rank * per_rank:(rank + 1) * per_rank]


def eval_shard(dataset_len: int, rank: int, size: int) -> List[int]:
    """Indices for evaluation: every sample exactly once over all ranks, no padding.

    Shards differ in length by at most one; metrics averaged with
    :func:`distrib.evaluate.weighted_mean` weight each rank by its sample count.
    """
    return list(range(rank, dataset_len, size))


def eval_loader(dataset: Dataset, batch_size: int, ctx, **loader_options) -> DataLoader:
    """This rank's part of an evaluation set (:func:`eval_shard`: every sample once over all
    ranks, no padding), as a plain ``DataLoader``. Pass ``ctx`` anew after an elastic resize.
    Average the metrics with :func:`distrib.evaluate`, which weights ranks by sample count."""
    shard = eval_shard(len(dataset), ctx.rank, ctx.size)
    return DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size, **loader_options)


class ShardedLoader:
    """An iterable over this rank's mini-batches, with its position in the epoch as state.

    ``for batch in loader`` yields the rest of the current epoch and then moves to the next
    epoch; :meth:`forever` chains epochs for step-based training. The position advances when
    a batch is handed to the training loop (not when a worker process prefetches it), so a
    checkpoint taken after a step records exactly the samples that were trained on.
    """

    def __init__(self, dataset: Dataset, batch_size: int, ctx, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, collate_fn=None, num_workers: int = 0, pin_memory: bool = False,
                 keep_global_batch: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (per worker), got {batch_size}")
        if len(dataset) < batch_size * ctx.size and drop_last:
            raise ValueError(
                f"dataset has {len(dataset)} samples, fewer than one global batch "
                f"({batch_size} x {ctx.size} workers); lower --batch-size or use more data")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.collate_fn, self.num_workers, self.pin_memory = collate_fn, num_workers, pin_memory
        self.rank, self.size = ctx.rank, ctx.size
        self.epoch = 0
        self.consumed = 0
        self.last_indices: List[int] = []  # this rank's indices of the batch last yielded
        self.keep_global_batch = keep_global_batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.size

    def adopt_world(self, ctx) -> None:
        """Re-shard the rest of the epoch over the world of ``ctx`` (elastic resize). With
        ``keep_global_batch`` the per-worker batch becomes ``global_batch / ctx.size``; raises
        ValueError when the global batch does not divide."""
        if self.keep_global_batch:
            self.batch_size = per_worker_batch(self.global_batch, ctx.size)
        self.rank, self.size = ctx.rank, ctx.size

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self.consumed = epoch, 0

    def __len__(self) -> int:
        """Batches (steps) in one whole epoch at the current world size, the same on every rank.

        It does not shrink as the epoch goes on, so ``epochs * len(loader)`` is a run's length
        even right after a resume; it changes when the world size does (elastic resize).
        """
        full, tail = divmod(len(self.dataset), self.global_batch)
        return full + (1 if tail and not self.drop_last else 0)

    @property
    def batches_left(self) -> int:
        """Batches left in the current epoch (0 once it is used up), the same on every rank."""
        full, tail = divmod(len(self.dataset) - min(self.consumed, len(self.dataset)), self.global_batch)
        return full + (1 if tail and not self.drop_last else 0)

    def _remaining(self) -> List[List[int]]:
        order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        return remaining_batches(order, self.consumed, self.global_batch, self.drop_last)

    def __iter__(self) -> Iterator[Any]:
        global_batches = self._remaining()
        mine = [rank_slice(b, self.rank, self.size) for b in global_batches]
        # A generator of its own: a DataLoader iterator otherwise draws its base seed from the
        # global torch RNG, so a run resumed mid-epoch (one extra iterator) would shift every
        # later random draw (dropout masks) and no longer match the uninterrupted run. The rank
        # is part of it: worker processes (seeded base + worker id) augment differently per rank.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + self.rank * 7_919_117)
        loader = DataLoader(self.dataset, batch_sampler=mine, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, generator=generator)
        for indices, batch in zip(mine, loader):
            self.consumed += self.global_batch
            self.last_indices = indices
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def forever(self) -> Iterator[Any]:
        """Batches across epochs without end, for step-based training loops."""
        while True:
            yielded = False
            for batch in self:
                yielded = True
                yield batch
            if not yielded and len(self) == 0:
                raise ValueError("the dataset yields no full global batch; lower --batch-size")

    def state_dict(self) -> Dict[str, int]:
        """World-size independent position: resumable with any number of workers."""
        state = {"epoch": self.epoch, "consumed": min(self.consumed, len(self.dataset)),
                 "seed": self.seed, "dataset_len": len(self.dataset)}
        if self.keep_global_batch:
            state["global_batch"] = self.global_batch
        return state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["dataset_len"] != len(self.dataset):
            raise ValueError(
                f"the checkpoint's data position is for a dataset of {state['dataset_len']} samples, "
                f"this run's has {len(self.dataset)}; resume with the same data or use --resume none")
        if self.keep_global_batch and state.get("global_batch", self.global_batch) != self.global_batch:
            raise ValueError(
                f"the checkpoint was trained with a global batch of {state['global_batch']} samples and "
                f"keep_global_batch, this run has {self.batch_size} x {self.size} workers = {self.global_batch}; "
                f"use a batch size per worker of {state['global_batch']} / workers, or --resume none")
        self.epoch, self.consumed, self.seed = state["epoch"], state["consumed"], state["seed"]


def per_worker_batch(global_batch: int, size: int) -> int:
    """``global_batch / size``, or ValueError when it does not divide (a constant global batch
    cannot be split into equal per-worker batches, and Horovod's average of the workers'
    gradients is the global batch's only when they are equal)."""
    if global_batch % size:
        raise ValueError(f"keep_global_batch: a global batch of {global_batch} cannot be divided over {size} "
                         f"workers; choose a global batch divisible by every world size the job may take "
                         f"(e.g. a multiple of every number of workers from --min-np to --max-np)")
    return global_batch // size
