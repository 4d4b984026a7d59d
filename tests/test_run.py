"""distrib.Run in one process (a world of one, a plain torch optimizer): resume, checkpoints,
preemption, evaluation, metrics and the epoch-based length. The multi-process runs of the
example built on it are in tests/test_run_mnist.py."""
import io
import json
import os
import signal

import pytest
import torch

import distrib
from distrib.checkpoint import store
from distrib.context import Context
from distrib.data import epoch_order

SAMPLES, BATCH, LR = 40, 4, 0.05


def one_process():
    return Context(rank=0, size=1, local_rank=0, local_size=1, cross_rank=0, cross_size=1,
                   device=torch.device("cpu"), controller="gloo")


def dataset():
    x = torch.linspace(-1, 1, SAMPLES).unsqueeze(1)
    return torch.utils.data.TensorDataset(x, 3 * x + 0.5)


def make_run(run_dir, accumulate=1, **options):
    """A fresh model/optimizer/loader/schedule and the Run around them (what a script builds)."""
    torch.manual_seed(0)
    ctx = one_process()
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if accumulate > 1:
        optimizer = distrib.wrap(model, optimizer, ctx, accumulate=accumulate)
    loader = distrib.ShardedLoader(dataset(), BATCH, ctx, seed=3)
    schedule = distrib.LRSchedule(optimizer, base_lr=LR, world_size=1, warmup_steps=3, decay="constant")
    options = {"checkpoint_every": 5, "async_save": False, "log_every": 1, "stream": io.StringIO(), **options}
    return distrib.Run(ctx, run_dir, model=model, optimizer=optimizer, loader=loader, schedule=schedule, **options)


def train(run, total=None, *, preempt_at=None, **steps):
    for step, (x, y) in run.steps(total, **steps):
        if step == preempt_at:
            os.kill(os.getpid(), signal.SIGUSR2)  # Slurm's warning; handled at the step boundary
        loss = torch.nn.functional.mse_loss(run.model(x), y)
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.log(loss=loss)
    return run


