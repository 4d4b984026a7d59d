"""The wrapped optimizer computes what single-process PyTorch computes, case by case.

One launch per engine and controller (2 real workers: Horovod over MPI and over Gloo through our
launcher, and the torch engine under torchrun, whose gradients meet in shared memory on one host,
and again on its path across hosts, Gloo's allreduce (DISTRIB_SHM=0), with the opt-in optimizer
step per bucket as its average arrives (DISTRIB_OVERLAP_STEP=1) and buckets of 128 bytes so that
there are several) runs every case of
tests/scripts/equivalence_matrix.py: distrib on each worker's shard against plain torch on the
whole global batch, never against another distrib run. Float64: the only difference allowed
is the order of floating-point sums (fp16 compression: its rounding).
"""
import json

import pytest

from tests.helpers import SCRIPTS, run_launch, run_torchrun

SCRIPT = SCRIPTS / "equivalence_matrix.py"
EXACT = 1e-10          # float64 after 4 steps; a double average or a wrong step is > 1e-3
FP16_WIRE = 2e-3       # gradients rounded to fp16 on the wire
FP16_ROUNDOFF = 2.0**-11
CASES = [
    "sgd-acc1-nosync", "sgd-acc1-sync", "sgd-acc3-nosync", "sgd-acc3-sync",
    "adamw-acc1-nosync", "adamw-acc1-sync", "adamw-acc3-nosync", "adamw-acc3-sync",
    "adamw-clip-acc3-sync", "sgd-fp16-compression", "adamw-unused-on-some-ranks-acc3",
    "adamw-unused-on-every-rank", "sgd-unused-on-every-rank-per-parameter", "sgd-frozen-after-wrap",
    "adamw-frozen-after-wrap-sync", "sgd-syncbatchnorm", "adamw-parameter-outside-the-model",
    "two-models-one-process", "two-losses-no-sync", "adamw-onecycle", "sgd-cosine", "adamw-lambda",
]
_runs = {}


# The runs: Horovod's two controllers, and the torch engine (its controller is torch's backend),
# with its one-host shared-memory allreduce and without it.
RUNS = {"mpi": ("horovod", "mpi"), "gloo": ("horovod", "gloo"), "torch": ("torch", "gloo"),
        "torch-gloo": ("torch", "gloo")}


