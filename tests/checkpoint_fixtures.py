"""Helpers for the checkpoint tests: a one-process context, a tiny training state, and
starting / watching / killing real Horovod jobs (the kill-and-resume tests share the last)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import psutil
import torch

from distrib.checkpoint import store
from distrib.context import Context
from tests.scripts.slow_writes import slowed

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
SLOW_WRITES = SCRIPTS / "slow_writes.py"


def slow_writes(monkeypatch, seconds: float) -> None:
    """Every checkpoint file written in this process waits ``seconds`` before and after its
    write (the write is still running when the test acts; multi-process jobs: :func:`job_command`)."""
    monkeypatch.setattr(store, "_save_file", slowed(store._save_file, seconds))


def job_command(np_: int, script: Path, args: Sequence, slow_write_s: float = 0.0) -> list:
    """:func:`hvd_command`, with every checkpoint file write of the workers slowed by
    ``slow_write_s`` (tests/scripts/slow_writes.py) when it is > 0."""
    if slow_write_s > 0:
        return hvd_command(np_, SLOW_WRITES, [slow_write_s, script, *args])
    return hvd_command(np_, script, args)


def cpu_ctx(rank: int = 0, size: int = 1) -> Context:
    return Context(rank=rank, size=size, local_rank=rank, local_size=size, cross_rank=0, cross_size=1,
                   device=torch.device("cpu"), controller="gloo")


def tiny_state(seed: int = 0, hidden: int = 8):
    """model + optimizer (with moments, after one step) + scheduler + extra."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train_step(model, optimizer)
    scheduler.step()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "extra": {"epoch": 3}}


def train_step(model, optimizer) -> None:
    model(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hvd_command(np_: int, script: Path, args: Sequence) -> list:
    """The project launcher over Gloo (it runs horovodrun --gloo and supervises the workers)."""
    return [sys.executable, "-m", "launch", "-np", str(np_), "--controller", "gloo", str(script), *map(str, args)]


def run_hvd(np_: int, script: Path, args: Sequence = (), timeout: float = 240,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` on ``np_`` Horovod workers (project launcher); fail the test with the output on error."""
    cmd = hvd_command(np_, script, args)
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def kill_tree(pid: int) -> list:
    """SIGKILL a process and all its descendants at once (horovodrun starts its workers in
    their own sessions, so killing one process group would miss them). Returns the pids."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


# -- kill-and-resume tests: a job in the background, watched through its log and its checkpoint folder
def start_job(script: Path, args: Sequence, log: Path, slow_write_s: float) -> subprocess.Popen:
    """``script`` on 2 workers in the background, output to ``log``; every checkpoint write is
    slowed by ``slow_write_s`` per file (a wider window for a kill; :func:`job_command`)."""
    return subprocess.Popen(job_command(2, script, args, slow_write_s), cwd=REPO, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``predicate`` every 5 ms: True once it holds, False if ``proc`` ended first; raises after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"nothing happened in {timeout} s")


def temp_folders(root: Path) -> set:
    """Names of the checkpoint writes in progress (or left by a kill) under ``root``."""
    return {p.name for p in root.iterdir() if p.name.startswith(store.TMP_PREFIX + "step-")} if root.is_dir() else set()


def steps_logged(log: Path) -> int:
    """Step lines rank 0 printed, whatever prefix the launcher puts before them."""
    return len(re.findall(r"step \d+$", log.read_text(), flags=re.M))


def validate_committed(root: Path) -> list:
    """Validate every committed checkpoint under ``root`` (a kill never leaves a committed but
    broken one); returns their folders."""
    committed = [p for p in (root.iterdir() if root.is_dir() else ()) if store.step_of(p) is not None]
    for step_dir in committed:
        store.validate(step_dir)
    return committed
