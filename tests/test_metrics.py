"""MetricsLogger, NestedPhaseTimer and Progress with a fake clock, in one process."""
import io
import json

import pytest
import torch

from distrib.context import Context
from distrib.watch.metrics import MetricsLogger, breakdown_table, read_metrics
from distrib.watch.progress import Progress, format_duration, progress_line


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def ctx(rank=0, size=2):
    return Context(rank, size, rank, size, 0, 1, torch.device("cpu"), "gloo")


def make_logger(tmp_path, clock, rank=0, **kw):
    stream = io.StringIO()
    log = MetricsLogger(tmp_path, ctx(rank), total_steps=kw.pop("total_steps", 4), log_every=2, global_batch=8,
                        stream=stream, tty=False, clock=clock, wall_clock=lambda: 1000.0, **kw)
    return log, stream


def run_steps(log, clock, first, last):
    for step in range(first, last + 1):
        with log.phase("data"):
            clock.now += 0.1
        with log.phase("compute"):
            clock.now += 0.3
        clock.now += 0.1  # unaccounted: "other"
        log.step(step, loss=float(step), lr=0.01)


def test_windows_are_written_as_json_lines_with_the_breakdown(tmp_path):
    clock = FakeClock()
    log, stream = make_logger(tmp_path, clock)
    run_steps(log, clock, 1, 4)
    log.close()
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [2, 4]
    first = lines[0]
    assert first["loss"] == pytest.approx(1.5) and first["lr"] == 0.01 and first["world_size"] == 2
    assert first["samples_per_s"] == pytest.approx(8 * 2 / 1.0)
    assert first["t_data"] == pytest.approx(100) and first["t_compute"] == pytest.approx(300)
    assert first["t_other"] == pytest.approx(100) and first["t_allreduce"] == 0
    out = stream.getvalue()
    assert "step 2/4 | loss 1.500 | 16 samples/s | eta 1s" in out
    assert "time per step over 4 steps:" in out and "compute" in out


def test_resumed_logger_appends_and_events_are_lines(tmp_path):
    clock = FakeClock()
    log, _ = make_logger(tmp_path, clock)
    run_steps(log, clock, 1, 2)
    log.close()
    log, _ = make_logger(tmp_path, clock, start_step=2)
    log.event("resume", step=2, world_size=2)
    run_steps(log, clock, 3, 4)
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("event", r["step"]) for r in records] == [2, "resume", 4]


def test_partial_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1}]


def test_other_ranks_write_nothing(tmp_path):
    clock = FakeClock()
    log, stream = make_logger(tmp_path, clock, rank=1)
    run_steps(log, clock, 1, 4)
    log.event("resume", step=4)
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists() and stream.getvalue() == ""


def test_progress_plain_lines_and_durations():
    assert format_duration(5) == "5s" and format_duration(192) == "3m12s" and format_duration(7300) == "2h01m"
    assert progress_line(120, 1000, 2.3141, 1234.4, 192) == "step 120/1000 | loss 2.314 | 1,234 samples/s | eta 3m12s"
    stream = io.StringIO()
    p = Progress(10, stream=stream, tty=False)
    p.update(5, 1.0, 10.0, None)
    assert stream.getvalue() == "step 5/10 | loss 1.000 | 10 samples/s | eta ?\n"


def test_tensorboard_missing_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    log, stream = make_logger(tmp_path, FakeClock(), tensorboard=True)
    log.close()
    assert "tensorboard is not installed" in stream.getvalue()


def test_breakdown_table_shares():
    table = breakdown_table({"t_compute": 75.0, "t_allreduce": 25.0}, 10)
    assert "compute" in table and "75.0%" in table and "25.0%" in table and "100.00" in table


def test_tensorboard_gets_the_logged_scalars(tmp_path):
    """With tensorboard installed (the bootstrap installs it) --tensorboard writes real event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    clock = FakeClock()
    log, stream = make_logger(tmp_path, clock, tensorboard=True)
    run_steps(log, clock, 1, 4)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(2, pytest.approx(1.5)), (4, pytest.approx(3.5))]  # the mean of each logged window
    assert "time_ms/compute" in events.Tags()["scalars"]
    assert "not installed" not in stream.getvalue()


def test_progress_on_a_terminal_is_a_tqdm_bar(tmp_path):
    """A real pseudo-terminal: the bar redraws in place (carriage returns) with the loss on it."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    with os.fdopen(slave, "w") as terminal:
        p = Progress(10, stream=terminal)
        assert p.tty
        p.update(4, 2.5, 1234.0, 30.0)
        p.close()
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the slave side is closed: everything has been read
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    text = out.decode()
    assert "\r" in text and "4/10" in text and "loss 2.500 | 1,234 samples/s" in text, repr(text)
    assert "step 4/10 | loss" not in text  # not the plain log line


