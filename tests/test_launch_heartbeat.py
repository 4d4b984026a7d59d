"""distrib/watch/heartbeat.py: the library side of the launcher's hang, mismatch and straggler checks
(beats sent to a real StatusServer, requests answered over the same connection)."""
import threading

import pytest

import distrib.watch.heartbeat as heartbeat
from distrib.watch.heartbeat import Heartbeat, beat, heartbeat_sender
from launch.status_channel import ADDRESS_ENV, HEARTBEAT_ENV, SECRET_ENV
from tests.test_launch_status_channel import server, wait_for  # noqa: F401 - a fixture


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """beat() keeps its sender per process; each test starts as a new process would."""
    monkeypatch.setattr(heartbeat, "_heartbeat", None)
    monkeypatch.setattr(heartbeat, "_disabled", False)
    yield
    if heartbeat._heartbeat is not None:
        heartbeat._heartbeat.close()


class FakeChannel:
    """Records what is sent; the thread's receive() just waits (no launcher requests)."""

    def __init__(self, fail=False):
        self.sent, self.fail, self.closed = [], fail, threading.Event()

    def send(self, message):
        self.sent.append(message)
        if self.fail:
            raise OSError("network unreachable")
        return True

    def receive(self, timeout):
        self.closed.wait(timeout)
        return []


def test_a_sender_needs_the_switch_the_channel_and_a_rank(server):
    channel = server.env()
    assert heartbeat_sender({}) is None
    assert heartbeat_sender({**channel, "HOROVOD_RANK": "1"}) is None           # the launcher did not ask for it
    assert heartbeat_sender({HEARTBEAT_ENV: "1", "HOROVOD_RANK": "1"}) is None  # no launcher
    assert heartbeat_sender({**channel, HEARTBEAT_ENV: "1"}) is None            # no rank
    assert heartbeat_sender({**channel, HEARTBEAT_ENV: "1", "OMPI_COMM_WORLD_RANK": "3"})[1] == 3


def test_beat_is_a_no_op_without_the_variables(monkeypatch):
    for name in (HEARTBEAT_ENV, ADDRESS_ENV, SECRET_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOROVOD_RANK", "0")
    beat()
    beat("allreduce.x", [2], "float32")
    heartbeat.step_done(10, {"compute": 0.1}, 0.2)
    assert heartbeat._heartbeat is None and heartbeat._disabled and heartbeat.take_notices() == []


def test_the_first_beat_is_sent_at_once_and_the_count_again_every_interval():
    """A rank blocked in an allreduce still sends: the launcher sees it alive, only its count stops."""
    channel = FakeChannel()
    hb = Heartbeat(channel, rank=0, interval=0.05)
    hb.beat()
    assert [m["count"] for m in channel.sent] == [1]  # before the thread ever ran: a rank stopped now is judged
    for _ in range(4):
        hb.beat()
    assert wait_for(lambda: channel.sent[-1]["count"] == 5)
    n = len(channel.sent)
    assert wait_for(lambda: len(channel.sent) >= n + 2)  # the count stands still, the sends go on
    hb.close()
    channel.closed.set()
    assert channel.sent[-1]["count"] == 5


def test_collectives_are_sent_once_with_their_numbers_shapes_and_dtypes():
    channel = FakeChannel()
    hb = Heartbeat(channel, rank=1, interval=60)
    hb.beat("allreduce.a", [4, 2], "float32")
    hb.beat()                                   # a beat with no collective named: counted, not recorded
    hb.beat("broadcast.b", [3], "int64")
    hb.flush()
    hb.flush()
    hb.beat("allreduce.a", [4, 2], "float32")
    hb.flush()
    hb.close()
    channel.closed.set()
    assert channel.sent[0]["calls"] == [[1, "allreduce.a", [4, 2], "float32", 1]]
    assert channel.sent[1]["calls"] == [[3, "broadcast.b", [3], "int64", 1]] and channel.sent[1]["count"] == 3
    assert channel.sent[3]["calls"] == [[4, "allreduce.a", [4, 2], "float32", 2]]  # its second call
    assert channel.sent[2]["calls"] == []       # nothing new: nothing repeated


def test_phase_windows_leave_out_the_wait_for_the_peers():
    """A window of WINDOW_STEPS steps ends at a multiple of it (the same steps on every rank)."""
    hb = Heartbeat(FakeChannel(), rank=0, interval=60)
    for step in range(1, 2 * heartbeat.WINDOW_STEPS + 4):
        hb.step_done(step, {"compute": 0.010, "allreduce": 0.005}, 0.020)
    windows = list(hb._windows)
    assert [w[0] for w in windows] == [heartbeat.WINDOW_STEPS, 2 * heartbeat.WINDOW_STEPS]
    assert windows[0][1] == pytest.approx({"compute": 10.0, "other": 5.0})  # 20 ms - 10 compute - 5 waiting
    assert hb.step == 2 * heartbeat.WINDOW_STEPS + 3


def test_beat_reaches_the_launchers_table_for_this_rank(server, monkeypatch):
    for name, value in {**server.env(), HEARTBEAT_ENV: "1", "HOROVOD_RANK": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(heartbeat, "SEND_INTERVAL_S", 0.05)
    beat("allreduce.grads", [8], "float32")
    for _ in range(2):
        beat()
    assert heartbeat._heartbeat.count == 3
    assert wait_for(lambda: 2 in server.table.read().beats and server.table.read().beats[2].count == 3)
    assert server.table.read().calls[2] == {1: ("allreduce.grads", (8,), "float32")}


def test_the_launcher_gets_the_stacks_of_a_rank_whose_main_thread_is_busy(server, monkeypatch):
    """What the hang report shows: the main thread's source line, asked for over the heartbeat's connection."""
    for name, value in {**server.env(), HEARTBEAT_ENV: "1", "HOROVOD_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(heartbeat, "SEND_INTERVAL_S", 0.05)
    stuck = threading.Event()

    def stuck_here():
        beat("allreduce.stuck", [1], "float32")
        stuck.wait(30)  # STUCK-HERE
    worker = threading.Thread(target=stuck_here, name="worker-thread")
    worker.start()
    try:
        assert wait_for(lambda: 0 in server.table.read().beats)
        assert server.request(0, "want_stacks")
        assert wait_for(lambda: server.table.answer("stacks", 0) is not None)
    finally:
        stuck.set()
        worker.join()
    threads = server.table.answer("stacks", 0)["threads"]
    assert threads[0]["main"] and threads[0]["name"] == "MainThread"       # the main thread comes first
    assert "distrib-heartbeat" not in [t["name"] for t in threads]          # the answering thread is left out
    mine = next(t for t in threads if t["name"] == "worker-thread")
    ours = [f for f in mine["frames"] if f[2] == "stuck_here"]  # then threading's own frames of wait()
    assert mine["last_call"] == 1 and len(ours) == 1 and "STUCK-HERE" in ours[0][3]


def test_beat_never_raises_when_the_launcher_is_gone(server, monkeypatch):
    for name, value in {**server.env(), HEARTBEAT_ENV: "1", "HOROVOD_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    server.close()
    beat()
    beat()
    assert heartbeat._heartbeat.count == 2


def test_a_failing_sender_does_not_stop_the_beats():
    channel = FakeChannel(fail=True)
    hb = Heartbeat(channel, rank=0, interval=0.02)
    hb.beat()
    assert wait_for(lambda: len(channel.sent) >= 3)
    hb.close()
    channel.closed.set()
