"""distrib/heartbeat.py: the library side of the launcher's hang detection (beats sent to a real StatusServer)."""
import pytest

import distrib.heartbeat as heartbeat
from distrib.heartbeat import Heartbeat, beat, heartbeat_sender
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


def test_a_sender_needs_the_switch_the_channel_and_a_rank(server):
    channel = server.env()
    assert heartbeat_sender({}) is None
    assert heartbeat_sender({**channel, "HOROVOD_RANK": "1"}) is None           # no --hang-timeout
    assert heartbeat_sender({HEARTBEAT_ENV: "1", "HOROVOD_RANK": "1"}) is None  # no launcher
    assert heartbeat_sender({**channel, HEARTBEAT_ENV: "1"}) is None            # no rank
    assert heartbeat_sender({**channel, HEARTBEAT_ENV: "1", "OMPI_COMM_WORLD_RANK": "3"}) is not None


def test_beat_is_a_no_op_without_the_variables(monkeypatch):
    for name in (HEARTBEAT_ENV, ADDRESS_ENV, SECRET_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOROVOD_RANK", "0")
    beat()
    beat()
    assert heartbeat._heartbeat is None and heartbeat._disabled


def test_the_first_beat_is_sent_at_once_and_the_count_again_every_interval():
    """A rank blocked in an allreduce still sends: the launcher sees it alive, only its count stops."""
    sent = []
    hb = Heartbeat(lambda count: sent.append(count) or True, interval=0.05)
    hb.beat()
    assert sent == [1]  # before the thread ever ran: a rank stopped now is judged
    for _ in range(4):
        hb.beat()
    assert wait_for(lambda: sent and sent[-1] == 5)
    n = len(sent)
    assert wait_for(lambda: len(sent) >= n + 2)  # the count stands still, the sends go on
    hb.close()
    assert sent[-1] == 5


def test_beat_reaches_the_launchers_file_for_this_rank(tmp_path, server, monkeypatch):
    for name, value in {**server.env(), HEARTBEAT_ENV: "1", "HOROVOD_RANK": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(heartbeat, "SEND_INTERVAL_S", 0.05)
    for _ in range(3):
        beat()
    assert heartbeat._heartbeat.count == 3
    path = tmp_path / "heartbeat-2"
    assert wait_for(lambda: path.exists() and path.read_text() == "3\n")


def test_beat_never_raises_when_the_launcher_is_gone(server, monkeypatch):
    for name, value in {**server.env(), HEARTBEAT_ENV: "1", "HOROVOD_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    server.close()
    beat()
    beat()
    assert heartbeat._heartbeat.count == 2


def test_a_failing_sender_does_not_stop_the_beats():
    calls = []

    def send(count):
        calls.append(count)
        raise OSError("network unreachable")
    hb = Heartbeat(send, interval=0.02)
    hb.beat()
    assert wait_for(lambda: len(calls) >= 3)
    hb.close()
