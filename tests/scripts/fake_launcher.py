"""Stand-in for mpirun in the supervisor's fast tests: ``fake_launcher.py N command...``.

Starts N copies of the command with HOROVOD_RANK=0..N-1, each in a session of its own (as
Open MPI and horovodrun do, so the supervisor cannot reach them through its process group),
waits for all of them and never stops the others when one fails: the supervisor must.
"""
import os
import subprocess
import sys

n, command = int(sys.argv[1]), sys.argv[2:]
procs = [subprocess.Popen(command, env={**os.environ, "HOROVOD_RANK": str(r)}, start_new_session=True)
         for r in range(n)]
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0) and 1)
