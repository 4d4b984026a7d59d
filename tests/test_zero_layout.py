"""The ZeRO partition as pure functions: every element owned exactly once, balanced chunks,
buckets per dtype and param group, pieces at the right offsets; and what wrap(shard=...) refuses."""
import dataclasses

import pytest
import torch

from distrib.sharding import layout as lay
from distrib.sharding.optimizer import check_supported


def cover(buckets, world, numels):
    """Element ownership counts per parameter, from every rank's pieces."""
    seen = {i: [0] * n for i, n in numels.items()}
    for rank in range(world):
        for index, start, end in lay.owned(buckets, rank):
            for e in range(start, end):
                seen[index][e] += 1
    return seen


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("bucket_bytes", [8, 40, 10**6])
def test_every_element_is_owned_by_exactly_one_rank_and_chunks_are_balanced(world, bucket_bytes):
    numels = [7, 1, 13, 4, 9, 2]
    buckets = lay.plan(numels, ["f32"] * len(numels), [4] * len(numels), world, bucket_bytes)
    assert sorted(i for b in buckets for i in b.members) == list(range(len(numels)))
    assert all(c == [1] * len(c) for c in cover(buckets, world, dict(enumerate(numels))).values())
    for b in buckets:
        per_rank = [sum(p.numel for p in b.pieces(r)) for r in range(world)]
        assert max(per_rank) == b.chunk and b.chunk * world - b.total < world  # padding < one element per rank
        for r in range(world):  # pieces sit back to back in the rank's chunk
            at = 0
            for p in b.pieces(r):
                assert p.at == at
                at += p.numel


def test_buckets_never_mix_param_groups_or_dtypes_and_follow_the_given_indices():
    keys = [("f32", 0), ("f32", 1), ("f32", 0), ("f64", 0)]
    buckets = lay.plan([3, 3, 3, 3], keys, [4, 4, 4, 8], 2, 10**6, indices=[10, 11, 12, 13])
    assert sorted(sorted(b.members) for b in buckets) == [[10, 12], [11], [13]]


def test_a_parameter_split_between_two_ranks():
    (b,) = lay.plan([5, 4], ["k", "k"], [4, 4], 2, 10**6)
    # reverse registration order: parameter 1 (4 elements) first, then parameter 0; chunk = 5
    assert b.members == (1, 0) and b.chunk == 5
    assert b.pieces(0) == [lay.Piece(1, 0, 4, 0), lay.Piece(0, 0, 1, 4)]
    assert b.pieces(1) == [lay.Piece(0, 1, 5, 0)]


def test_optimizers_with_per_tensor_state_are_refused_in_one_line():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for ok in (torch.optim.AdamW(p), torch.optim.Adam(p), torch.optim.SGD(p, lr=0.1, momentum=0.9),
               torch.optim.RMSprop(p)):
        check_supported(ok)
    with pytest.raises(ValueError, match=r"^shard= needs an optimizer whose state is per parameter element .*"
                                         r"Adafactor is not one of them: use shard=None$"):
        check_supported(torch.optim.Adafactor(p))  # factored (row and column) moments


@pytest.mark.parametrize("options,message", [
    ({"shard": "everything"}, r"^shard='everything' is not one of optimizer, gradients \(or None: no sharding\)$"),
    ({"shard": "gradients", "op": "adasum"}, r"^shard= needs op='average', got op='adasum': .*"),
    ({"shard": "optimizer", "elastic": True}, r"^shard= cannot run under Horovod Elastic: a worker that dies takes "
                                              r"its optimizer shard with it .*"),
])
def test_wrap_refuses_what_cannot_be_sharded_in_one_line(options, message):
    from distrib import wrap
    from tests.checkpoint_fixtures import cpu_ctx
    ctx = cpu_ctx()
    if options.pop("elastic", False):
        ctx = dataclasses.replace(ctx, elastic=True)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=message) as raised:
        wrap(model, torch.optim.AdamW(model.parameters()), ctx, **options)
    assert "\n" not in str(raised.value)
