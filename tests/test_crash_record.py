"""distrib/watch/crash_record.py: an uncaught exception is reported to the launcher's status server before
the process goes on to exit (and to Horovod's atexit shutdown), and the traceback still reaches stderr."""
import os
import subprocess
import sys
import threading

from distrib.watch import crash_record
from tests.helpers import REPO
from tests.test_launch_status_channel import server, wait_for  # noqa: F401 - a fixture

# The atexit handler waits (bounded) for the launcher to have the record (the test creates the
# file sys.argv[1] once the server's table holds it): it can only be there if the hook sent it
# before the atexit handlers ran.
RAISE = """
import atexit, os, sys, time
from distrib.watch import crash_record
def check():
    deadline = time.monotonic() + 10
    while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("atexit sees record:", os.path.exists(sys.argv[1]), flush=True)
atexit.register(check)
crash_record.install(lambda: 3)
raise {exc}
"""


def run_raising(tmp_path, server, exc):
    """Run RAISE; returns the process and rank 3's raised report as the launcher's table has it (or None)."""
    env = {**os.environ, **server.env()}
    arrived = tmp_path / "arrived"
    done = threading.Event()

    def tell_the_child():  # what the child's atexit handler waits for
        if wait_for(lambda: 3 in server.table.read().raised or done.is_set(), timeout=60) and not done.is_set():
            arrived.touch()
    watcher = threading.Thread(target=tell_the_child)
    watcher.start()
    try:
        proc = subprocess.run([sys.executable, "-c", RAISE.format(exc=exc), str(arrived)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        done.set()
        watcher.join()
    return proc, server.table.read().raised.get(3)


def test_an_uncaught_exception_is_recorded_before_atexit_and_still_printed(tmp_path, server):
    proc, record = run_raising(tmp_path, server, 'ValueError("bad shard\\nsecond line")')
    assert proc.returncode == 1
    assert "atexit sees record: True" in proc.stdout          # arrived before the atexit handlers ran
    assert proc.stderr.rstrip().endswith("second line")       # the usual traceback, untouched
    assert record["rank"] == 3 and record["pid"] > 0 and record["host"]
    assert record["exception"] == "ValueError: bad shard"
    assert record["traceback_tail"][0] == "Traceback (most recent call last):"
    assert record["traceback_tail"][-2:] == ["ValueError: bad shard", "second line"]


def test_ctrl_c_is_not_a_crash(tmp_path, server):
    proc, record = run_raising(tmp_path, server, "KeyboardInterrupt")
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert record is None


def test_nothing_is_installed_outside_the_launcher(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    assert crash_record.install(lambda: 0, env={}) is False
    assert sys.excepthook is sys.__excepthook__


def test_installing_twice_keeps_one_hook(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    env = server.env()
    assert crash_record.install(lambda: 0, env=env) and crash_record.install(lambda: 0, env=env)
    try:
        raise ValueError("once")
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    assert capsys.readouterr().err.count("ValueError: once") == 1  # not chained to itself
    assert wait_for(lambda: 0 in server.table.read().raised)
    assert server.table.read().raised[0]["exception"] == "ValueError: once"


def test_an_unreachable_launcher_still_shows_the_traceback(tmp_path, server):
    env = server.env()
    server.close()
    proc = subprocess.run([sys.executable, "-c", "from distrib.watch import crash_record\n"
                           "crash_record.install(lambda: 0)\nraise ValueError('lost report')"],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.rstrip().endswith("ValueError: lost report")


def test_describe_is_one_short_line():
    assert crash_record.describe(RuntimeError("x" * 500)) == "RuntimeError: " + "x" * 183 + "..."
    assert crash_record.describe(KeyError()) == "KeyError"
    assert crash_record.describe(OSError("disk full\n  details")) == "OSError: disk full"
