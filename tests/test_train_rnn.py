"""examples/train_rnn.py, a stateful model (an LSTM carrying its hidden state across batches):
the same numbers as its single-process version (tests/scripts/train_rnn_single.py) on 2 workers;
bit-identical to the uninterrupted run after SIGKILLs at random moments and resumes; and under
--elastic, with a worker killed, the same global batch, step count and learning rates.

The runs anneal the learning rate at every epoch end (--anneal-threshold 1: no validation loss
counts as an improvement), so the learning rate of each step records where the epochs ended.
KILL_TEST_SEED=N replays one sequence of kill moments.
"""
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from distrib.checkpoint import store
from tests.checkpoint_fixtures import hvd_command, kill_tree, temp_folders, validate_committed, wait_for
from tests.helpers import REPO, SCRIPTS, run_launch

EXAMPLE = REPO / "examples" / "train_rnn.py"
STEPS, STEPS_PER_EPOCH, COLUMNS = 64, 21, 8
ARGS = ["--max-chars", 3000, "--batch-size", COLUMNS, "--bptt", 16, "--emb", 16, "--hidden", 32,
        "--anneal-threshold", 1.0, "--seed", 5, "--steps", STEPS]
TWO_HOSTS = "localhost:1,127.0.0.1:1"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process script's run: final model, hidden state, losses and learning rates."""
    out = tmp_path_factory.mktemp("single") / "single.pt"
    subprocess.run([sys.executable, str(SCRIPTS / "train_rnn_single.py"), *map(str, ARGS), "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return torch.load(out, weights_only=False)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def per_step(run_dir):
    """The last record of each step (a step redone after a rollback is logged twice)."""
    return {r["step"]: r for r in records(run_dir) if "event" not in r}


def logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"samples_per_s"') if path.exists() else 0


def committed(run_dir) -> set:
    root = run_dir / "checkpoints"
    return {p.name for p in root.iterdir() if store.step_of(p) is not None} if root.is_dir() else set()


def final_checkpoint(run_dir):
    path = store.newest_valid(run_dir / "checkpoints")[0]
    assert store.step_of(path) == STEPS
    return (store.load_file(path, store.STATE_FILE)["state"], store.load_file(path, "rank_state.pt"))


def assert_equal(a, b, where=""):
    """Nested state dicts equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def start(run_dir, log, slow):
    env = {**os.environ, "DISTRIB_TEST_SLOW_WRITE_S": str(slow)}
    cmd = hvd_command(2, EXAMPLE, [*ARGS, "--run-dir", run_dir, "--checkpoint-every", 4, "--keep", 2,
                                   "--log-every", 1])
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_two_workers_match_one_process_and_resume_bit_exact_after_sigkills(tmp_path, single):
    seed = int(os.environ.get("KILL_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = start(ref_dir, tmp_path / "reference.log", slow=0)  # uninterrupted, beside the first attempts
    history = []
    try:
        for attempt, kind in enumerate(["random", "write", "random"], start=1):
            log = tmp_path / f"attempt-{attempt}.log"
            proc = start(run_dir, log, slow=0.1)
            try:
                # a checkpoint of this attempt committed first: every attempt then resumes further on
                saved = committed(run_dir)
                wait_for(lambda: committed(run_dir) - saved, proc, 240)
                before = logged(run_dir)
                if kind == "random":
                    steps, moment = rng.randint(1, 8), rng.uniform(0.0, 0.15)
                    wait_for(lambda: logged(run_dir) >= before + steps, proc, 240)
                    what = f"{moment:.2f}s after {steps} steps"
                else:
                    seen = temp_folders(run_dir / "checkpoints")
                    wait_for(lambda: temp_folders(run_dir / "checkpoints") - seen, proc, 120)
                    moment = rng.uniform(0.0, 0.25)
                    what = f"{moment:.2f}s into a checkpoint write"
                time.sleep(moment)
                assert proc.poll() is None, f"seed {seed}: attempt {attempt} ended before its kill\n" + log.read_text()
            finally:
                kill_tree(proc.pid)
                proc.wait()
            history.append(f"attempt {attempt}: killed {what}, {logged(run_dir)} steps logged")
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
            validate_committed(run_dir / "checkpoints")
        final = start(run_dir, tmp_path / "final.log", slow=0)
        assert final.wait(timeout=400) == 0, "\n".join(history) + (tmp_path / "final.log").read_text()[-3000:]
        assert reference.wait(timeout=400) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        kill_tree(reference.pid)
    report = f"seed {seed}: " + "; ".join(history)
    resumed = [r["step"] for r in records(run_dir) if r.get("event") == "resume"]
    assert len(resumed) == 3 and resumed == sorted(resumed), report

    # The uninterrupted 2-worker run is the single-process one (up to float summation order).
    ref_model = torch.load(ref_dir / "model.pt", weights_only=False)["model_state"]
    for name, value in single["model"].items():
        assert torch.allclose(ref_model[name], value, rtol=0, atol=1e-5), name
    ref_steps = per_step(ref_dir)
    assert [ref_steps[s]["loss"] for s in range(1, STEPS + 1)] == pytest.approx(single["losses"], rel=1e-5)
    assert [ref_steps[s]["lr"] for s in range(1, STEPS + 1)] == single["lrs"]
    assert len(set(single["lrs"])) == 4  # annealed at the end of each of the 3 epochs
    ref_state, ref_ranks = final_checkpoint(ref_dir)
    assert torch.allclose(torch.cat([r["hidden"][0] for r in ref_ranks], dim=1), single["hidden"][0], atol=1e-5)
    assert ref_state["user"]["best"] == pytest.approx(single["best"], rel=1e-6)

    # The killed and resumed run is the uninterrupted one, bit for bit: model, optimizer, the
    # plateau scheduler, the best loss, each rank's hidden state, the best model file.
    print(report)  # the seed, to replay a failure, and where each kill fell
    state, ranks = final_checkpoint(run_dir)
    assert_equal(state, ref_state, report)
    assert_equal(ranks, ref_ranks, report)
    assert_equal(torch.load(run_dir / "model.pt", weights_only=False)["model_state"], ref_model, report)
    assert_equal(torch.load(run_dir / "best.pt", weights_only=False)["model_state"],
                 torch.load(ref_dir / "best.pt", weights_only=False)["model_state"], report)


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_elastic_shrink_keeps_the_global_batch_steps_and_learning_rate(tmp_path, single):
    """Rank 1 SIGKILLs itself at step 30 (epoch 1); the survivor rolls back to the commit of
    step 28, takes over all 8 columns with both ranks' hidden states, and finishes the run that
    the single-process script ran: the same epoch ends, learning rates and step count."""
    run_dir = tmp_path / "run"
    run_launch(["--elastic", "--min-np", "1", "--max-np", "2", "-H", TWO_HOSTS], SCRIPTS / "faulty_train_rnn.py",
               [*ARGS, "--run-dir", run_dir, "--commit-every", 4, "--checkpoint-every", 16, "--log-every", 1],
               env={"FAULT": "kill", "FAULT_RANK": "1", "FAULT_STEP": "30"}, timeout=550)
    events = [r for r in records(run_dir) if "event" in r]
    resizes = [(r["step"], r["world_size"]) for r in events if r["event"] == "resize"]
    assert resizes == [(28, 1)], events
    steps = per_step(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps[STEPS]["world_size"] == 1 and steps[1]["world_size"] == 2
    assert [steps[s]["lr"] for s in range(1, STEPS + 1)] == single["lrs"]  # epochs ended where they did
    evals = {r["step"]: r["val_loss"] for r in events if r["event"] == "eval"}
    assert sorted(evals) == [STEPS_PER_EPOCH * k for k in (1, 2, 3)]
    # the same global batch: the data position after STEPS steps, and each step's samples
    state, _ = final_checkpoint(run_dir)
    assert state["loader"]["global_batch"] == COLUMNS
    assert (state["loader"]["epoch"], state["loader"]["consumed"]) == (3, (STEPS - 3 * STEPS_PER_EPOCH) * COLUMNS)
    assert all(r["tokens_per_s"] == pytest.approx(16 * r["samples_per_s"]) for r in steps.values())
    # the hidden states went on with the survivor: the training is the single-process one's
    assert [evals[s] for s in sorted(evals)] == pytest.approx(single["vals"], rel=1e-4)


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_resume_on_one_worker_reshards_the_hidden_states_and_keeps_the_global_batch(tmp_path, single):
    """2 workers to step 30 (mid-epoch 1), then a plain resume on 1 worker: its checkpoint's two
    hidden states are concatenated for the one worker's 8 columns, and the run goes on as the
    single-process one did."""
    run_dir = tmp_path / "run"
    run_launch(["-np", "2"], EXAMPLE, [*ARGS[:-1], 30, "--run-dir", run_dir, "--log-every", 1])
    run_launch(["-np", "1"], EXAMPLE, [*ARGS, "--run-dir", run_dir, "--log-every", 1])
    assert [r["step"] for r in records(run_dir) if r.get("event") == "resume"] == [30]
    steps = per_step(run_dir)
    assert steps[31]["world_size"] == 1
    assert [steps[s]["lr"] for s in range(1, STEPS + 1)] == single["lrs"]
    assert [steps[s]["loss"] for s in range(31, STEPS + 1)] == pytest.approx(single["losses"][30:], rel=1e-4)
    _, ranks = final_checkpoint(run_dir)
    assert len(ranks) == 1 and torch.allclose(ranks[0]["hidden"][0], single["hidden"][0], atol=1e-5)
