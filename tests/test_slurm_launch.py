"""The launcher inside a SLURM allocation: hosts and slots come from launch.slurm_env."""
import pytest

from launch.cli import config_from_args

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE", "SLURM_GPUS_ON_NODE",
              "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_NODELIST")


@pytest.fixture
def script(tmp_path, monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "train.py"
    path.write_text("")
    return str(path)


@pytest.mark.parametrize("env, hosts", [
    ({"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "4"},
     (("gpu01", 4), ("gpu02", 4))),
    ({"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1"}, (("n1", 2), ("n2", 2), ("n3", 1))),
])
def test_hosts_and_np_from_the_allocation(script, monkeypatch, env, hosts):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = config_from_args([script, "--steps", "3"])
    assert cfg.hosts == hosts
    assert cfg.np == sum(slots for _, slots in hosts)
    assert cfg.script_args == ("--steps", "3")


def test_explicit_hosts_or_np_win_over_slurm(script, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    assert config_from_args(["-H", "a:1,b:1", script]).hosts == (("a", 1), ("b", 1))
    assert config_from_args(["-np", "2", script]).hosts == (("localhost", 2),)


def test_malformed_slurm_variable_is_a_one_line_error(script, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-")
    with pytest.raises(SystemExit) as info:
        config_from_args([script])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("distrib-launch: error: nodelist 'n[1-'") and err.count("\n") == 1


def test_outside_slurm_np_is_still_required(script, capsys):
    with pytest.raises(SystemExit):
        config_from_args([script])
    assert "-np is required" in capsys.readouterr().err
