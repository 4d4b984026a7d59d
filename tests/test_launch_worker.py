"""launch/worker.py, the shim: pass output through, report how the script ended, forward signals,
stop the script when the launcher ends its connection. Reports go to a real StatusServer."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from launch.status_channel import ADDRESS_ENV, SECRET_ENV, new_secret
from launch.status_server import StatusServer
from launch.worker import exit_status, rank_from_env, script_argv, tail_lines
from tests.helpers import REPO


@pytest.fixture
def server():
    srv = StatusServer()
    yield srv
    srv.close()


def wait_for_report(server, kind, rank, timeout=20.0):
    """A report once the server has it (reports arrive over TCP, after the shim sent them)."""
    deadline = time.monotonic() + timeout
    while rank not in getattr(server.table.read(), kind) and time.monotonic() < deadline:
        time.sleep(0.02)
    return getattr(server.table.read(), kind)[rank]


@pytest.mark.parametrize("env, rank", [
    ({"HOROVOD_RANK": "3"}, 3), ({"OMPI_COMM_WORLD_RANK": "1"}, 1), ({"PMIX_RANK": "2"}, 2),
    ({"SLURM_PROCID": "5"}, 5), ({"HOROVOD_RANK": "0", "OMPI_COMM_WORLD_RANK": "1"}, 0), ({}, None),
    ({"HOROVOD_RANK": ""}, None),
])
def test_rank_from_env(env, rank):
    assert rank_from_env(env) == rank


@pytest.mark.parametrize("argv, expected", [
    (["t.py", "--", "--log", "x"], ["t.py", "--log", "x"]),  # as the launcher starts it
    (["t.py", "--", "--", "a"], ["t.py", "--", "a"]),          # the script's own "--" survives
    (["t.py", "--log", "x"], ["t.py", "--log", "x"]),          # started by hand
    (["t.py"], ["t.py"]),
])
def test_script_argv_drops_the_launchers_separator(argv, expected):
    assert script_argv(argv) == expected


def test_exit_status_and_tail():
    assert exit_status(0) == (0, None)
    assert exit_status(3) == (3, None)
    assert exit_status(-9) == (137, "SIGKILL")
    assert exit_status(-15) == (143, "SIGTERM")
    assert tail_lines(b"a\nb\r\n\nc\xff\n" + b"x\n" * 30, 3) == ["x", "x", "x"]
    assert tail_lines(b"a\nb\r\n\nc\xff") == ["a", "b", "c\ufffd"]


def shim(tmp_path, server, code, rank="1", **kw):
    script = tmp_path / "script.py"
    script.write_text(code)
    env = {**os.environ, **server.env(), "HOROVOD_RANK": rank}
    return subprocess.Popen([sys.executable, "-m", "launch.worker", str(script), "arg 1"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def status(server, rank=1):
    return wait_for_report(server, "ended", rank)


@pytest.mark.timeout(60)
def test_exit_code_output_and_status(tmp_path, server):
    proc = shim(tmp_path, server, "import sys\nprint('out', sys.argv[1:])\n"
                          "for i in range(25): print('err', i, file=sys.stderr)\nsys.exit(3)\n")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert out == "out ['arg 1']\n"
    assert err == "".join(f"err {i}\n" for i in range(25))
    s = status(server)
    assert (s["rank"], s["exit_code"], s["signal"]) == (1, 3, None)
    assert s["stderr_tail"] == [f"err {i}" for i in range(5, 25)]
    assert abs(s["end_time"] - time.time()) < 60 and s["host"]
    started = wait_for_report(server, "started", 1)
    assert started["pid"] == s["pid"] and started["shim_pid"] == proc.pid


@pytest.mark.timeout(60)
def test_sigkilled_script_is_seen(tmp_path, server):
    proc = shim(tmp_path, server, "import os, sys\nprint('dying', file=sys.stderr)\nos.kill(os.getpid(), 9)\n", rank="0")
    proc.communicate(timeout=30)
    assert proc.returncode == 137
    s = status(server, 0)
    assert (s["exit_code"], s["signal"], s["stderr_tail"]) == (137, "SIGKILL", ["dying"])


@pytest.mark.timeout(60)
def test_sigterm_is_forwarded_to_the_script(tmp_path, server):
    code = ("import signal, sys, time\n"
            "def on_term(*a):\n    print('got TERM', file=sys.stderr, flush=True); sys.exit(7)\n"
            "signal.signal(signal.SIGTERM, on_term)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = shim(tmp_path, server, code)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 7 and "got TERM" in err
    assert status(server)["exit_code"] == 7


@pytest.mark.timeout(60)
def test_a_signal_request_from_the_launcher_reaches_the_script(tmp_path, server):
    """How SIGUSR2 reaches a worker on another host: a signed ``signal`` request on the shim's
    connection. A signal the shim would not forward itself (SIGKILL) is ignored."""
    code = ("import signal, sys, time\n"
            "def on_usr2(*a):\n    print('got USR2', file=sys.stderr, flush=True); sys.exit(4)\n"
            "signal.signal(signal.SIGUSR2, on_usr2)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = shim(tmp_path, server, code)
    assert proc.stdout.readline() == "ready\n"
    wait_for_report(server, "started", 1)
    assert server.request(1, "signal", signal="SIGKILL")
    assert server.request(1, "signal", signal="SIGUSR2")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 4 and "got USR2" in err
    assert status(server)["exit_code"] == 4


@pytest.mark.timeout(60)
def test_script_dies_with_a_killed_shim(tmp_path, server):
    proc = shim(tmp_path, server, "import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    assert proc.stdout.readline() == "ready\n"
    child = wait_for_report(server, "started", 1)["pid"]
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{child}") and \
            open(f"/proc/{child}/stat").read().split()[2] != "Z":
        time.sleep(0.05)
    stat = open(f"/proc/{child}/stat").read().split()[2] if os.path.exists(f"/proc/{child}") else "gone"
    assert stat in ("gone", "Z")


@pytest.mark.timeout(60)
def test_the_launcher_ending_the_connection_stops_the_script(tmp_path, server):
    """How a worker on another host is stopped: SIGTERM (its handler runs), and the end is reported."""
    code = ("import signal, sys, time\n"
            "def on_term(*a):\n    print('got TERM', file=sys.stderr, flush=True); sys.exit(5)\n"
            "signal.signal(signal.SIGTERM, on_term)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = shim(tmp_path, server, code)
    assert proc.stdout.readline() == "ready\n"
    wait_for_report(server, "started", 1)
    server.stop_workers()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 5 and "got TERM" in err
    assert status(server)["exit_code"] == 5  # the server still reads after it stopped writing


@pytest.mark.timeout(60)
def test_a_script_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, server):
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    script = tmp_path / "script.py"
    script.write_text(code)
    env = {**os.environ, **server.env(), "HOROVOD_RANK": "0", "DISTRIB_STOP_GRACE": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.worker", str(script)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    wait_for_report(server, "started", 0)
    server.stop_workers()
    proc.communicate(timeout=30)
    assert proc.returncode == 137 and status(server, 0)["signal"] == "SIGKILL"


@pytest.mark.timeout(60)
def test_an_unreachable_launcher_does_not_stop_the_script(tmp_path):
    """Reports are best-effort: nothing listens on the port, the script runs and its code stands."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint('trained')\nsys.exit(4)\n")
    env = {**os.environ, ADDRESS_ENV: f"127.0.0.1:{port}", SECRET_ENV: new_secret(), "HOROVOD_RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "launch.worker", str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, "trained\n", "")


@pytest.mark.timeout(60)
def test_without_the_channel_reports_nothing(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("print('hi')\n")
    env = {k: v for k, v in os.environ.items() if k not in (ADDRESS_ENV, SECRET_ENV)}
    proc = subprocess.run([sys.executable, "-m", "launch.worker", str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "hi\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.py"]
