"""Sharded optimizer state in one process, on real files: cut for one world size, re-cut for
another from the global offsets (reading only the overlapping shard files), consolidated back to
torch's own state dict, bit for bit."""
import pytest
import torch

from distrib.checkpoint import sharded
from distrib.sharding.optimizer import ZeroShard

BUCKET_BYTES = 64  # several buckets, parameters straddling ranks


def model_and_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(4, 5)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt.state_dict()


def shard(model, rank, world, state=None):
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    if state is not None:
        opt.load_state_dict(state)
    return ZeroShard(opt, None, rank, world, name="test", bucket_bytes=BUCKET_BYTES)


def save_sharded(model, full, world, folder):
    """What CheckpointManager writes for a run of ``world`` sharded ranks: each rank's pieces in
    its own file, the rest once."""
    entries = [shard(model, r, world, full).state_dict() for r in range(world)]
    for rank, entry in enumerate(entries):
        torch.save({"optimizer": entry["pieces"]}, folder / sharded.shard_file(rank))
    return sharded.strip({"optimizer": entries[0]})["optimizer"]


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for index in a:
        assert a[index].keys() == b[index].keys()
        for key in a[index]:
            assert torch.equal(a[index][key], b[index][key]), (index, key)


@pytest.mark.parametrize("saved_world,new_world", [(2, 3), (3, 1), (2, 2), (1, 4)])
def test_recut_for_another_world_size_gives_each_rank_exactly_its_slice(tmp_path, saved_world, new_world):
    model, full = model_and_state()
    entry = save_sharded(model, full, saved_world, tmp_path)
    assert "pieces" not in entry and entry["world_size"] == saved_world
    for rank in range(new_world):
        z = shard(model, rank, new_world)
        z.load_state_dict(sharded.recut(entry, tmp_path, "optimizer", z.owned_ranges()))
        mine = z.state_dict()["pieces"]
        assert [(p["index"], p["start"], p["end"]) for p in mine] == z.owned_ranges()
        for p in mine:
            whole = full["state"][p["index"]]
            assert torch.equal(p["state"]["step"], whole["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(p["state"][key], whole[key].reshape(-1)[p["start"]:p["end"]]), (rank, p)


def test_a_rank_reads_only_the_shard_files_that_overlap_its_elements(tmp_path):
    model, full = model_and_state()
    entry = save_sharded(model, full, 4, tmp_path)
    z = shard(model, 0, 2)  # rank 0 of 2 owns the first half of every bucket: old ranks 0 and 1
    assert sharded._overlapping_ranks(entry, z.owned_ranges()) == [0, 1]
    (tmp_path / sharded.shard_file(3)).unlink()  # a file it does not need may even be gone
    sharded.recut(entry, tmp_path, "optimizer", z.owned_ranges())


def test_consolidate_gives_back_torchs_state_dict_bit_for_bit(tmp_path):
    model, full = model_and_state()
    entry = save_sharded(model, full, 3, tmp_path)
    consolidated = sharded.consolidate_entry(entry, tmp_path, "optimizer")
    assert_state_equal(consolidated["state"], full["state"])
    assert consolidated["param_groups"] == full["param_groups"]
    plain = torch.optim.AdamW(model.parameters())
    plain.load_state_dict(consolidated)  # a plain torch optimizer takes it as is
    assert plain.param_groups[0]["weight_decay"] == 0.1


def test_a_shard_cut_for_another_rank_is_refused_with_the_way_out(tmp_path):
    model, full = model_and_state()
    other = shard(model, 1, 2, full).state_dict()
    with pytest.raises(ValueError, match="rank 0 of 2 does not own; load it through distrib.checkpoint"):
        shard(model, 0, 2).load_state_dict(other)
