"""Shared test fixtures: tests must not leak environment variables or processes."""
import os

import psutil
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts several worker processes")
    config.addinivalue_line("markers", "slurm: needs the real one-node Slurm cluster")


# Set by pytest itself, and by torch on the first optimizer it builds: not ours to police.
SET_BY_LIBRARIES = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


@pytest.fixture(autouse=True)
def restore_environment():
    """Fail a test that changed os.environ, and put it back (Lightning's restore_env_variables)."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    os.environ.clear()
    os.environ.update(before)
    leaked = {k for k in set(before) | set(after)
              if before.get(k) != after.get(k) and k not in SET_BY_LIBRARIES}
    assert not leaked, f"test changed environment variables: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def no_leftover_children():
    """Fail a test that leaves child processes running (a worker the launcher failed to stop)."""
    yield
    children = psutil.Process().children(recursive=True)
    if children:
        gone, alive = psutil.wait_procs(children, timeout=10)
        for proc in alive:
            proc.kill()
        assert not alive, f"test left processes running: {[p.pid for p in alive]}"
