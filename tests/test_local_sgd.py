"""Local SGD / DiLoCo (``wrap(..., local_sgd=distrib.LocalSGD(...))``): a real 2-rank run against
plain single-process torch on the global batch (every=1, an inner SGD, plain outer step: that is
data parallelism), against the ranks simulated in one process with plain torch optimizers and a
Nesterov outer step written here (every=3, inner AdamW, DiLoCo's outer), and kill-and-resume."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import distrib
from tests.helpers import SCRIPTS, assert_resume_after_a_kill_is_bit_exact, run_launch, run_torchrun
from tests.scripts.local_sgd_model import Net, batch, inner


def fresh_model():
    torch.manual_seed(0)
    return Net()


def single_process_run(steps, world=2, accumulate=1):
    """Plain torch, one model, the whole global batch (every rank's micro-batches) per step."""
    torch.set_default_dtype(torch.float64)
    try:
        model = fresh_model()
        opt = inner(model.parameters(), "sgd")
        history = []
        for step in range(steps):
            opt.zero_grad()
            for rank in range(world):
                for k in range(accumulate):
                    x, y = batch(rank, step, k)
                    (torch.nn.functional.mse_loss(model(x), y) / (world * accumulate)).backward()
            opt.step()
            history.append({n: q.detach().clone() for n, q in model.named_parameters()})
        return history
    finally:
        torch.set_default_dtype(torch.float32)


def simulated_ranks(steps, every, kind, world=2, outer_lr=0.7, momentum=0.9):
    """The W ranks in one process: a model and a plain torch optimizer each, trained on its own
    batches; every ``every`` steps the anchor takes a Nesterov step (written out here) on
    anchor - mean(parameters), and every rank starts again from it. [step][rank] -> parameters."""
    torch.set_default_dtype(torch.float64)
    try:
        models = [fresh_model() for _ in range(world)]
        opts = [inner(m.parameters(), kind) for m in models]
        anchor = {n: q.detach().clone() for n, q in models[0].named_parameters()}
        velocity = {n: torch.zeros_like(q) for n, q in anchor.items()}
        history = []
        for step in range(steps):
            for rank, (model, opt) in enumerate(zip(models, opts)):
                opt.zero_grad()
                x, y = batch(rank, step, 0)
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            if (step + 1) % every == 0:
                with torch.no_grad():
                    for n in anchor:
                        mean = sum(dict(m.named_parameters())[n] for m in models) / world
                        delta = anchor[n] - mean
                        velocity[n] = momentum * velocity[n] + delta
                        anchor[n] = anchor[n] - outer_lr * (delta + momentum * velocity[n])
                        for m in models:
                            dict(m.named_parameters())[n].copy_(anchor[n])
            history.append([{n: q.detach().clone() for n, q in m.named_parameters()} for m in models])
        return history
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.timeout(300)
def test_every_step_with_plain_sgd_outside_is_data_parallelism(tmp_path):
    """every=1, outer lr 1 without momentum, an inner SGD with momentum and weight decay, two
    micro-batches per step, a layer no rank uses: every rank equals plain torch on the global batch."""
    out = tmp_path / "run.pt"
    run_launch(["-np", "2"], SCRIPTS / "local_sgd_train.py",
               ["--every", "1", "--inner", "sgd", "--outer", "plain", "--steps", "5", "--accumulate", "2", "--out", out])
    got = torch.load(out)["ranks"]
    want = single_process_run(5, accumulate=2)
    for step in range(5):
        for n, w in want[step].items():
            for r in range(2):
                torch.testing.assert_close(got[r][step]["params"][n], w, rtol=1e-10, atol=1e-12,
                                           msg=f"rank {r} step {step} {n}")
    assert torch.equal(got[0][4]["params"]["unused.weight"], want[0]["unused.weight"])  # never stepped


@pytest.mark.timeout(300)
def test_diloco_every_three_steps_equals_the_ranks_simulated_in_one_process(tmp_path):
    """every=3, inner AdamW (its state stays each rank's), DiLoCo's Nesterov outer step, on the
    torch engine: between averages the ranks differ, and each equals its simulated self."""
    out = tmp_path / "run.pt"
    run_torchrun(2, SCRIPTS / "local_sgd_train.py",
                 ["--every", "3", "--inner", "adamw", "--outer", "nesterov", "--steps", "7", "--out", out])
    got = torch.load(out)["ranks"]
    want = simulated_ranks(7, 3, "adamw")
    for step in range(7):
        for r in range(2):
            for n, w in want[step][r].items():
                torch.testing.assert_close(got[r][step]["params"][n], w, rtol=1e-10, atol=1e-12,
                                           msg=f"rank {r} step {step} {n}")
    assert not torch.equal(got[0][3]["params"]["a.weight"], got[1][3]["params"]["a.weight"])  # mid-round
    assert torch.equal(got[0][5]["params"]["a.weight"], got[1][5]["params"]["a.weight"])  # just averaged


@pytest.mark.timeout(400)
def test_kill_mid_round_and_resume_is_bit_exact_and_another_world_size_restarts_at_the_average(tmp_path):
    """Killed right after the checkpoint of step 4 (one step into a round of 3: each rank's own
    parameters and AdamW state, the anchor and the outer momentum all matter), resumed: steps
    4-7 equal an uninterrupted run's bit for bit on both ranks. Resumed on 1 worker instead,
    it restarts from the last average with a log line that says why."""
    common = ["--every", "3", "--inner", "adamw", "--outer", "nesterov", "--steps", "8", "--save-every", "4"]
    killed_dir = assert_resume_after_a_kill_is_bit_exact(SCRIPTS / "local_sgd_train.py", common, tmp_path, die_at=4,
                                                         steps=8)
    other = run_launch(["-np", "1"], SCRIPTS / "local_sgd_train.py",
                       [*common, "--ckpt-dir", killed_dir, "--out", tmp_path / "one.pt"])
    assert ("local SGD restarts from the last average: the checkpoint was written by 2 ranks, this run has 1"
            in other.stderr)


@pytest.mark.parametrize("kwargs,message", [
    ({"every": 0}, "every must be an int >= 1"),
    ({"outer_lr": 0}, "outer_lr must be > 0"),
    ({"outer_momentum": 1.0}, r"outer_momentum must be in \[0, 1\)"),
    ({"nesterov": True}, "nesterov=True needs outer_momentum > 0"),
])
def test_bad_config_is_one_line_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        distrib.LocalSGD(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("options,message", [
    ({"local_sgd": 4}, r"local_sgd= takes a distrib.LocalSGD\(every=...\)"),
    ({"local_sgd": distrib.LocalSGD(), "compression": "fp16"}, "does not combine with compression='fp16'"),
    ({"local_sgd": distrib.LocalSGD(), "shard": "optimizer"}, "does not combine with shard='optimizer'"),
    ({"local_sgd": distrib.LocalSGD(), "precision": "fp16"}, "does not combine with precision='fp16'"),
    ({"local_sgd": distrib.LocalSGD(), "op": "adasum"}, "does not combine with op='adasum'"),
])
def test_bad_wrap_options_are_one_line_with_the_fix(options, message):
    from distrib.context import Context
    model = torch.nn.Linear(2, 1)
    ctx = Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match=message) as info:
        distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx, **options)
    assert "\n" not in str(info.value)


def test_elastic_is_refused_in_one_line():
    from distrib.context import Context
    model = torch.nn.Linear(2, 1)
    ctx = dataclasses.replace(Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo"), elastic=True)
    with pytest.raises(ValueError, match="local_sgd= cannot run under Horovod Elastic") as info:
        distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx, local_sgd=distrib.LocalSGD())
    assert "\n" not in str(info.value)


def test_broadcast_state_makes_the_broadcast_parameters_the_anchor():
    """A script that loads weights and broadcasts them (optimizer.broadcast_state()) after wrap:
    the next average must start from them, not from the parameters at wrap time."""
    from distrib.context import Context
    model = torch.nn.Linear(3, 2)
    ctx = Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo")
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx,
                       local_sgd=distrib.LocalSGD.diloco(every=1))
    with torch.no_grad():
        model.weight.fill_(0.5)
    opt.broadcast_state()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()  # every=1: the outer step from the anchor; one rank: the pseudo-gradient is SGD's own step
    g = torch.ones(2, 3)  # d(sum(W x + b))/dW at x = 1
    torch.testing.assert_close(model.weight.detach(), torch.full((2, 3), 0.5) - 0.7 * (0.1 * g + 0.9 * 0.1 * g))
