"""distrib/heartbeat.py: the library side of the launcher's hang detection."""
import time

import pytest

import distrib.heartbeat as heartbeat
from distrib.heartbeat import HEARTBEAT_DIR_ENV, Heartbeat, beat, heartbeat_path


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """beat() keeps its writer per process; each test starts as a new process would."""
    monkeypatch.setattr(heartbeat, "_heartbeat", None)
    monkeypatch.setattr(heartbeat, "_disabled", False)
    yield
    if heartbeat._heartbeat is not None:
        heartbeat._heartbeat.close()


def wait_for_content(path, expected, timeout=10.0):
    """The file's content once it equals ``expected`` (a bounded wait, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == expected:
            return expected
        time.sleep(0.01)
    return path.read_text() if path.exists() else None


def test_path_needs_the_directory_and_a_rank(tmp_path):
    assert heartbeat_path({}) is None
    assert heartbeat_path({HEARTBEAT_DIR_ENV: str(tmp_path)}) is None
    assert heartbeat_path({"HOROVOD_RANK": "1"}) is None
    assert heartbeat_path({HEARTBEAT_DIR_ENV: str(tmp_path), "OMPI_COMM_WORLD_RANK": "3"}) == \
        str(tmp_path / "heartbeat-3")


def test_beat_is_a_no_op_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(HEARTBEAT_DIR_ENV, raising=False)
    monkeypatch.setenv("HOROVOD_RANK", "0")
    monkeypatch.chdir(tmp_path)
    beat()
    beat()
    assert list(tmp_path.iterdir()) == [] and heartbeat._heartbeat is None


def test_the_first_beat_is_written_at_once_and_the_rest_by_the_writer(tmp_path):
    path = tmp_path / "heartbeat-2"
    hb = Heartbeat(str(path), interval=0.05)
    hb.beat()
    assert path.read_text() == "1\n"  # before the writer thread ever ran: a rank stopped now is judged
    for _ in range(4):
        hb.beat()
    assert wait_for_content(path, "5\n") == "5\n"
    hb.close()


def test_the_writer_keeps_writing_while_the_count_stands_still(tmp_path):
    """A rank blocked in an allreduce still writes: its file stays fresh, only its count stops."""
    path = tmp_path / "heartbeat-0"
    hb = Heartbeat(str(path), interval=0.05)
    hb.beat()
    first = path.stat().st_mtime_ns
    deadline = time.monotonic() + 10
    while path.stat().st_mtime_ns == first and time.monotonic() < deadline:
        time.sleep(0.01)
    hb.close()
    assert path.stat().st_mtime_ns > first and path.read_text() == "1\n"


def test_beat_writes_this_ranks_file(tmp_path, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HOROVOD_RANK", "2")
    monkeypatch.setattr(heartbeat, "WRITE_INTERVAL_S", 0.05)
    for _ in range(3):
        beat()
    assert heartbeat._heartbeat.count == 3
    assert wait_for_content(tmp_path / "heartbeat-2", "3\n") == "3\n"


def test_beat_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_DIR_ENV, str(tmp_path / "missing" / "dir"))
    monkeypatch.setenv("HOROVOD_RANK", "0")
    beat()
    beat()
    assert heartbeat._heartbeat.count == 2
