"""Table tests for launch/hosts.py: -H lists, hostfiles, local vs remote, the ssh check."""
import subprocess

import pytest

from launch.hosts import (check_ssh, format_hosts, hosts_needing_ssh, is_local, parse_host_list, parse_hostfile,
                          read_hostfile, remote_hosts, total_slots, unreachable_host_error)

LOCAL = frozenset({"vm", "vm.example.org", "10.1.2.3"})


@pytest.mark.parametrize("text, hosts", [
    ("localhost:2", (("localhost", 2),)),
    ("node1:4,node2:4", (("node1", 4), ("node2", 4))),
    ("node1", (("node1", 1),)),
    (" node1:2 , node-2.cluster:1 ", (("node1", 2), ("node-2.cluster", 1))),
    ("10.0.0.1:8,10.0.0.2", (("10.0.0.1", 8), ("10.0.0.2", 1))),
])
def test_parse_host_list(text, hosts):
    assert parse_host_list(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("node1:4,,node2:4", "empty entry"),
    ("node1:4,", "empty entry"),
    ("node1:x", "slot count 'x'"),
    ("node1:0", "slot count '0'"),
    ("node1:-2", "slot count '-2'"),
    ("node1:", "slot count ''"),
    (":4", "not a host name"),
    ("node 1:4", "not a host name"),
    ("node1:2,node1:2", "listed twice"),
])
def test_parse_host_list_rejects(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_host_list(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, hosts", [
    ("node1:4\nnode2:2\n", (("node1", 4), ("node2", 2))),
    ("node1 slots=4\nnode2 slots=2 max_slots=8\n", (("node1", 4), ("node2", 2))),
    ("# cluster\n\nnode1:4   # big one\n   \nnode2\n", (("node1", 4), ("node2", 1))),
    ("node1 slots=4\nnode2:2", (("node1", 4), ("node2", 2))),
    ("\tnode1\tslots=3\t\n", (("node1", 3),)),
])
def test_parse_hostfile(text, hosts):
    assert parse_hostfile(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("", "lists no hosts"),
    ("# only a comment\n\n", "lists no hosts"),
    ("node1:4\nnode2:four\n", "line 2: slot count 'four'"),
    ("node1 slots=\n", "line 1: slot count ''"),
    ("node1 cpus=4\n", "line 1: .* is not 'host slots=N'"),
    ("node1 4\n", "line 1: .* is not 'host slots=N'"),
    ("node1 max_slots=4\n", "gives no slots=N"),
    ("node1 slots=2 slots=3\n", "is not 'host slots=N'"),
    ("node1:2\nnode1 slots=2\n", "listed twice"),
    ("no/de:2\n", "not a host name"),
])
def test_parse_hostfile_rejects(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_hostfile(text, "hosts.txt")
    assert "\n" not in str(info.value)
    assert "hosts.txt" in str(info.value)


def test_read_hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("a slots=2\nb:3\n")
    assert read_hostfile(str(path)) == (("a", 2), ("b", 3))
    with pytest.raises(ValueError, match="cannot be read"):
        read_hostfile(str(tmp_path / "missing"))


def test_slots_and_format():
    hosts = (("a", 2), ("b", 3))
    assert total_slots(hosts) == 5
    assert format_hosts(hosts) == "a:2,b:3"
    assert parse_host_list(format_hosts(hosts)) == hosts


@pytest.mark.parametrize("name, local", [
    ("localhost", True), ("LOCALHOST", True), ("127.0.0.1", True), ("127.0.1.1", True),
    ("vm", True), ("VM.example.org", True), ("10.1.2.3", True),
    ("node1", False), ("10.1.2.4", False), ("vm2", False), ("nonexistent-host.invalid", False),
])
def test_is_local(name, local):
    assert is_local(name, LOCAL) is local


def test_remote_hosts_keeps_order_and_skips_local():
    hosts = (("localhost", 2), ("node2", 1), ("vm", 1), ("node1", 4))
    assert remote_hosts(hosts, LOCAL) == ("node2", "node1")
    assert remote_hosts((("localhost", 2), ("127.0.0.1", 1)), LOCAL) == ()


def test_unreachable_host_error_names_the_first_failing_host():
    answers = {"good": None, "bad": "Connection refused", "worse": "timeout"}
    assert unreachable_host_error(["good"], check=answers.get) is None
    message = unreachable_host_error(["good", "bad", "worse"], check=answers.get)
    assert "'bad'" in message and "Connection refused" in message and "ssh-copy-id bad" in message
    assert "worse" not in message and "\n" not in message


def test_check_ssh_runs_batch_mode_ssh():
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 255, "", "ssh: connect to host x port 22: Connection refused\n")
    assert check_ssh("x", run=fake_run) == "ssh: connect to host x port 22: Connection refused"
    assert calls == [["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "x", "true"]]
    assert check_ssh("x", run=lambda argv, **kw: subprocess.CompletedProcess(argv, 0, "", "")) is None


def test_check_ssh_real_unreachable_name():
    reason = check_ssh("nonexistent-host.invalid")
    assert reason is not None and "\n" not in reason


@pytest.mark.parametrize("controller, in_slurm, expected", [
    ("mpi", False, ("node2", "node3")),
    ("gloo", False, ("node2", "node3")),
    ("mpi", True, ()),           # mpirun reaches the other nodes through srun
    ("gloo", True, ("node2", "node3")),  # horovodrun always uses ssh
    ("torch", False, ("node2", "node3")),
    ("torch", True, ("node3",)),         # --engine torch: srun steps on the allocation's nodes
])
def test_hosts_needing_ssh(controller, in_slurm, expected):
    hosts = (("localhost", 2), ("node2", 2), ("node3", 1))
    assert hosts_needing_ssh(hosts, LOCAL, controller, in_slurm, slurm_nodes=frozenset({"node2"})) == expected


@pytest.mark.parametrize("code, start", [
    (3, "host 'n2' has no /v/bin/python (the Python the workers run): install the same environment"),
    (4, "host 'n2' has no folder /src (the workers start there): put the code at the same path")])
def test_a_host_without_the_environment_or_the_code_is_one_line(code, start):
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, code, "", "")
    error = unreachable_host_error(["n2"], check=lambda h: check_ssh(h, run=fake_run, python="/v/bin/python",
                                                                     cwd="/src"))
    assert error.startswith(start) and error.endswith("or remove n2 from -H/--hostfile") and "\n" not in error
    assert calls[0][-1] == "test -x /v/bin/python || exit 3; test -d /src || exit 4"
