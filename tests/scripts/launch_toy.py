"""A worker without Horovod for the supervisor's fast tests (started by fake_launcher.py).

    --mode ok|exit3|sigkill|block|sigstop|beat  what the chosen rank does (others: see --others)
    --rank R          the rank that gets --mode (default 1)
    --others ok|block|beat  what every other rank does (block ignores SIGTERM, like a collective)
    --pid-dir DIR     each rank writes DIR/<rank>.pid
    --once-dir DIR    the chosen rank misbehaves only while DIR/done does not exist (restarts)
"""
import argparse
import importlib.util
import os
import signal
import sys
import time

# distrib.watch.heartbeat by path: importing the distrib package would import torch (seconds per worker).
_spec = importlib.util.spec_from_file_location(
    "heartbeat", os.path.join(os.path.dirname(__file__), "..", "..", "distrib", "watch", "heartbeat.py"))
_heartbeat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_heartbeat)
beat = _heartbeat.beat

p = argparse.ArgumentParser()
p.add_argument("--mode", default="ok")
p.add_argument("--rank", type=int, default=1)
p.add_argument("--others", default="ok")
p.add_argument("--pid-dir")
p.add_argument("--once-dir")
args = p.parse_args()

rank = int(os.environ["HOROVOD_RANK"])
if args.pid_dir:
    with open(os.path.join(args.pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
mode = args.mode if rank == args.rank else args.others
if rank == args.rank and args.once_dir:
    done = os.path.join(args.once_dir, "done")
    if os.path.exists(done):
        mode = "ok"
    else:
        open(done, "w").close()
print(f"rank {rank} mode {mode} restart {os.environ.get('DISTRIB_RESTART_COUNT')}", flush=True)
for i in range(30):
    print(f"rank {rank} line {i}", file=sys.stderr)
sys.stderr.flush()
if mode == "exit3":
    time.sleep(0.5)
    sys.exit(3)
if mode == "sigkill":
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "block":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
if mode == "sigstop":
    beat()
    os.kill(os.getpid(), signal.SIGSTOP)
if mode == "beat":
    end = time.time() + 600
    while time.time() < end:
        beat()
        time.sleep(0.1)
