"""distrib/crash_record.py: an uncaught exception is written to DISTRIB_STATUS_DIR before the
process goes on to exit (and to Horovod's atexit shutdown), and the traceback still reaches stderr."""
import json
import os
import subprocess
import sys

from distrib import crash_record
from tests.helpers import REPO

RAISE = """
import atexit, os, sys
from distrib import crash_record
atexit.register(lambda: print("atexit sees record:", os.path.exists(sys.argv[1]), flush=True))
crash_record.install(lambda: 3)
raise {exc}
"""


def run_raising(tmp_path, exc):
    env = {**os.environ, crash_record.STATUS_DIR_ENV: str(tmp_path)}
    record = tmp_path / "raised-3.json"
    proc = subprocess.run([sys.executable, "-c", RAISE.format(exc=exc), str(record)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, record


def test_an_uncaught_exception_is_recorded_before_atexit_and_still_printed(tmp_path):
    proc, record = run_raising(tmp_path, 'ValueError("bad shard\\nsecond line")')
    assert proc.returncode == 1
    assert "atexit sees record: True" in proc.stdout          # written before the atexit handlers ran
    assert proc.stderr.rstrip().endswith("second line")       # the usual traceback, untouched
    written = json.loads(record.read_text())
    assert written["rank"] == 3 and written["pid"] > 0 and written["host"]
    assert written["exception"] == "ValueError: bad shard"
    assert written["traceback_tail"][0] == "Traceback (most recent call last):"
    assert written["traceback_tail"][-2:] == ["ValueError: bad shard", "second line"]
    assert [p.name for p in tmp_path.iterdir()] == ["raised-3.json"]  # no temporary file left


def test_ctrl_c_is_not_a_crash(tmp_path):
    proc, record = run_raising(tmp_path, "KeyboardInterrupt")
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert not record.exists()


def test_nothing_is_installed_outside_the_launcher(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    assert crash_record.install(lambda: 0, env={}) is False
    assert sys.excepthook is sys.__excepthook__


def test_installing_twice_keeps_one_hook(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    env = {crash_record.STATUS_DIR_ENV: str(tmp_path)}
    assert crash_record.install(lambda: 0, env=env) and crash_record.install(lambda: 0, env=env)
    try:
        raise ValueError("once")
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    assert capsys.readouterr().err.count("ValueError: once") == 1  # not chained to itself
    assert json.loads((tmp_path / "raised-0.json").read_text())["exception"] == "ValueError: once"


def test_describe_is_one_short_line():
    assert crash_record.describe(RuntimeError("x" * 500)) == "RuntimeError: " + "x" * 183 + "..."
    assert crash_record.describe(KeyError()) == "KeyError"
    assert crash_record.describe(OSError("disk full\n  details")) == "OSError: disk full"


def test_the_status_folder_variable_is_the_launchers():
    from launch.plan import STATUS_DIR_ENV
    assert crash_record.STATUS_DIR_ENV == STATUS_DIR_ENV
