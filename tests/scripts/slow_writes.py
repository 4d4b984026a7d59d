"""Run a training script with every checkpoint file write slowed down (tests only).

    python -m launch -np 2 tests/scripts/slow_writes.py SECONDS SCRIPT [ARGS ...]

The kill-and-resume tests must land kills while a checkpoint is being written, which on their
tiny models takes milliseconds. Each worker runs this file: it wraps the checkpoint store's
per-file write (``distrib.checkpoint.store._save_file``, which every checkpoint file goes
through) so that it sleeps SECONDS before and after each file, then runs SCRIPT as ``__main__``
with ARGS. The sleep before the first file lets training go on while an asynchronous snapshot
waits to be written (a snapshot that aliased the live tensors would then be caught); the one
after each file keeps the temporary folder in place long enough for a kill to land in it.
The library itself has no slow-down hook; the one-process tests wrap the same function with
``slowed`` through pytest's monkeypatch.
"""
from __future__ import annotations

import functools
import os
import runpy
import sys
import time
from typing import Any, Callable


def slowed(save_file: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``save_file`` between two sleeps of ``seconds``: a checkpoint written late and slowly."""
    @functools.wraps(save_file)
    def wait_save_wait(*args, **kwargs):
        time.sleep(seconds)
        result = save_file(*args, **kwargs)
        time.sleep(seconds)
        return result
    return wait_save_wait


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: slow_writes.py SECONDS SCRIPT [ARGS ...]")
    seconds, script = float(sys.argv[1]), os.path.abspath(sys.argv[2])
    from distrib.checkpoint import store
    store._save_file = slowed(store._save_file, seconds)
    sys.argv = [script, *sys.argv[3:]]
    sys.path[0] = os.path.dirname(script)  # what `python SCRIPT` would have put first
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