def test_nested_phases_are_not_counted_twice():
    """distrib.Run times the loop body as compute and the optimizer's step inside it: the body is
    charged only for the time outside the step."""
    from distrib.watch.metrics import NestedPhaseTimer
    clock = FakeClock()
    timer = NestedPhaseTimer(clock=clock)
    with timer.phase("compute"):
        clock.now += 1.0
        with timer.phase("optimizer"):
            clock.now += 0.25
            with timer.phase("allreduce"):
                clock.now += 0.5
        clock.now += 2.0
    assert timer.take() == {"compute": 3.0, "optimizer": 0.25, "allreduce": 0.5}


def test_any_logged_metric_is_averaged_over_the_window_and_the_total_can_change(tmp_path):
    clock = FakeClock()
    log, stream = make_logger(tmp_path, clock, total_steps=4)
    for step, acc in ((1, 0.5), (2, 1.0), (3, 0.0), (4, 0.5)):
        clock.now += 1.0
        log.step(step, accuracy=acc)  # no loss: a metric of the user's own
    log.set_total(8)
    clock.now += 1.0
    log.step(5, loss=2.0, accuracy=1.0)
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["accuracy"]) for r in records] == [(2, 0.75), (4, 0.25)]
    assert "loss" not in records[0] and "lr" not in records[0]
    assert "step 2/4 | 8 samples/s | eta 2s" in stream.getvalue()  # no loss logged: none shown


def tensor_logger(tmp_path, rank=0, **kw):
    return MetricsLogger(tmp_path, ctx(rank), total_steps=6, log_every=3, global_batch=8, stream=io.StringIO(),
                         tty=False, clock=FakeClock(), wall_clock=lambda: 1000.0, **kw)


def test_tensors_are_summed_on_the_device_and_read_once_per_window(tmp_path):
    """A loop that logs tensors every step makes the host wait for the device once per logged
    window (when its line is written), not once per step; the file is the same as with floats.
    Counted as tests/test_step_syncs.py counts the step's waits."""
    from tests.scripts.sync_counter import SyncCounter
    torch.manual_seed(0)
    weight = torch.rand(6, dtype=torch.float32, requires_grad=True)
    losses, accuracies = weight * 3, torch.rand(6, dtype=torch.float64)
    with_floats = tensor_logger(tmp_path / "floats")
    for step in range(1, 7):
        with_floats.step(step, loss=losses[step - 1].item(), acc=accuracies[step - 1].item())
    with_floats.close()
    with_tensors = tensor_logger(tmp_path / "tensors")
    with SyncCounter().counting() as counter:
        for step in range(1, 7):
            with_tensors.step(step, loss=losses[step - 1], acc=accuracies[step - 1:step])
    with_tensors.close()
    assert len(counter.calls) == 2 and all("watch/metrics.py" in c for c in counter.calls), counter.calls
    assert read_metrics(tmp_path / "tensors" / "metrics.jsonl") == read_metrics(tmp_path / "floats" / "metrics.jsonl")
    assert [r["step"] for r in read_metrics(tmp_path / "tensors" / "metrics.jsonl")] == [3, 6]


def test_tensors_of_other_ranks_are_read_only_to_be_averaged(tmp_path):
    """Rank 1 writes nothing: it reads no value, unless the window's means are averaged over the
    ranks (one read, then the one collective, which gets floats)."""
    from tests.scripts.sync_counter import SyncCounter
    seen = []
    quiet, averaging = tensor_logger(tmp_path, rank=1), tensor_logger(tmp_path, rank=1, average=lambda means: seen.append(means) or means)
    with SyncCounter().counting() as counter:
        for step in range(1, 4):
            quiet.step(step, loss=torch.tensor(float(step)))
    assert counter.calls == []
    with SyncCounter().counting() as counter:
        for step in range(1, 4):
            averaging.step(step, loss=torch.tensor(float(step)))
    assert len(counter.calls) == 1 and seen == [{"loss": 2.0}] and type(seen[0]["loss"]) is float


def test_a_tensor_of_more_than_one_value_is_refused(tmp_path):
    log = tensor_logger(tmp_path)
    with pytest.raises(ValueError, match=r"logged metric 'loss' is a tensor of shape \(2,\); .*loss=value.mean\(\)"):
        log.step(1, loss=torch.ones(2))