def plain_torch(steps):
    """The same training as a plain single-process torch loop over the same global batches."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    x, y = dataset().tensors
    done, epoch = 0, 0
    while done < steps:
        order = epoch_order(SAMPLES, 3, epoch)
        for i in range(0, SAMPLES - BATCH + 1, BATCH):
            if done == steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = LR * min(1.0, (done + 1) / 3)  # the warm-up
            batch = order[i:i + BATCH]
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
        epoch += 1
    return model.state_dict()


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_preempted_then_resumed_run_equals_plain_torch(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        train(make_run(run_dir), 23, preempt_at=6)
    assert exited.value.code == 0
    assert store.step_of(store.newest_valid(run_dir / "checkpoints")[0]) == 7  # saved at the next boundary
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # handlers given back before exiting
    run = make_run(run_dir)
    assert run.step == 7 and run.loader.consumed == 7 * BATCH
    train(run, 23)
    assert run.step == 23
    expected = plain_torch(23)
    for name, value in run.model.state_dict().items():
        assert torch.allclose(value, expected[name], rtol=0, atol=1e-6), name
    events = [(r["event"], r["step"]) for r in records(run_dir) if "event" in r]
    assert events == [("start", 0), ("preempted", 7), ("start", 7), ("resume", 7), ("final", 23)]
    steps = [r["step"] for r in records(run_dir) if "event" not in r]
    assert steps == list(range(1, 24))
    saved = [store.step_of(p) for _, p in store.list_checkpoints(run_dir / "checkpoints")]
    assert saved[-2:] == [20, 23]  # every 5 steps, and at the end


def test_epochs_mode_runs_whole_epochs_and_its_length_survives_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    run = make_run(run_dir, checkpoint_every=4)
    assert len(run.loader) == SAMPLES // BATCH == 10
    with pytest.raises(SystemExit):
        train(run, epochs=2, preempt_at=12)
    resumed = make_run(run_dir)
    assert resumed.step == 13 and resumed.epoch == 1
    assert len(resumed.loader) == 10 and resumed.loader.batches_left == 7  # len() is the whole epoch
    out = resumed.metrics._stream
    train(resumed, epochs=2)
    assert resumed.step == 20 and (resumed.epoch, resumed.loader.batches_left) == (1, 0)  # epoch 1 used up
    progress = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert progress[0].startswith("step 14/20 ") and progress[-1].startswith("step 20/20 "), progress


def test_evaluation_metrics_and_breakdown(tmp_path):
    calls = []

    def evaluate(ctx):
        calls.append(ctx.size)
        return {"loss": 0.5 * len(calls), "accuracy": 0.25}

    run = make_run(tmp_path / "run", evaluate=evaluate, eval_every=4, log_every=2)
    train(run, 10)
    assert len(calls) == 3 and run.last_eval == {"loss": 1.5, "accuracy": 0.25}  # steps 4, 8, and the end
    recs = records(tmp_path / "run")
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [(r["step"], r["val_loss"], r["val_accuracy"]) for r in evals] == [(4, 0.5, 0.25), (8, 1.0, 0.25)]
    final = [r for r in recs if r.get("event") == "final"]
    assert final[0]["step"] == 10 and final[0]["val_loss"] == 1.5
    logged = [r for r in recs if "event" not in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10]
    assert all({"loss", "lr", "t_data", "t_compute", "t_optimizer", "t_checkpoint", "t_other"} <= set(r)
               for r in logged)
    assert "time per step over 10 steps" in run.metrics._stream.getvalue()


def test_logging_a_tensor_every_step_reads_it_once_per_logged_window(tmp_path):
    """run.log(loss=loss) every step: the host waits for the device (on a GPU) once per
    log_every steps, when the line is written, not every step; the line holds the window's mean
    as with loss.item(). Counted as tests/test_step_syncs.py counts the step's waits (the CPU
    loader's own reads of its index lists are not the log's)."""
    from tests.scripts.sync_counter import SyncCounter
    run, losses = make_run(tmp_path / "run", log_every=5, checkpoint_every=0), []
    with SyncCounter().counting() as counter:
        for step, (x, y) in run.steps(10):
            loss = torch.nn.functional.mse_loss(run.model(x), y)
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            run.log(loss=loss)
            losses.append(loss.detach().clone())
    logging = [c for c in counter.calls if "distrib/run.py" in c or "distrib/metrics.py" in c]
    assert len(logging) == 2 and all("distrib/metrics.py" in c for c in logging), counter.calls
    logged = [r for r in records(tmp_path / "run") if "event" not in r]
    values = [float(v) for v in losses]
    assert [(r["step"], r["loss"]) for r in logged] == [(5, sum(values[:5]) / 5), (10, sum(values[5:]) / 5)]


def test_micro_batches_are_yielded_together(tmp_path):
    """Run reads the count from the optimizer: one setting, wrap(accumulate=3)."""
    run = make_run(tmp_path / "run", accumulate=3)
    sizes = []
    for step, micro in run.steps(2):
        sizes.append([len(x) for x, _ in micro])
    assert sizes == [[BATCH] * 3] * 2 and run.loader.consumed == 6 * BATCH
    assert run.metrics.global_batch == 3 * BATCH


@pytest.mark.parametrize("options, message", [
    ({"checkpoint_every": -1}, "checkpoint_every must be an int >= 0"),
    ({"eval_every": "sometimes"}, "eval_every must be an int >= 0"),
    ({"commit_every": 0}, "commit_every must be >= 1"),
    ({"keep": 1}, "keep at least 2 checkpoints"),
])
def test_bad_settings_are_one_clear_error(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_run(tmp_path / "run", **options)


def test_steps_needs_exactly_one_length(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="either total"):
        next(run.steps())
    with pytest.raises(ValueError, match="either total"):
        next(run.steps(5, epochs=1))


class FakeHorovod:
    """What share_cores() asks of the engine's comm, for a job of two workers under two host names."""

    def __init__(self, machine_ids, rank=0):
        self.machine_ids, self.rank = machine_ids, rank
        self.local_size = 1  # Horovod counts the workers under this host name only
        self.cross_size = len(machine_ids)

    def allgather_object(self, obj, name):
        return self.machine_ids


