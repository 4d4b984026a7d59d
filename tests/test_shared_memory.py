"""The torch engine's allreduce through shared memory on one host (distrib/comm/shared_memory.py).

With 3 real workers under torchrun: the reduced buffers against plain torch sums of every rank's
inputs, the same bits on every rank, and no file left in /dev/shm. In one process: how the sum
is split among the ranks, and the fallback when there is no /dev/shm. (The equivalence matrix
runs the whole step through it on 2 workers against single-process torch.)"""
import json
import logging

import pytest
import torch

from distrib.comm import LocalComm
from distrib.comm import shared_memory
from distrib.comm.shared_memory import SharedMemoryTransport, slice_bounds
from tests.helpers import SCRIPTS, run_torchrun


@pytest.mark.parametrize("start, end, parts, element_size, expected", [
    (0, 1001, 2, 4, [0, 496, 1001]),             # 16 float32 per 64-byte line: slices start on a line
    (0, 1001, 3, 4, [0, 336, 672, 1001]),
    (0, 10, 3, 4, [0, 0, 0, 10]),                # less than a line: one rank sums it all
    (301, 1001, 2, 8, [301, 653, 1001]),         # a later range (split reduction), float64
    (5, 5, 2, 4, [5, 5, 5]),                     # nothing to sum
])
def test_the_sum_is_split_into_cache_line_slices_one_per_rank(start, end, parts, element_size, expected):
    bounds = slice_bounds(start, end, parts, element_size)
    assert bounds == expected
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))


def test_without_dev_shm_every_rank_keeps_the_engines_allreduce_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(shared_memory, "SHM_DIR", str(tmp_path / "no-such-dir"))
    with caplog.at_level(logging.WARNING, logger="distrib.comm.shared_memory"):
        assert SharedMemoryTransport.open(LocalComm(), 100, torch.float32, name="t") is None
    assert "does not exist" in caplog.text


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_three_workers_sum_and_average_through_shared_memory_as_torch_does(tmp_path):
    out = tmp_path / "shm.json"
    run_torchrun(3, SCRIPTS / "shm_allreduce.py", ["--out", out], timeout=240)
    results = json.loads(out.read_text())
    assert results["size"] == 3
    assert len(results["rounds"]) == 8
    for r in results["rounds"]:
        what = f"{r['dtype']} {r['op']} split={r['split']}"
        assert r["error"] <= r["tolerance"], f"{what}: max |shared memory - torch| = {r['error']:.3g}"
        assert len(set(r["digests"])) == 1, f"{what}: the ranks hold different bits"
        assert r["left_behind"] == [], f"{what}: {r['left_behind']} still in /dev/shm"