def matrix(run, tmp_path_factory):
    """The script's results for one run of :data:`RUNS`, run once per test session."""
    if run not in _runs:
        out = tmp_path_factory.mktemp(f"matrix-{run}") / "results.json"
        if run.startswith("torch"):
            across_hosts = {"DISTRIB_SHM": "0", "DISTRIB_OVERLAP_STEP": "1", "DISTRIB_BUCKET_MB": str(128 / 2**20)}
            run_torchrun(2, SCRIPT, ["--out", out], timeout=420, env=across_hosts if run == "torch-gloo" else {})
        else:
            run_launch(["-np", "2", "--controller", run], SCRIPT, ["--out", out], timeout=420)
        results = json.loads(out.read_text())
        assert (results["engine"], results["controller"]) == RUNS[run]
        _runs[run] = results
    return _runs[run]


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("case", CASES)
def test_two_workers_compute_what_single_process_torch_computes(case, run, tmp_path_factory):
    results = matrix(run, tmp_path_factory)
    assert results["size"] == 2
    got = results["cases"][case]
    assert got["error"] is None, got["error"]
    tolerance = FP16_WIRE if "fp16" in case else EXACT
    assert got["vs_torch"] <= tolerance, f"{case}: max |distrib - torch| = {got['vs_torch']:.3g}"
    if "fp16" in case:  # fp16's rounding, relative to how far training moved: not ~1e-16 (compression ignored)
        relative = got["vs_torch"] / got["reference_moved"]
        assert FP16_ROUNDOFF / 10 < relative < 4 * FP16_ROUNDOFF, f"{case}: {relative:.3g} is not fp16 rounding"
    assert got["across_ranks"] == 0.0, f"{case}: the ranks hold different parameters"
    assert got["reference_moved"] > 1e-3, f"{case}: the reference did not train, so the comparison proves nothing"


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
@pytest.mark.parametrize("run", ["mpi", "torch", "torch-gloo"])
def test_synchronize_then_step_sends_each_gradient_once(run, tmp_path_factory):
    once = matrix(run, tmp_path_factory)["checks"]["one_exchange_per_step"]
    # the gradients, plus one used-flag per parameter riding in its bucket
    assert once["elements_sent"] == once["gradient_elements"] + once["parameters"]
    # on one host the torch engine's buckets go through shared memory (and the matrix above checked its numbers)
    assert once["carrier"] == {"mpi": "HorovodComm", "torch": "SharedMemoryTransport", "torch-gloo": "TorchComm"}[run]


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
@pytest.mark.parametrize("run", ["torch", "torch-gloo"])
def test_with_overlap_step_the_optimizer_steps_each_bucket_as_it_arrives(run, tmp_path_factory):
    got = matrix(run, tmp_path_factory)["checks"]["optimizer_calls_per_step"]
    if run == "torch-gloo":  # DISTRIB_OVERLAP_STEP=1: one call per bucket, and the matrix checked the numbers
        assert got["buckets"] > 1 and got["calls"] == got["buckets"]
    else:  # the default: one step after the last bucket
        assert got["calls"] == 1


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
def test_each_rank_draws_its_own_random_stream_and_rank_0_draws_the_plain_scripts(tmp_path_factory):
    rng = matrix("mpi", tmp_path_factory)["checks"]["rng"]
    assert rng["rank0_is_plain_torch"] is True
    assert rng["draws"][0] != rng["draws"][1]


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
def test_dataloader_worker_processes_draw_per_rank_and_per_worker(tmp_path_factory):
    loader = matrix("mpi", tmp_path_factory)["checks"]["dataloader_workers"]
    rank0, rank1 = loader["draws"]
    assert len(rank0) == len(rank1) == 32
    assert not set(rank0) & set(rank1), "two ranks' workers drew the same augmentation"
    assert len(set(rank0)) == len(rank0), "two workers of one rank drew the same values"
    assert loader["reproducible"] is True


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
@pytest.mark.parametrize("run", ["mpi", "torch"])
def test_evaluation_with_a_rank_that_has_no_samples(run, tmp_path_factory):
    # rank 0: 2 samples with loss sum 6 and accuracy sum 1; rank 1: none
    assert matrix(run, tmp_path_factory)["checks"]["evaluate_with_an_empty_rank"] == {"loss": 3.0, "acc": 0.5}


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
def test_a_second_backward_after_the_gradients_were_sent_is_refused_with_the_fix(tmp_path_factory):
    message = matrix("mpi", tmp_path_factory)["checks"]["two_backward_passes_refused"]["message"]
    assert message is not None
    assert "'bias' received a gradient after its average was already sent" in message
    assert "optimizer.no_sync()" in message and "use_reentrant=False" in message
    assert "\n" not in message


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
def test_the_wrapper_is_a_torch_optimizer_with_torch_state_dicts(tmp_path_factory):
    api = matrix("mpi", tmp_path_factory)["checks"]["optimizer_api"]
    assert api == {"isinstance": True, "subclass_kept": True, "plain_loads_it": True, "round_trip": True,
                   "double_wrap": "this optimizer is already wrapped by distrib.wrap(); wrap the plain torch "
                                  "optimizer once"}


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
@pytest.mark.parametrize("run", ["mpi", "torch"])
def test_sync_buffers_gives_every_rank_rank_0s_statistics_at_each_forward(run, tmp_path_factory):
    buffers = matrix(run, tmp_path_factory)["checks"]["sync_buffers"]
    at_forward, after_forward = buffers["at_forward"], buffers["after_forward"]
    assert at_forward[0] == at_forward[1]
    # the ranks' data differ, so their own updates differ: equality above is the broadcast's doing
    assert after_forward[0] != after_forward[1]


@pytest.mark.multiprocess
@pytest.mark.timeout(480)
@pytest.mark.parametrize("run", list(RUNS))
def test_sync_batchnorm_statistics_are_the_global_batchs(run, tmp_path_factory):
    bn = matrix(run, tmp_path_factory)["checks"]["sync_batchnorm_statistics"]
    assert bn["running_var_per_rank"][0] == bn["running_var_per_rank"][1]
    assert bn["running_var_per_rank"][0] == pytest.approx(bn["single_process"], rel=1e-12)
    assert bn["running_mean_error"] < 1e-12
