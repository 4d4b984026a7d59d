"""tests/scripts/faulty_train_lm.py with the fault as its first argument, ``FAULT:RANK:STEP``
(e.g. ``kill:1:4``): mpirun forwards only the launcher's variables to the other hosts, so a
fault set in the environment would never reach a remote rank."""
import os
import runpy
import sys
from pathlib import Path

fault, rank, step = sys.argv.pop(1).split(":")
os.environ.update(FAULT=fault, FAULT_RANK=rank, FAULT_STEP=step)
script = str(Path(__file__).with_name("faulty_train_lm.py"))
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
