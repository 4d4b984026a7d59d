import math

import pytest
import torch

from distrib.schedule import LRSchedule, lr_factor, scaled_lr
from tests.checkpoint_fixtures import cpu_ctx


@pytest.mark.parametrize("scaling,size,expected", [("linear", 4, 0.4), ("sqrt", 4, 0.2), ("none", 4, 0.1), ("linear", 1, 0.1)])
def test_scaled_lr(scaling, size, expected):
    assert scaled_lr(0.1, size, scaling) == pytest.approx(expected)


def test_unknown_scaling_is_rejected():
    with pytest.raises(ValueError, match="'cube' is not one of linear, sqrt, none"):
        scaled_lr(0.1, 2, "cube")


def test_warmup_then_cosine_decay_to_the_floor():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    assert lr_factor(50, 10, 100, decay="constant") == 1.0
    assert lr_factor(55, 10, 100, decay="linear") == pytest.approx(0.55)


def test_schedule_sets_the_optimizer_lr_and_follows_a_new_world_size_on_resume():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = LRSchedule(opt, base_lr=0.1, world_size=2, total_steps=100, warmup_steps=0, decay="constant")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    for _ in range(30):
        sched.step()
    state = sched.state_dict()
    resumed = LRSchedule(opt, base_lr=0.1, world_size=4, total_steps=100, warmup_steps=0, decay="constant")
    resumed.load_state_dict(state)
    assert resumed.step_count == 30 and opt.param_groups[0]["lr"] == pytest.approx(0.4)


def test_bad_schedule_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="decay 'step' is not one of"):
        LRSchedule(opt, 0.1, 1, 10, decay="step")
    with pytest.raises(ValueError, match="warmup_steps >= 0"):
        LRSchedule(opt, 0.1, 1, 10, warmup_steps=-1)


def test_elastic_resize_rescales_the_peak_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, base_lr=0.1, world_size=4, total_steps=10, decay="constant", scaling="linear")
    sched.adopt_world(cpu_ctx(0, 1))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and sched.peak_lr == pytest.approx(0.1)


def test_constant_schedule_needs_no_total_but_a_decay_does():
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    s = LRSchedule(opt, base_lr=0.1, world_size=4, warmup_steps=2, decay="constant")
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.4, 0.4, 0.4])  # warm-up to 0.1 x 4 workers, then flat
    with pytest.raises(ValueError, match="lr decay 'cosine' needs total_steps"):
        LRSchedule(opt, base_lr=0.1, world_size=1)
