"""Running the project's launcher from tests: real processes, always with a timeout."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
# The model and batch flags of a train_lm run that is fast on 2 shared cores; each test adds its own
# schedule, logging and checkpoint flags.
TINY_LM_MODEL = ["--batch-size", "4", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--sample-tokens", "0"]


def run_launch(launch_args: Sequence[str], script: str | Path, script_args: Sequence[str] = (), *,
               timeout: float = 240, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m launch LAUNCH_ARGS SCRIPT SCRIPT_ARGS``; a hang raises TimeoutExpired (test fails)."""
    cmd = [sys.executable, "-m", "launch", *launch_args, str(script), *map(str, script_args)]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def assert_resume_after_a_kill_is_bit_exact(script: Path, common: Sequence[str], tmp_path: Path, *,
                                            die_at: int, steps: int) -> Path:
    """Two 2-worker runs of ``script`` (a tests/scripts trainer that takes --ckpt-dir, --die-at and
    --out, and writes every rank's parameters after each step): one straight through, one killed
    right after the checkpoint of step ``die_at`` and resumed. The resumed steps must equal the
    straight run's bit for bit on every rank. Returns the killed run's checkpoint folder, for a
    resume at another world size."""
    import torch

    whole, killed_dir, resumed = tmp_path / "whole.pt", tmp_path / "b", tmp_path / "resumed.pt"
    run_launch(["-np", "2"], script, [*common, "--ckpt-dir", tmp_path / "a", "--out", whole])
    killed = run_launch(["-np", "2"], script,
                        [*common, "--ckpt-dir", killed_dir, "--die-at", die_at, "--out", tmp_path / "never.pt"],
                        check=False)
    assert killed.returncode != 0 and not (tmp_path / "never.pt").exists()
    run_launch(["-np", "2"], script, [*common, "--ckpt-dir", killed_dir, "--out", resumed])
    want, got = torch.load(whole)["ranks"], torch.load(resumed)["ranks"]
    assert [r["step"] for r in got[0]] == list(range(die_at, steps))
    for rank in range(2):
        for rec in got[rank]:
            for n, value in rec["params"].items():
                assert torch.equal(value, want[rank][rec["step"]]["params"][n]), f"rank {rank} step {rec['step']} {n}"
    return killed_dir


HANG_REPORT = re.compile(r"^distrib-launch: rank (\d+)(?: on \S+)? hung: no progress for \d+ s at heartbeat (\d+), "
                         r"the furthest rank is at (\d+) \(--hang-timeout ([\d.]+)\)$", re.M)


def hang_report(stderr: str) -> tuple | None:
    """(rank, its heartbeat count, the furthest count, the timeout) from the launcher's hang line."""
    found = HANG_REPORT.search(stderr)
    return tuple(int(g) for g in found.groups()) if found else None


def assert_workers_gone(pid_dir: Path, at_least: int = 2) -> None:
    """Every worker that wrote ``<pid_dir>/*.pid`` has exited (zombies count as gone)."""
    import psutil
    pids = [int(p.read_text()) for p in Path(pid_dir).glob("*.pid")]
    assert len(pids) >= at_least, f"expected at least {at_least} pid files, found {len(pids)}"
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"workers still running: {alive}"


def tree_digest(root: Path) -> dict:
    """{relative path: sha256 of the file, or "dir"} for everything under ``root``: equal
    digests before and after mean nothing there was created, changed or deleted."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


def run_torchrun(nproc: int, script: str | Path, script_args: Sequence[str] = (), *, timeout: float = 240,
                 env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N SCRIPT SCRIPT_ARGS``: workers of the torch engine
    (torchrun ships with torch); a hang raises TimeoutExpired (test fails)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, script_args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc
