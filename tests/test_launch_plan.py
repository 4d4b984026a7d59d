"""Golden tests of launch/plan.py: LaunchConfig -> the exact mpirun / horovodrun argv."""
import json
import os
import subprocess
import sys

import pytest

from launch.cli import LaunchConfig
from launch.plan import Tools, build_plan, describe, exported_names, resolve_controller, shared_interface
from tests.helpers import REPO

TOOLS = Tools(python="/venv/bin/python", mpirun="/usr/bin/mpirun", horovodrun="/venv/bin/horovodrun")
LOCAL = frozenset({"vm"})
ENV = {"PATH": "/bin", "HOME": "/root", "PYTHONPATH": "/src", "LD_LIBRARY_PATH": "/lib", "OMP_NUM_THREADS": "1",
       "HOROVOD_CYCLE_TIME": "1", "HOROVOD_RANK": "3", "DISTRIB_RUN": "x", "TERM": "xterm", "SSH_AUTH_SOCK": "/s"}
WORKER = ["/venv/bin/python", "-m", "launch.worker", "train.py", "--", "--steps", "5"]


def config(**kw):
    base = dict(script="train.py", script_args=("--steps", "5"), np=2, hosts=(("localhost", 2),))
    return LaunchConfig(**{**base, **kw})


def plan(controller, cfg=None, env=ENV, is_root=False):
    return build_plan(cfg or config(), controller, "why", env_names=env, is_root=is_root, tools=TOOLS, local=LOCAL)


MPI_EXPORTS = ["-x", "DISTRIB_RESTART_COUNT", "-x", "DISTRIB_RUN", "-x", "DISTRIB_STATUS_ADDR",
               "-x", "DISTRIB_STATUS_SECRET", "-x", "DISTRIB_STOP_GRACE",
               "-x", "HOROVOD_CYCLE_TIME", "-x", "LD_LIBRARY_PATH", "-x", "OMP_NUM_THREADS", "-x", "PATH",
               "-x", "PYTHONPATH"]


def test_mpi_non_root():
    assert list(plan("mpi").argv) == [
        "/usr/bin/mpirun", "--oversubscribe", "-np", "2", "-H", "localhost:2", "--bind-to", "none",
        "--map-by", "slot", "-mca", "pml", "ob1", "-mca", "btl", "^openib", "-mca", "mpi_yield_when_idle", "1", "-mca", "odls_base_sigkill_timeout", "0", *MPI_EXPORTS, *WORKER]


def test_mpi_root_allows_running_as_root():
    assert list(plan("mpi", is_root=True).argv) == [
        "/usr/bin/mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-H", "localhost:2",
        "--bind-to", "none", "--map-by", "slot", "-mca", "pml", "ob1", "-mca", "btl", "^openib", "-mca", "mpi_yield_when_idle", "1", "-mca", "odls_base_sigkill_timeout", "0", *MPI_EXPORTS,
        *WORKER]


def test_mpi_hosts_timeline_and_hang_timeout():
    cfg = config(np=6, hosts=(("node1", 4), ("node2", 4)), timeline="/runs/tl.json", hang_timeout=60.0)
    p = plan("mpi", cfg, env={"PATH": "/bin"})
    assert list(p.argv) == [
        "/usr/bin/mpirun", "--oversubscribe", "-np", "6", "-H", "node1:4,node2:4", "--bind-to", "none",
        "--map-by", "slot", "-mca", "pml", "ob1", "-mca", "btl", "^openib", "-mca", "mpi_yield_when_idle", "1", "-mca", "odls_base_sigkill_timeout", "0",
        "-x", "DISTRIB_HEARTBEAT", "-x", "DISTRIB_RESTART_COUNT", "-x", "DISTRIB_STATUS_ADDR",
        "-x", "DISTRIB_STATUS_SECRET", "-x", "DISTRIB_STOP_GRACE",
        "-x", "HOROVOD_TIMELINE", "-x", "PATH", *WORKER]
    assert p.env == {"HOROVOD_TIMELINE": "/runs/tl.json"}


def test_gloo_local_uses_loopback():
    p = plan("gloo")
    assert list(p.argv) == ["/venv/bin/horovodrun", "--gloo", "-np", "2", "-H", "localhost:2",
                            "--network-interface", "lo", *WORKER]
    assert p.command == ("/venv/bin/horovodrun --gloo -np 2 -H localhost:2 --network-interface lo "
                         "/venv/bin/python -m launch.worker train.py -- --steps 5")


def test_gloo_local_names_of_this_machine():
    cfg = config(np=3, hosts=(("vm", 1), ("127.0.0.1", 2)), verbose=True)
    assert list(plan("gloo", cfg).argv) == ["/venv/bin/horovodrun", "--gloo", "-np", "3", "-H", "vm:1,127.0.0.1:2",
                                            "--network-interface", "lo", "--verbose", *WORKER]


def test_gloo_remote_hosts_no_interface():
    cfg = config(np=4, hosts=(("localhost", 2), ("node2", 2)))
    assert list(plan("gloo", cfg).argv) == ["/venv/bin/horovodrun", "--gloo", "-np", "4",
                                            "-H", "localhost:2,node2:2", *WORKER]


def test_command_is_shell_quoted():
    p = plan("gloo", config(script_args=("--name", "my run", "a'b")))
    assert p.command.endswith("train.py -- --name 'my run' 'a'\"'\"'b'")


def test_exported_names_filter():
    assert exported_names(ENV) == ("DISTRIB_RUN", "HOROVOD_CYCLE_TIME", "LD_LIBRARY_PATH", "OMP_NUM_THREADS",
                                   "PATH", "PYTHONPATH")


@pytest.mark.parametrize("requested, built, mpirun, expected", [
    ("gloo", True, "/usr/bin/mpirun", "gloo"),
    ("mpi", False, "/usr/bin/mpirun", "mpi"),
    ("auto", True, "/usr/bin/mpirun", "mpi"),
    ("auto", False, "/usr/bin/mpirun", "gloo"),
    ("auto", True, None, "gloo"),
])
def test_resolve_controller(requested, built, mpirun, expected):
    controller, reason = resolve_controller(requested, lambda: built, mpirun)
    assert controller == expected
    assert reason.startswith("auto:" if requested == "auto" else "requested")


def test_resolve_controller_only_asks_horovod_for_auto():
    def boom():
        raise AssertionError("slow check called")
    assert resolve_controller("gloo", boom, None)[0] == "gloo"
    assert resolve_controller("mpi", boom, "/usr/bin/mpirun")[0] == "mpi"


def test_horovod_without_pytorch_is_a_clear_error():
    with pytest.raises(ValueError, match="Horovod with PyTorch support cannot be imported.*make setup"):
        resolve_controller("auto", lambda: None, "/usr/bin/mpirun")


def test_mpi_without_mpirun_is_a_clear_error():
    with pytest.raises(ValueError, match="needs mpirun on PATH.*--controller gloo"):
        resolve_controller("mpi", lambda: True, None)


def test_describe_names_controller_reason_hosts_and_command():
    cfg = config(np=3, hosts=(("localhost", 2), ("node2", 2)), max_restarts=2)
    text = describe(cfg, plan("gloo", cfg), LOCAL)
    assert text.splitlines() == [
        "distrib-launch: controller: gloo (why)",
        "distrib-launch: hosts: localhost:2, node2:2 (remote); np: 3",
        "distrib-launch: max restarts: 2; hang timeout: off",
        "distrib-launch: command: /venv/bin/horovodrun --gloo -np 3 -H localhost:2,node2:2 "
        "/venv/bin/python -m launch.worker train.py -- --steps 5"]


CHECK = ("import json, sys; from launch.plan import horovod_built_with_mpi, _mpi_built_from_extension; "
         "print(json.dumps([_mpi_built_from_extension(), horovod_built_with_mpi(), 'torch' in sys.modules]))")


def _check_in_subprocess(env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_mpi_check_reads_the_extension_without_importing_torch():
    """The launcher's answer is Horovod's own (hvd.mpi_built()), without the seconds of importing torch."""
    import horovod.torch as hvd
    fast, answer, torch_imported = _check_in_subprocess()
    assert fast is answer is bool(hvd.mpi_built())
    assert not torch_imported


def test_mpi_check_falls_back_to_the_import_without_an_extension(tmp_path):
    """A horovod package without the library (e.g. a source tree): the import decides."""
    pkg = tmp_path / "horovod"
    (pkg / "torch").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "torch" / "__init__.py").write_text("def mpi_built():\n    return False\n")
    assert _check_in_subprocess({"PYTHONPATH": f"{tmp_path}:{REPO}"}) == [None, False, False]


IFACES = {"lo": [("127.0.0.1", "255.0.0.0")], "eth0": [("198.18.0.1", "255.255.255.0")],
          "eth1": [("10.0.0.5", "255.255.0.0")], "down": []}


@pytest.mark.parametrize("addresses, expected", [
    ({"node2": "198.18.0.2", "node3": "198.18.0.3"}, "eth0"),
    ({"node2": "10.0.7.2"}, "eth1"),
    ({"node2": "198.18.0.2", "node9": "10.0.0.9"}, None),  # no one interface reaches both
    ({"node2": "127.0.0.1"}, None),                        # never loopback across hosts
    ({"node2": None}, None),                               # does not resolve
])
def test_shared_interface_is_the_one_on_every_remote_hosts_subnet(addresses, expected):
    name, why = shared_interface(addresses, IFACES)
    assert name == expected and why


def test_elastic_plan_uses_and_prints_the_detected_interface():
    cfg = config(hosts=(("node2", 1), ("node3", 1)), np=2, elastic=True, min_np=1, max_np=2)
    detected = shared_interface({"node2": "198.18.0.2", "node3": "198.18.0.3"}, IFACES)
    p = build_plan(cfg, "gloo", "why", env_names={}, is_root=False, tools=TOOLS, local=LOCAL,
                   discovery_script="/d.sh", detected_interface=detected)
    assert p.argv[p.argv.index("--network-interface") + 1] == "eth0"
    assert "network interface: eth0 (this host's interface on the subnet of node2, node3)" in \
        describe(cfg, p, LOCAL, detected)
