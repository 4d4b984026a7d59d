"""The communication layer: the only code in distrib that talks to a collective engine.

``distrib.init()`` builds one :class:`Comm` and the :class:`~distrib.Context` carries it
(``ctx.comm``), as torch passes a ``process_group``; everything that communicates is handed it.
Engines: ``"horovod"`` (the default: :mod:`distrib.comm.horovod`), ``"torch"``
(``torch.distributed``, Gloo on CPU and NCCL on GPU: :mod:`distrib.comm.torch_dist`), and the
one-process :class:`LocalComm` that a hand-built Context gets. What holds whatever the engine
(heartbeat, names, the broken-world latch): :mod:`distrib.comm.base`.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

from distrib.comm.base import OPS, Comm, DistribSetupError, Handle
from distrib.comm.local import LocalComm

ENGINES = ("horovod", "torch")
ENGINE_ENV = "DISTRIB_ENGINE"


def choose_engine(engine: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> str:
    """The engine to start: ``engine`` when given, else ``DISTRIB_ENGINE``, else ``"torch"`` when
    the script runs under torchrun (RANK, WORLD_SIZE and MASTER_ADDR set), else ``"horovod"``."""
    from distrib.comm.torch_dist import under_torchrun
    env = os.environ if env is None else env
    source = "engine="
    if engine is None and env.get(ENGINE_ENV):
        engine, source = env[ENGINE_ENV], f"{ENGINE_ENV}="
    if engine is None:
        return "torch" if under_torchrun(env) else "horovod"
    if engine not in ENGINES:
        raise ValueError(f"{source}{engine!r} is not one of {', '.join(ENGINES)}")
    return engine


def start(engine: str) -> Tuple[Comm, bool]:
    """Start ``engine`` (idempotent); returns its comm and whether this call started it."""
    if engine == "torch":
        from distrib.comm.torch_dist import TorchComm
        return TorchComm.start()
    from distrib.comm.horovod import HorovodComm
    return HorovodComm.start()


def joined() -> Comm:
    """The comm of the world this process has joined (asked of the engines themselves, no
    state of ours): for callers that are not handed a Context. A world of one when none is up."""
    import sys
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            from distrib.comm.torch_dist import TorchComm
            return TorchComm()
    if "horovod.torch" in sys.modules:
        from distrib.comm.horovod import HorovodComm
        comm = HorovodComm()
        if comm._hvd.is_initialized():
            return comm
    return LocalComm()


def __getattr__(name):
    # The engines import their libraries: only when asked for.
    if name == "HorovodComm":
        from distrib.comm.horovod import HorovodComm
        return HorovodComm
    if name == "TorchComm":
        from distrib.comm.torch_dist import TorchComm
        return TorchComm
    raise AttributeError(f"module 'distrib.comm' has no attribute {name!r}")


__all__ = ["OPS", "Comm", "DistribSetupError", "Handle", "LocalComm", "ENGINES", "choose_engine", "start",
           "joined", "HorovodComm", "TorchComm"]
