"""launch/cli.py: arguments -> LaunchConfig, and one-line errors with exit status 2."""
import os
import subprocess
import sys

import pytest

from launch.cli import LaunchConfig, config_from_args
from tests.helpers import REPO, SCRIPTS

SCRIPT = str(SCRIPTS / "launch_toy.py")


def parse_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        config_from_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distrib-launch: error: "), err
    return err


def test_defaults_to_localhost_with_np():
    cfg = config_from_args(["-np", "2", SCRIPT, "--lr", "0.1", "-np", "7"])
    assert cfg.hosts == (("localhost", 2),) and cfg.np == 2
    assert cfg.script == SCRIPT and cfg.script_args == ("--lr", "0.1", "-np", "7")
    assert cfg.controller == "auto" and not cfg.dry_run and cfg.max_restarts == 0 and cfg.hang_timeout is None
    assert cfg.engine == "horovod"
    assert config_from_args(["--engine", "torch", "-np", "2", "--max-restarts", "1", SCRIPT]).engine == "torch"


def test_np_defaults_to_total_slots(tmp_path):
    assert config_from_args(["-H", "a:2,b:3", SCRIPT]).np == 5
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\na slots=4\nb:4\n")
    cfg = config_from_args(["--hostfile", str(hostfile), "-np", "6", SCRIPT])
    assert cfg.hosts == (("a", 4), ("b", 4)) and cfg.np == 6


def test_options(tmp_path):
    cfg = config_from_args(["-np", "2", "--controller", "gloo", "--dry-run", "--verbose", "--timeline", "tl.json",
                            "--max-restarts", "3", "--hang-timeout", "30", "--", SCRIPT])
    assert (cfg.controller, cfg.dry_run, cfg.verbose, cfg.max_restarts, cfg.hang_timeout) == ("gloo", True, True, 3, 30)
    assert cfg.timeline.endswith("/tl.json") and cfg.timeline.startswith("/")


@pytest.mark.parametrize("argv, message", [
    (["-np", "0", SCRIPT], "-np 0 is not a number of workers"),
    (["-np", "two", SCRIPT], "invalid int value: 'two'"),
    (["-np", "3", "-H", "localhost:2", SCRIPT], "-np 3 is more than the 2 slots of localhost:2"),
    ([SCRIPT], "-np is required without -H/--hostfile"),
    (["-np", "2", "missing_script.py"], "script 'missing_script.py' not found"),
    (["-np", "2"], "the following arguments are required: script"),
    (["-H", "a:x", SCRIPT], "slot count 'x'"),
    (["-H", "a:1", "--hostfile", "h", SCRIPT], "not allowed with argument"),
    (["-np", "2", "--controller", "nccl", SCRIPT], "invalid choice: 'nccl'"),
    (["-np", "2", "--max-restarts", "-1", SCRIPT], "--max-restarts -1 is negative"),
    (["-np", "2", "--hang-timeout", "0.5", SCRIPT], "--hang-timeout 0.5 is too short"),
    (["--hostfile", "/nonexistent/hosts", SCRIPT], "cannot be read"),
    (["-np", "2", "--engine", "mpi", SCRIPT], "invalid choice: 'mpi' (choose from 'horovod', 'torch')"),
    (["--engine", "torch", "--elastic", "--min-np", "1", "--max-np", "2", "-np", "2", SCRIPT],
     "--elastic runs on Horovod Elastic only; with --engine torch use --max-restarts K"),
    (["--engine", "torch", "--controller", "gloo", "-np", "2", SCRIPT], "does not apply to --engine torch"),
    (["--engine", "torch", "--timeline", "tl.json", "-np", "2", SCRIPT], "Horovod timeline and does not apply"),
])
def test_errors_are_one_line(capsys, argv, message):
    assert message in parse_error(capsys, argv)


def test_malformed_hostfile_names_file_and_line(capsys, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a:2\nb slots=many\n")
    err = parse_error(capsys, ["--hostfile", str(hostfile), SCRIPT])
    assert f"{hostfile} line 2" in err and "'many'" in err


def test_config_validates_itself():
    with pytest.raises(ValueError, match="no hosts"):
        LaunchConfig(script="t.py", script_args=(), np=1, hosts=())
    with pytest.raises(ValueError, match="controller 'x' is unknown"):
        LaunchConfig(script="t.py", script_args=(), np=1, hosts=(("a", 1),), controller="x")
    with pytest.raises(ValueError, match="stop_grace -1 is negative"):
        LaunchConfig(script="t.py", script_args=(), np=1, hosts=(("a", 1),), stop_grace=-1)


@pytest.mark.timeout(120)
def test_real_cli_errors_exit_2_with_one_line():
    for argv in (["-np", "2", "nowhere.py"], ["-np", "-1", SCRIPT]):
        proc = subprocess.run([sys.executable, "-m", "launch", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("distrib-launch: error: ")


@pytest.mark.timeout(120)
def test_dry_run_prints_the_command_and_runs_nothing():
    proc = subprocess.run([sys.executable, "-m", "launch", "--dry-run", "-np", "2", "--controller", "gloo", SCRIPT,
                           "--mode", "my mode"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip().endswith(f"-m launch.worker {SCRIPT} -- --mode 'my mode'")
    assert "--gloo -np 2 -H localhost:2 --network-interface lo" in proc.stdout
    assert "distrib-launch: controller: gloo (requested with --controller gloo)" in proc.stderr
    assert "distrib-launch: command: " in proc.stderr


@pytest.mark.timeout(120)
def test_unreachable_remote_host_is_named():
    proc = subprocess.run([sys.executable, "-m", "launch", "--controller", "gloo", "-H",
                           "localhost:1,nonexistent-host.invalid:1", SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("distrib-launch: error: cannot reach host 'nonexistent-host.invalid' over ssh")
    assert "ssh-copy-id nonexistent-host.invalid" in last


@pytest.mark.timeout(120)
def test_auto_controller_picks_mpi_when_horovod_has_it():
    proc = subprocess.run([sys.executable, "-m", "launch", "--dry-run", "-np", "2", SCRIPT], cwd=REPO,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "distrib-launch: controller: mpi (auto: Horovod was built with MPI and mpirun is on PATH)" in proc.stderr
    assert "--allow-run-as-root" in proc.stdout if os.geteuid() == 0 else "--allow-run-as-root" not in proc.stdout


def test_inside_a_slurm_allocation_hosts_come_from_slurm(monkeypatch):
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}.items():
        monkeypatch.setenv(name, value)
    cfg = config_from_args([SCRIPT])
    assert cfg.hosts == (("node1", 2), ("node2", 2)) and cfg.np == 4
    assert config_from_args(["-np", "2", SCRIPT]).hosts == (("localhost", 2),)  # an explicit -np stays local
    assert config_from_args(["-H", "a:1", SCRIPT]).hosts == (("a", 1),)
