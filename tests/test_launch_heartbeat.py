"""distrib/heartbeat.py: the library side of the launcher's hang detection."""
import os
import time

from distrib.heartbeat import HEARTBEAT_DIR_ENV, beat, heartbeat_path


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
    assert list(tmp_path.iterdir()) == []


def test_beat_touches_the_file_at_most_once_a_second(tmp_path, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HOROVOD_RANK", "2")
    path = tmp_path / "heartbeat-2"
    beat()
    assert path.exists()
    recent = time.time() - 0.5
    os.utime(path, (recent, recent))
    beat()  # within the second: not touched
    assert path.stat().st_mtime == recent
    old = time.time() - 30
    os.utime(path, (old, old))
    beat()
    assert path.stat().st_mtime > old + 25


def test_beat_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_DIR_ENV, str(tmp_path / "missing" / "dir"))
    monkeypatch.setenv("HOROVOD_RANK", "0")
    beat()
