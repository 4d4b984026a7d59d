"""distrib.Run with the script's own state, torch LR schedulers and the epoch hook, in one
process (a world of one): a run preempted and resumed equals a plain torch loop doing the same
by hand, bit for bit equal to the uninterrupted Run. The multi-process, killed and elastic runs
are in tests/test_train_rnn.py."""
import io
import os
import signal

import pytest
import torch

import distrib
from distrib.data import epoch_order
from distrib.job.user_state import RankState, UserState, split_concat
from tests.test_run import BATCH, LR, SAMPLES, dataset, one_process

EPOCHS = 3
STEPS_PER_EPOCH = SAMPLES // BATCH


def make_scheduler(kind, optimizer):
    if kind == "plateau":  # anneals when the validation loss did not improve
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=0, threshold=0.5)
    if kind == "epoch":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=EPOCHS * STEPS_PER_EPOCH)


def validation_loss(model):
    x, y = dataset().tensors
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def carried_step(model, optimizer, x, y, carry):
    """One step whose input depends on a value carried from the previous batch (a hidden state)."""
    loss = torch.nn.functional.mse_loss(model(x + carry), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return 0.5 * carry + 0.1 * loss.detach()


def make_run(run_dir, kind, **options):
    torch.manual_seed(0)
    ctx = one_process()
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loader = distrib.ShardedLoader(dataset(), BATCH, ctx, seed=3)

    def end_of_epoch(run):  # the script's "evaluate; save best" at the end of each epoch
        run.state["epochs"].append(run.epoch)
        run.state["best"] = min(run.state["best"], run.last_eval["loss"])

    options = {"lr_scheduler": make_scheduler(kind, optimizer),
               "lr_scheduler_every": "epoch" if kind == "epoch" else "step",
               "evaluate": lambda ctx: {"loss": validation_loss(model)}, "eval_every": "epoch",
               "on_epoch_end": end_of_epoch, "state": {"best": float("inf"), "epochs": []},
               "rank_state": {"carry": torch.zeros(1)}, "checkpoint_every": 4, "async_save": False, "log_every": 1,
               "stream": io.StringIO(), **options}
    return distrib.Run(ctx, run_dir, model=model, optimizer=optimizer, loader=loader, **options)


def train(run, preempt_at=None):
    for step, (x, y) in run.steps(epochs=EPOCHS):
        if step == preempt_at:
            os.kill(os.getpid(), signal.SIGUSR2)  # saved at this step's end, then the process "exits"
        run.rank_state["carry"] = carried_step(run.model, run.optimizer, x, y, run.rank_state["carry"])
    return run


def plain_torch(kind):
    """The same training written by hand in one process: carry, scheduler, best, per epoch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scheduler = make_scheduler(kind, optimizer)
    x, y = dataset().tensors
    carry, best, lrs = torch.zeros(1), float("inf"), []
    for epoch in range(EPOCHS):
        order = epoch_order(SAMPLES, 3, epoch)
        for i in range(0, SAMPLES, BATCH):
            batch = order[i:i + BATCH]
            lrs.append(optimizer.param_groups[0]["lr"])
            carry = carried_step(model, optimizer, x[batch], y[batch], carry)
            if kind == "onecycle":
                scheduler.step()
        val = validation_loss(model)
        if kind == "plateau":
            scheduler.step(val)
        elif kind == "epoch":
            scheduler.step()
        best = min(best, val)
    return model.state_dict(), carry, best, lrs


@pytest.mark.parametrize("kind", ["onecycle", "epoch", "plateau"])
def test_preempted_run_with_own_state_and_a_torch_scheduler_resumes_bit_exact(tmp_path, kind):
    whole = train(make_run(tmp_path / "whole", kind))
    expected, carry, best, lrs = plain_torch(kind)
    for name, value in whole.model.state_dict().items():
        assert torch.allclose(value, expected[name], rtol=0, atol=1e-7), name
    assert torch.allclose(whole.rank_state["carry"], carry, rtol=0, atol=1e-7)
    assert whole.state == {"best": pytest.approx(best, abs=1e-9), "epochs": [0, 1, 2]}
    logged = [r["lr"] for r in distrib.read_metrics(tmp_path / "whole" / "metrics.jsonl") if "event" not in r]
    assert logged == pytest.approx(lrs, rel=1e-12) and len(set(lrs)) > 1  # the scheduler did change it

    run_dir = tmp_path / "resumed"
    with pytest.raises(SystemExit):  # preempted mid-epoch 1, after the epoch-0 hook
        train(make_run(run_dir, kind), preempt_at=STEPS_PER_EPOCH + 2)
    resumed = make_run(run_dir, kind)
    assert resumed.step == STEPS_PER_EPOCH + 3 and resumed.state["epochs"] == [0]
    train(resumed)
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, whole.model.state_dict()[name]), name
    assert torch.equal(resumed.rank_state["carry"], whole.rank_state["carry"])
    assert resumed.state == whole.state
    assert resumed.lr_scheduler.state_dict() == whole.lr_scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]


def test_a_finished_run_resumed_evaluates_the_final_model_but_trains_and_hooks_nothing(tmp_path):
    train(make_run(tmp_path / "run", "onecycle"))
    calls = []
    again = make_run(tmp_path / "run", "onecycle")
    again._on_epoch_end = calls.append
    steps = [step for step, _ in again.steps(epochs=EPOCHS)]
    assert steps == [] and calls == []
    assert again.last_eval["loss"] == validation_loss(again.model)  # the documented final evaluation
    assert again.state["epochs"] == [0, 1, 2]


def test_rank_state_reshards_or_resets_at_another_world_size():
    h = [torch.arange(4.0).view(1, 4, 1) + 10 * r for r in range(2)]  # (layers, columns, hidden) per rank
    c = [-x for x in h]
    saved = [{"hidden": (h[r], c[r]), "count": r} for r in range(2)]
    state = RankState({"hidden": (torch.zeros(1, 8, 1), torch.zeros(1, 8, 1)), "count": -1},
                      reshard={"hidden": split_concat(dim=1)})
    assert state.load_all(saved, 0, 1) == ["count"]  # 2 -> 1 worker: all columns on one; count reset
    assert torch.equal(state["hidden"][0], torch.cat(h, dim=1)) and torch.equal(state["hidden"][1], torch.cat(c, 1))
    assert state["count"] == -1
    assert state.load_all(saved, 1, 2) == []  # the same world: its own
    assert state["hidden"][0] is not h[1] and torch.equal(state["hidden"][0], h[1]) and state["count"] == 1
    assert state.load_all([{"hidden": state["hidden"], "count": 1}], 1, 4) == ["count"]  # 1 -> 4 workers
    assert torch.equal(state["hidden"][0], h[1][:, 1:2])
    assert state.load_all(None, 0, 2) == ["hidden", "count"]  # a checkpoint without rank state
    assert torch.equal(state["hidden"][0], torch.zeros(1, 8, 1))


def test_state_values_must_be_checkpointable():
    with pytest.raises(ValueError, match=r"state\['f'\] .* cannot be checkpointed"):
        UserState({"f": lambda: 0})
    with pytest.raises(ValueError, match="reshard names"):
        RankState({"h": 0}, reshard={"x": split_concat()})


@pytest.mark.parametrize("options, message", [
    ({"lr_scheduler_every": "batch"}, "lr_scheduler_every must be 'step' or 'epoch'"),
    ({"schedule": "x"}, "either schedule= .* or lr_scheduler="),
    ({"monitor": "accuracy"}, "ReduceLROnPlateau monitors 'accuracy'"),
])
def test_bad_scheduler_settings_are_one_clear_error(tmp_path, options, message):
    run = None
    with pytest.raises(ValueError, match=message):
        run = make_run(tmp_path / "run", "plateau", **options)
        train(run)
    if run is not None:
        run.preemption.close()  # the run failed mid-loop: give the signal handlers back
