"""What the session-long test services share (tests/nodes.py's namespace hosts and
tests/slurm_cluster.py's Slurm daemons): detached daemons, their liveness, installing what they
need, and the session fixture that starts one or fails the test with the reason (never skips).

Those modules also run as scripts (``python -m tests.nodes up``), so pytest is optional here.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, TypeVar

try:
    import pytest
except ImportError:  # pragma: no cover - run as a script without pytest
    pytest = None

Service = TypeVar("Service")


def alive(pid: Optional[int]) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent to reap it counts as gone)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def run_setup_script(script: Path, error: type) -> None:
    """Run ``bash script`` (the project's apt set-up); raise ``error`` with its output's tail when it fails."""
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise error(f"{script} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")


def spawn_detached(cmd: Sequence[str], log: Path, env: Optional[Dict[str, str]] = None,
                   cwd: Optional[Path] = None) -> int:
    """Start ``cmd`` with its output in ``log``, detached from this process (setsid; the shell that
    started it exits at once), and return its pid. Detached so that it outlives each test:
    tests/conftest.py fails a test that leaves *child* processes behind."""
    proc = subprocess.run(["setsid", "sh", "-c", 'log=$1; shift; exec "$@" >"$log" 2>&1 </dev/null & echo $!', "sh",
                           str(log), *cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=30, check=True)
    return int(proc.stdout.strip())


def session_fixture(fn: Callable) -> Callable:
    """pytest's session-scoped fixture decorator (the plain function where pytest is absent)."""
    return pytest.fixture(scope="session")(fn) if pytest is not None else fn


def serve(start: Callable[[], Service], stop: Callable[[Service], None], what: str) -> Iterator[Service]:
    """The body of a session fixture: ``yield from serve(...)``. A service that cannot start fails
    the test with the reason; a started one is stopped after the session, also when tests fail."""
    try:
        service = start()
    except Exception as exc:  # noqa: BLE001 - any reason must become a visible failure
        pytest.fail(f"could not start {what}: {exc}", pytrace=False)
    try:
        yield service
    finally:
        stop(service)
