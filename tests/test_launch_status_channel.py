"""launch/status_channel.py and launch/status_server.py: signed reports from the workers to the
launcher. A forged, unsigned or malformed report is refused and leaves the launcher's table as it was."""
import json
import re
import socket
import subprocess
import sys
import time

import pytest

from launch import status_channel
from launch.status_channel import (ADDRESS_ENV, SECRET_ENV, Channel, decode, encode, new_secret, parse_address)
from launch.status_server import StatusServer, report_key, reachable_addresses
from tests.helpers import REPO


def nothing_reported(srv):
    r = srv.table.read()
    return not (r.started or r.ended or r.raised or r.beats or r.calls)


@pytest.fixture
def server():
    """A real status server (other test modules import this fixture)."""
    srv = StatusServer()
    yield srv
    srv.close()


def wait_for(predicate, timeout=10.0):
    """A bounded wait for something a thread does (not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


ENDED = {"kind": "ended", "rank": 0, "host": "node1", "pid": 7, "exit_code": 9, "signal": None,
         "end_time": 1.0, "stderr_tail": []}


def test_only_the_right_key_opens_a_message():
    key, other = new_secret(), new_secret()
    line = encode(key, ENDED)
    assert decode(key, line) == ENDED
    assert decode(other, line) is None                                        # forged: another key
    assert decode(key, json.dumps(ENDED).encode()) is None                    # unsigned
    assert decode(key, line.replace(b'"exit_code":9', b'"exit_code":0')) is None  # tampered
    assert decode(key, encode(key, {"kind": "format-disk"})) is None          # signed but not a report
    assert decode(key, b"") is None and decode(key, b"\xff\xfe garbage") is None


@pytest.mark.parametrize("text, parsed", [
    ("198.18.0.1,127.0.0.1:4000", (("198.18.0.1", "127.0.0.1"), 4000)), ("h:1", (("h",), 1))])
def test_parse_address(text, parsed):
    assert parse_address(text) == parsed


@pytest.mark.parametrize("text", ["", ":4000", "h:", "h:x"])
def test_bad_address_is_refused(text):
    with pytest.raises(ValueError, match=ADDRESS_ENV):
        parse_address(text)
    assert Channel.from_env({ADDRESS_ENV: text, SECRET_ENV: new_secret()}) is None


@pytest.mark.parametrize("message, key", [
    ({"kind": "ended", "rank": 3}, 3), ({"kind": "raised", "rank": 0}, 0),
    ({"kind": "started", "rank": None, "pid": 5}, "unknown-5"), ({"kind": "beat", "rank": 1}, 1),
    ({"kind": "beat", "rank": None, "pid": 5}, None),  # a heartbeat is always a rank's
    ({"kind": "ended", "rank": "../../etc/x"}, None), ({"kind": "ended", "rank": -1}, None),
    ({"kind": "ended", "rank": True}, None), ({"kind": "ended", "rank": None, "pid": "1/2"}, None)])
def test_reports_are_kept_only_under_ranks(message, key):
    assert report_key(message) == key


def test_forged_and_unsigned_reports_are_refused_and_change_nothing(server):
    addresses, port = parse_address(server.env()[ADDRESS_ENV])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(encode(new_secret(), ENDED))               # signed with a key of its own
        s.sendall(json.dumps(ENDED).encode() + b"\n")         # not signed at all
        s.sendall(b"0" * 64 + b" " + json.dumps(ENDED).encode() + b"\n")
    assert wait_for(lambda: server.refused == 3)
    assert nothing_reported(server)
    good = Channel(addresses, port, server.secret)
    assert good.send({**ENDED, "exit_code": 0})
    good.close()
    assert wait_for(lambda: 0 in server.table.read().ended)
    kept = server.table.read().ended[0]
    assert kept["exit_code"] == 0 and kept["end_time"] > 1.0  # the launcher's clock at arrival
    assert server.refused == 3


def test_a_previous_attempts_secret_is_refused():
    first, second = StatusServer(), StatusServer()
    try:
        assert first.secret != second.secret
        addresses, port = parse_address(second.env()[ADDRESS_ENV])
        late = Channel(addresses, port, first.secret)
        assert late.send(ENDED)  # it leaves; the launcher drops it
        late.close()
        assert wait_for(lambda: second.refused == 1) and nothing_reported(second)
    finally:
        first.close()
        second.close()


def test_a_line_without_end_is_dropped(server):
    _, port = parse_address(server.env()[ADDRESS_ENV])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(b"x" * (status_channel.MAX_LINE_BYTES + 65536))
        except OSError:
            pass  # the server may hang up first
    assert wait_for(lambda: server.refused == 1)


def test_the_address_list_puts_loopback_last():
    addresses = reachable_addresses()
    assert addresses[-1].startswith("127.")
    assert all(not a.startswith("127.") for a in addresses[:-1] if not addresses[-1] == a)


def test_launch_imports_no_torch():
    """The launcher starts fast: none of its modules, the channel included, imports torch."""
    code = ("import sys, launch.__main__, launch.status_channel, launch.status_server, launch.worker\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_distrib_reads_only_the_launcher_variables_the_channel_names():
    """The contract between distrib and the launcher's variables: distrib/watch/metrics.py reads the
    restart count through the channel's own constant, and any DISTRIB_ name that distrib reads by
    its literal and the launcher sets is one of launch/status_channel.py's; no retired name is left."""
    from distrib.watch import metrics
    read = set()
    for path in (REPO / "distrib").rglob("*.py"):
        read |= set(re.findall(r'"(DISTRIB_[A-Z_]+)"', path.read_text()))
    set_by_launcher = {*status_channel.RUNTIME_ENV_NAMES, status_channel.HEARTBEAT_ENV}
    assert metrics.RESTART_COUNT_ENV is status_channel.RESTART_COUNT_ENV  # distrib.watch.metrics records the attempt
    assert not read & {"DISTRIB_STATUS_DIR", "DISTRIB_HEARTBEAT_FILE_DIR"}
    assert {n for n in read if n.startswith(("DISTRIB_STATUS", "DISTRIB_HEARTBEAT"))} <= set_by_launcher
