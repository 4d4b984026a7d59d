"""One soak job on the namespace hosts: start it, kill on a schedule, stop it, read what it did.

A job is ``python -m launch`` started on node1 over node1..node3 (one worker each), elastic or in
restart mode. The kills alternate: a worker (SIGKILL to the training process on node2 or node3),
then a whole host (every process of it SIGKILLed and its link taken down, as a host that loses
power; it boots again after ``host_down_s``). node1 is never hit: it runs the launcher, and a
job whose launcher dies ends in any framework.

Elastic jobs find their hosts through a discovery script that lists the hosts that are up, as a
cluster manager's would (OUT/hosts-up, rewritten when a host is lost and when it has booted):
with the static list of ``-H``, Horovod re-adds a lost host after its blacklist cool-down while
it is still down, its worker's ssh fails, and the others abort in the rendezvous (Gloo's
"Wait timeout ... for key(s)", a C++ terminate, not an error the elastic loop can catch).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from benchmarks.soak import accounting

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "benchmarks" / "soak" / "worker.py"
HOSTS = ("node1", "node2", "node3")
VICTIMS = ("node2", "node3")
START_TIMEOUT_S = 300.0  # imports of torch on three hosts sharing two loaded cores


@dataclass(frozen=True)
class JobSpec:
    mode: str                # "elastic" or "restart"
    seconds: float           # from the first step to the stop
    kill_every_s: float      # 0: no kills (the failure-free reference)
    host_down_s: float = 10.0
    gloo_timeout_s: int = 15
    step_sleep: float = 0.0
    every: int = 10          # steps between commits (elastic) and checkpoints (both)

    def launch_args(self, out: Path) -> List[str]:
        hosts = ["-H", ",".join(f"{h}:1" for h in HOSTS)]
        if self.mode == "elastic":
            return ["--elastic", "--min-np", "1", "--max-np", "3", "-np", "3", "--host-discovery-script",
                    str(out / "discover.sh"), "--blacklist-cooldown", "3,6"]
        # a restart whose host is still down fails at once and uses up a restart: room for many
        return ["-np", "3", *hosts, "--controller", "gloo", "--max-restarts", "1000"]


@dataclass
class Kill:
    kind: str        # "worker" or "host"
    node: str
    time: float
    pid: Optional[int] = None


@dataclass
class JobResult:
    spec: JobSpec
    start: float                  # the first step's end
    records: List[accounting.Record]
    kills: List[Kill] = field(default_factory=list)
    output_tail: str = ""
    phases: dict = field(default_factory=dict)  # host.pid -> start-up phase -> time (worker.py's P lines)


def live_worker(out: Path, node: str, since: float = 5.0) -> Optional[int]:
    """The pid of the training process on ``node``: the newest step log of that host written to recently."""
    logs = [p for p in out.glob(f"steps.{node}.*.log") if time.time() - p.stat().st_mtime < since]
    if not logs:
        return None
    newest = max(logs, key=lambda p: p.stat().st_mtime)
    return int(newest.name.split(".")[2])


def run_job(nodes, spec: JobSpec, out: Path) -> JobResult:
    """Run one job for ``spec.seconds`` after its first step, killing on schedule; always stopped
    and the cluster healed afterwards."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    up = set(HOSTS)
    _write_hosts(out, up)
    (out / "discover.sh").write_text(f"#!/bin/sh\ncat {out / 'hosts-up'}\n")
    (out / "discover.sh").chmod(0o755)
    cmd = [sys.executable, "-m", "launch", *spec.launch_args(out), str(WORKER), "--out", str(out),
           "--every", str(spec.every), "--step-sleep", str(spec.step_sleep)]
    log = open(out / "job.log", "w")
    # Gloo's peers of a lost host wait this long before they give up (Horovod's default 30 s).
    env = {"HOROVOD_GLOO_TIMEOUT_SECONDS": str(spec.gloo_timeout_s), "OMP_NUM_THREADS": "1"}
    proc = nodes.popen("node1", cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    kills: List[Kill] = []
    back: List[tuple] = []  # (time, node) of hosts to boot again
    try:
        start = _wait_first_step(out, proc)
        next_kill = start + spec.kill_every_s if spec.kill_every_s else float("inf")
        end = start + spec.seconds
        while time.time() < end and proc.poll() is None:
            now = time.time()
            for when, node in [b for b in back if b[0] <= now]:
                back.remove((when, node))
                nodes.link(node, True)
                nodes.start_node(node)
                up.add(node)
                _write_hosts(out, up)
            if now >= next_kill:
                kills.append(_kill(nodes, out, len(kills), spec))
                if kills[-1].kind == "host":
                    up.discard(kills[-1].node)
                    _write_hosts(out, up)
                    back.append((time.time() + spec.host_down_s, kills[-1].node))
                next_kill += spec.kill_every_s
            time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError(f"the {spec.mode} job ended by itself (exit {proc.returncode}): "
                               f"{(out / 'job.log').read_text()[-3000:]}")
    finally:
        _stop(proc)
        log.close()
        _clean(nodes)
    # What the figures are computed from, kept beside the step logs for a later look.
    (out / "job.json").write_text(json.dumps({"spec": asdict(spec), "start": start,
                                              "kills": [asdict(k) for k in kills]}))
    return JobResult(spec, start, accounting.read_records(out), kills, (out / "job.log").read_text()[-3000:],
                     accounting.read_phases(out))


def _write_hosts(out: Path, up) -> None:
    tmp = out / "hosts-up.tmp"
    tmp.write_text("".join(f"{h}:1\n" for h in HOSTS if h in up))
    os.replace(tmp, out / "hosts-up")  # the discovery script never reads half a file


def _wait_first_step(out: Path, proc: subprocess.Popen) -> float:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the job ended before its first step (exit {proc.returncode}): "
                               f"{(out / 'job.log').read_text()[-3000:]}")
        first = accounting.first_step_time(accounting.read_records(out))
        if first is not None:
            return first
        time.sleep(0.5)
    raise RuntimeError(f"no step within {START_TIMEOUT_S:.0f} s: {(out / 'job.log').read_text()[-3000:]}")


def _kill(nodes, out: Path, k: int, spec: JobSpec) -> Kill:
    """Kill number ``k``: even ones a worker, odd ones a host: worker on node2, host node3, worker on
    node3, host node2, ... (a host is never hit right after its worker: it would still be out)."""
    kind = "worker" if k % 2 == 0 else "host"
    node = VICTIMS[(k // 2 + k % 2) % 2]
    if kind == "worker":
        pid = live_worker(out, node)
        if pid is None:  # that host is not in the world right now (cooling down, or booting): the other
            node = VICTIMS[1 - VICTIMS.index(node)]
            pid = live_worker(out, node)
        t = time.time()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pid = None
        return Kill(kind, node, t, pid)
    t = time.time()
    nodes.kill_node(node)
    nodes.link(node, False)
    return Kill(kind, node, t)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _clean(nodes) -> None:
    """Every host booted and linked, and no process of the job left on any of them."""
    nodes.heal()
    for name in nodes.names:
        for line in nodes.processes(name):
            nodes.run(name, ["kill", "-9", line.split()[0]], check=False)
