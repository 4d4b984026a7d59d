"""A worker that needs a few seconds to wrap up after SIGTERM, like a script saving a checkpoint
(no Horovod: the point is what the launcher does to its workers).

    --pid-dir DIR   writes DIR/<rank>.pid at start and DIR/saved-<rank> after its "save"
    --save-s S      how long the "save" takes (default 3: longer than mpirun's own SIGTERM-to-SIGKILL)
"""
import argparse
import os
import signal
import time

from launch.worker import rank_from_env

p = argparse.ArgumentParser()
p.add_argument("--pid-dir", required=True)
p.add_argument("--save-s", type=float, default=3.0)
args = p.parse_args()
rank = rank_from_env(os.environ)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
with open(os.path.join(args.pid_dir, f"{rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
while not stop:
    time.sleep(0.05)
time.sleep(args.save_s)
with open(os.path.join(args.pid_dir, f"saved-{rank}"), "w") as f:
    f.write("saved")
