"""ShardedLoader: disjoint shards, deterministic reshuffles, resumable across world sizes."""
import pytest
import torch
from torch.utils.data import TensorDataset

from distrib.context import Context
from distrib.data import ShardedLoader, epoch_order, eval_shard, rank_slice, remaining_batches


def ctx(rank, size):
    return Context(rank=rank, size=size, local_rank=0, local_size=1, cross_rank=rank, cross_size=size,
                   device=torch.device("cpu"), controller="gloo")


def dataset(n):
    return TensorDataset(torch.arange(n))


def loaders(n, batch, size, seed=3, **kw):
    return [ShardedLoader(dataset(n), batch, ctx(r, size), seed=seed, **kw) for r in range(size)]


def take(loader, steps):
    out = []
    it = iter(loader)
    for _ in range(steps):
        out.extend(next(it)[0].tolist())
    return out


@pytest.mark.parametrize("n,batch,size", [(100, 4, 1), (100, 4, 2), (103, 5, 3), (64, 8, 4)])
def test_epoch_shards_are_disjoint_and_cover_all_full_global_batches(n, batch, size):
    seen = [sum((b[0].tolist() for b in l), []) for l in loaders(n, batch, size)]
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == (n // (batch * size)) * batch * size
    assert all(len(s) == len(seen[0]) for s in seen)


def test_drop_last_false_pads_the_last_global_batch_from_the_epoch_start():
    ls = loaders(10, 2, 2, drop_last=False)
    seen = [i for l in ls for b in l for i in b[0].tolist()]
    assert set(seen) == set(range(10)) and len(seen) == 12


def test_global_batches_do_not_depend_on_the_world_size():
    # two workers with batch 4 see, step by step, what one worker with batch 8 sees
    one = loaders(64, 8, 1)[0]
    two = loaders(64, 4, 2)
    for b1, b2a, b2b in zip(one, *two):
        assert b1[0].tolist() == b2a[0].tolist() + b2b[0].tolist()


def test_each_epoch_is_reshuffled_deterministically():
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)
    assert epoch_order(50, 2, 0) != epoch_order(50, 1, 0)
    assert sorted(epoch_order(50, 1, 5)) == list(range(50))
    assert epoch_order(5, 1, 0, shuffle=False) == [0, 1, 2, 3, 4]


def test_loader_moves_to_the_next_epoch_after_the_last_batch():
    (l,) = loaders(20, 5, 1)
    first = [b[0].tolist() for b in l]
    assert l.epoch == 1 and l.consumed == 0
    second = [b[0].tolist() for b in l]
    assert first != second and len(first) == len(second) == 4


@pytest.mark.parametrize("old_size,new_size", [(2, 2), (2, 3), (3, 1), (4, 2)])
def test_resume_with_any_world_size_sees_every_sample_of_the_epoch_once(old_size, new_size):
    n, per_rank = 120, 5
    before = loaders(n, per_rank, old_size)
    seen = [i for l in before for i in take(l, 3)]
    state = before[0].state_dict()
    assert all(l.state_dict() == state for l in before)
    after = loaders(n, per_rank, new_size)
    for l in after:
        l.load_state_dict(state)
    seen += [i for l in after for b in l for i in b[0].tolist()]
    tail = (n - 3 * per_rank * old_size) % (per_rank * new_size)
    assert len(seen) == len(set(seen)) == n - tail


def test_forever_crosses_epochs_and_state_counts_consumed_samples():
    (l,) = loaders(12, 3, 1)
    it = l.forever()
    for _ in range(5):
        next(it)
    assert l.state_dict()["epoch"] == 1 and l.state_dict()["consumed"] == 3


def test_state_from_another_dataset_is_rejected_with_a_clear_error():
    (l,) = loaders(12, 3, 1)
    state = l.state_dict()
    (other,) = loaders(13, 3, 1)
    with pytest.raises(ValueError, match="dataset of 12 samples, this run's has 13"):
        other.load_state_dict(state)


def test_bad_batch_sizes_are_rejected():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ShardedLoader(dataset(10), 0, ctx(0, 1))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedLoader(dataset(10), 4, ctx(0, 3))


def test_pure_helpers():
    assert remaining_batches(list(range(10)), 4, 4, drop_last=True) == [[4, 5, 6, 7]]
    assert remaining_batches(list(range(10)), 4, 4, drop_last=False) == [[4, 5, 6, 7], [8, 9, 0, 1]]
    assert rank_slice([1, 2, 3, 4, 5, 6], 1, 3) == [3, 4]
    assert sorted(eval_shard(7, 0, 3) + eval_shard(7, 1, 3) + eval_shard(7, 2, 3)) == list(range(7))


def test_iterating_does_not_touch_the_global_torch_rng():
    (l,) = loaders(20, 5, 1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(l))
    assert torch.equal(torch.rand(3), expected)


def test_len_is_the_whole_epoch_after_a_resume_and_follows_the_world_size():
    """len(loader) counts the epoch's batches, not those left: a progress total computed as
    epochs * len(loader) right after a resume is right (it used to shrink with the position)."""
    before = loaders(100, 5, 2)[0]
    take(before, 3)
    state = before.state_dict()
    after = loaders(100, 5, 2)[0]
    after.load_state_dict(state)
    assert len(after) == len(before) == 10 and after.batches_left == 7
    assert len([b for b in after]) == 7 and after.batches_left == 10  # the next epoch, untouched
    after.adopt_world(ctx(0, 1))  # an elastic shrink to one worker: the epoch has twice the steps
    assert len(after) == 20
    padded = loaders(103, 5, 2, drop_last=False)[0]
    assert len(padded) == 11 and padded.batches_left == 11