@pytest.mark.parametrize("machine_ids, collective, workers", [
    (["boot-a", "boot-a"], True, 2),   # -H localhost:1,127.0.0.1:1, or two network namespaces: one machine
    (["boot-a", "boot-b"], True, 1),   # two machines
    (["boot-a", "boot-a"], False, 1),  # Horovod Elastic outside its loop: no collective, the host name's count
])
def test_threads_follow_the_workers_per_physical_machine(monkeypatch, machine_ids, collective, workers):
    from distrib.context import share_cores
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    try:
        assert share_cores(FakeHorovod(machine_ids), collective=collective) == 8 // workers
        assert torch.get_num_threads() == 8 // workers
    finally:
        torch.set_num_threads(before)


def test_machine_id_is_the_boot_id():
    from distrib.context import BOOT_ID_FILE, machine_id
    with open(BOOT_ID_FILE) as f:
        assert machine_id() == f.read().strip() != ""


def test_public_api_is_importable_from_distrib():
    for name in distrib.__all__:
        assert getattr(distrib, name) is not None, name
    assert callable(distrib.evaluate) and distrib.Comm and distrib.PreemptionHandler and distrib.ElasticState


README_RUNNER = """
import json, sys, traceback
for i, code in enumerate(json.load(open(sys.argv[1]))):
    try:
        exec(compile(code, f"README snippet {i}", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README snippet {i} failed:\\n{code}")
print("ran", i + 1)
"""


@pytest.mark.timeout(300)
def test_readme_snippets_of_the_public_api_run(tmp_path):
    """Every snippet of the README's Run and object-by-object sections runs as it is (one process,
    one Horovod worker), in one interpreter; the ElasticState one needs `launch --elastic`."""
    import re
    import subprocess
    import sys
    from tests.helpers import REPO
    text = (REPO / "README.md").read_text()
    section = text[text.index("## A long job in a handful of lines"):text.index("\n## Launching")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    runnable = [b for b in blocks if "launch --elastic" not in b.splitlines()[0]]
    assert len(blocks) == 12 and len(runnable) == 11
    (tmp_path / "snippets.json").write_text(json.dumps(runnable))
    (tmp_path / "runner.py").write_text(README_RUNNER)
    proc = subprocess.run([sys.executable, "runner.py", "snippets.json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0 and "ran 11" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step 200, validation {'loss':" in proc.stdout
    assert (tmp_path / "runs" / "readme" / "checkpoints" / "step-00000200").is_dir()
    assert re.search(r"^best \d+\.\d+ at lr 0\.\d+$", proc.stdout, re.M), proc.stdout  # the stateful-model snippet
    assert (tmp_path / "runs" / "readme-rnn" / "checkpoints" / "step-00000120" / "rank_state.pt").is_file()


def test_the_optimizer_times_its_gradient_wait_and_step_for_run():
    """Run hands its timer to the optimizer (no method of the optimizer is replaced): the
    step is the ``optimizer`` phase, its gradient wait ``allreduce``."""
    from distrib.metrics import NestedPhaseTimer
    model = torch.nn.Linear(2, 1)
    optimizer = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), one_process())
    timer = NestedPhaseTimer()
    optimizer.time_phases(timer.phase)
    model(torch.ones(3, 2)).sum().backward()
    optimizer.step()
    assert set(timer.take()) == {"optimizer", "allreduce"}
    optimizer.time_phases(None)
    model(torch.ones(3, 2)).sum().backward()
    optimizer.step()
    assert timer.take() == {}
    assert "step" not in vars(optimizer) and "synchronize" not in vars(optimizer)
