"""Progress heartbeat for the launcher's hang detection (``python -m launch --hang-timeout S``).

Call :func:`beat` once per training step, on every rank. With ``--hang-timeout`` the launcher
sets ``DISTRIB_HEARTBEAT_FILE_DIR``; ``beat()`` then touches ``$DISTRIB_HEARTBEAT_FILE_DIR/heartbeat-<rank>``
at most once per second (the file's mtime is the clock, so no state is kept here). The launcher
treats a rank whose file is older than the timeout as hung. Without the variable it does nothing.
Never raises: a heartbeat must not stop training.
"""
from __future__ import annotations

import os
import time
from typing import Mapping, Optional

HEARTBEAT_DIR_ENV = "DISTRIB_HEARTBEAT_FILE_DIR"
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
MIN_INTERVAL_S = 1.0


def heartbeat_path(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """This rank's heartbeat file, or None when hang detection is off (or the rank is unknown)."""
    env = os.environ if env is None else env
    folder = env.get(HEARTBEAT_DIR_ENV)
    rank = next((env[v] for v in RANK_VARIABLES if env.get(v, "").isdigit()), None)
    return os.path.join(folder, f"heartbeat-{rank}") if folder and rank is not None else None


def beat() -> None:
    """Tell the launcher this rank made progress. Cheap (one stat) when called more than once a second."""
    path = heartbeat_path()
    if path is None:
        return
    try:
        if time.time() - os.stat(path).st_mtime < MIN_INTERVAL_S:
            return
        os.utime(path)
    except FileNotFoundError:
        try:
            open(path, "a").close()
        except OSError:
            pass
    except OSError:
        pass
