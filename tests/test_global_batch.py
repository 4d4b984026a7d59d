"""ShardedLoader(keep_global_batch=True): the global batch survives a world change (pure, one
process), and logged metrics averaged over the workers / tokens per second (MetricsLogger)."""
import io
import json

import pytest
import torch

import distrib
from distrib.metrics import MetricsLogger, mean_over_ranks
from tests.checkpoint_fixtures import cpu_ctx

SAMPLES = 48


def loaders(size, batch, **kw):
    data = torch.utils.data.TensorDataset(torch.arange(SAMPLES))
    return [distrib.ShardedLoader(data, batch, cpu_ctx(r, size), seed=1, **kw) for r in range(size)]


def global_steps(loaders_, steps):
    """The samples of the next ``steps`` global batches, rank by rank, as the world takes them."""
    its = [iter(loader.forever()) for loader in loaders_]
    return [torch.cat([next(it)[0] for it in its]).tolist() for _ in range(steps)]


def test_a_shrink_re_divides_the_global_batch_and_every_sample_comes_once():
    reference = global_steps(loaders(4, 2, keep_global_batch=True), 12)  # 2 epochs of 6 steps of 8
    world = loaders(4, 2, keep_global_batch=True)
    first = global_steps(world, 4)
    survivors = world[:2]  # 4 -> 2 workers mid-epoch: the position moves with them
    for rank, loader in enumerate(survivors):
        loader.adopt_world(cpu_ctx(rank, 2))
    assert [loader.batch_size for loader in survivors] == [4, 4]
    assert survivors[0].global_batch == 8 and len(survivors[0]) == 6 and survivors[0].batches_left == 2
    rest = global_steps(survivors, 8)
    assert first + rest == reference  # the same global batches, step for step
    assert sorted(sum(reference[:6], [])) == list(range(SAMPLES))  # each sample once per epoch


def test_without_it_the_global_batch_follows_the_world():
    world = loaders(2, 4)
    world[0].adopt_world(cpu_ctx(0, 1))
    assert world[0].global_batch == 4 and len(world[0]) == SAMPLES // 4


def test_a_global_batch_that_does_not_divide_is_one_clear_error():
    loader = loaders(2, 4, keep_global_batch=True)[0]
    with pytest.raises(ValueError, match="global batch of 8 cannot be divided over 3 workers"):
        loader.adopt_world(cpu_ctx(0, 3))


def test_resume_checks_the_global_batch():
    saved = loaders(2, 4, keep_global_batch=True)[0].state_dict()
    assert saved["global_batch"] == 8
    one = loaders(1, 8, keep_global_batch=True)[0]
    one.load_state_dict(saved)  # 8 x 1 = 4 x 2
    with pytest.raises(ValueError, match="global batch of 8 samples .* this run has 4 x 1 workers = 4"):
        loaders(1, 4, keep_global_batch=True)[0].load_state_dict(saved)


def test_logged_metrics_averaged_over_ranks_and_tokens_per_second(tmp_path):
    gathered = [{"loss": 1.0, "acc": 0.5}, {"loss": 3.0}]
    assert mean_over_ranks(gathered) == {"loss": 2.0, "acc": 0.5}
    seen = []

    def average(means):  # what Run gathers over the workers, here the other rank logged 4.0
        seen.append(means)
        return mean_over_ranks([means, {"loss": 4.0}])

    clock = iter(range(100))
    log = MetricsLogger(tmp_path, cpu_ctx(), total_steps=4, log_every=2, global_batch=8, stream=io.StringIO(),
                        clock=lambda: float(next(clock)), average=average, tokens_per_sample=16)
    for step, loss in enumerate([1.0, 3.0, 5.0, 7.0], start=1):
        log.step(step, loss=loss)
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert seen == [{"loss": 2.0}, {"loss": 6.0}]  # this rank's window means went in
    assert [r["loss"] for r in records] == [3.0, 5.0]
    assert all(r["tokens_per_s"] == 16 * r["samples_per_s"] for r in records)
