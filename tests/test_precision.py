"""precision="bf16"|"fp16", compression="fp16", op="adasum" (each also with shard= where it is
allowed) and shard="gradients"'s promise, against plain single-process torch.

One launch of 2 workers runs every case of tests/scripts/precision_cases.py (its docstring says
how each reference is built). Each case has a bound on both sides where a silently ignored option
would land inside a one-sided one: fp16 compression must give fp16's rounding (not zero, not more),
autocast must give what torch's autocast gives (not fp32's numbers).
"""
import json

import pytest

from tests.helpers import SCRIPTS, run_launch

SCRIPT = SCRIPTS / "precision_cases.py"
SHARDS = ["none", "optimizer", "gradients"]
FP16_ROUNDOFF = 2.0**-11  # unit roundoff of float16 (bfloat16's is 2**-8)
_runs = {}


def cases(tmp_path_factory):
    """The script's results, run once per test session (MPI: Horovod's Adasum needs it)."""
    if not _runs:
        folder = tmp_path_factory.mktemp("precision")
        run_launch(["-np", "2", "--controller", "mpi"], SCRIPT, ["--out", folder / "results.json", "--run-dir", folder],
                   timeout=300)
        _runs.update(json.loads((folder / "results.json").read_text()))
    assert _runs["size"] == 2
    return _runs["cases"]


def case(tmp_path_factory, name):
    got = cases(tmp_path_factory)[name]
    assert got["error"] is None, got["error"]
    return got


@pytest.mark.multiprocess
@pytest.mark.timeout(360)
@pytest.mark.parametrize("shard", SHARDS)
def test_fp16_compression_sends_float16(shard, tmp_path_factory):
    """Each rank's gradient is (1 + 2**-9, 1 + 2**-12, 1e-9); SGD(lr=1) moves the weights by what
    arrived: float16 keeps the first, rounds the second to 1 and flushes the third to 0."""
    moved = case(tmp_path_factory, f"wire-{shard}")["moved"]
    assert moved == [1 + 2**-9, 1.0, 0.0], f"shard={shard}: the averaged gradient that arrived was {moved}, " \
                                           "not the float16 rounding of the one sent"


@pytest.mark.multiprocess
@pytest.mark.timeout(360)
@pytest.mark.parametrize("shard", SHARDS)
def test_fp16_compression_differs_from_torch_by_fp16_rounding(shard, tmp_path_factory):
    got = case(tmp_path_factory, f"compression-{shard}")
    assert got["reference_moved"] > 0.1
    relative = got["vs_torch"] / got["reference_moved"]
    # not ~1e-16 (compression ignored: that is what the uncompressed run gives) nor more than fp16 rounding
    assert FP16_ROUNDOFF / 10 < relative < 4 * FP16_ROUNDOFF, (
        f"shard={shard}: max |distrib - torch| = {got['vs_torch']:.3g} ({relative:.3g} of how far training moved "
        f"the weights), uncompressed {got['uncompressed_vs_torch']:.3g}: not fp16 rounding")
    assert got["uncompressed_vs_torch"] < 1e-12
    assert got["across_ranks"] == 0.0


@pytest.mark.multiprocess
@pytest.mark.timeout(360)
@pytest.mark.parametrize("shard", SHARDS)
def test_bf16_precision_computes_what_torch_autocast_computes(shard, tmp_path_factory):
    got = case(tmp_path_factory, f"bf16-{shard}")
    assert got["torch_bf16_vs_fp32"] > 1e-4, "bf16 autocast changed nothing: the case proves nothing"
    assert got["vs_torch"] <= 1e-6, (f"shard={shard}: max |distrib - torch autocast bf16| = {got['vs_torch']:.3g} "
                                     f"(torch bf16 vs fp32: {got['torch_bf16_vs_fp32']:.3g})")
    assert got["across_ranks"] == 0.0


@pytest.mark.multiprocess
@pytest.mark.timeout(360)
@pytest.mark.parametrize("shard", SHARDS)
def test_fp16_precision_scales_skips_and_checkpoints_like_torch_gradscaler(shard, tmp_path_factory):
    got = case(tmp_path_factory, f"fp16-{shard}")
    assert got["torch_fp16_vs_fp32"] > 1e-4, "fp16 autocast changed nothing: the case proves nothing"
    assert got["vs_torch"] <= 1e-6, (f"shard={shard}: max |distrib - torch autocast fp16 + GradScaler| = "
                                     f"{got['vs_torch']:.3g}")
    # the overflowing steps were skipped and the scale backed off, step by step as torch's GradScaler
    assert got["scales"] == got["torch_scales"] and got["torch_scales"][-1] < 65536.0, got["scales"]
    assert got["saved_scaler"] == got["torch_scaler"]
    assert got["restored_at"] == 4
    assert got["restored_scaler"] == got["saved_scaler"], "the grad scaler's state did not come back from the checkpoint"
    assert got["across_ranks"] == 0.0


@pytest.mark.multiprocess
@pytest.mark.timeout(360)
def test_adasum_combines_two_ranks_gradients_by_its_formula(tmp_path_factory):
    got = case(tmp_path_factory, "adasum")
    assert got["average_vs_formula"] > 1e-2, "averaging gives the same numbers: the case proves nothing"
    assert got["vs_formula"] <= 1e-10, f"max |distrib - Adasum's formula in plain torch| = {got['vs_formula']:.3g}"
    assert got["across_ranks"] == 0.0


@pytest.mark.multiprocess
@pytest.mark.timeout(360)
@pytest.mark.parametrize("kind", ["compression", "bf16", "fp16"])
def test_stage_2_keeps_no_full_size_gradient_after_the_step(kind, tmp_path_factory):
    assert case(tmp_path_factory, f"{kind}-gradients")["grad_left"] is False, \
        "shard='gradients': a param.grad was not None after step()"
    # without sharding the gradients stay, as in torch: the check can see them
    assert case(tmp_path_factory, f"{kind}-none")["grad_left"] is True
