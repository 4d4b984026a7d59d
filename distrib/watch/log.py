"""Printing and logging from rank 0 only, so N workers do not print every line N times."""
from __future__ import annotations

import logging
import sys


def rank0_print(ctx, *args, **kwargs) -> None:
    """``print`` on rank 0; nothing elsewhere."""
    if ctx.rank == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def get_logger(ctx, name: str = "distrib") -> logging.Logger:
    """A logger that prints INFO on rank 0 and only warnings and errors on other ranks,
    each line tagged with the rank so that errors can be traced to a worker."""
    logger = logging.getLogger(f"{name}.rank{ctx.rank}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank {ctx.rank}] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if ctx.rank == 0 else logging.WARNING)
    return logger
