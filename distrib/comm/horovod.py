"""The Horovod engine (the default): distrib's collectives over ``horovod.torch``.

The one module of the library that imports Horovod (its torch API, its exceptions and its
elastic machinery), so that a missing or broken build fails in one line, the same way
everywhere: :func:`import_horovod`. Horovod's own state is process-wide (``hvd.init()``); a
:class:`HorovodComm` asks it for ranks and sizes on every call, so after an elastic
re-formation the same object describes the new world.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from distrib.comm.base import Comm, DistribSetupError, Handle, done
from distrib.comm import priority
from distrib.comm.ring_sockets import RingSockets, status_channel_port


def import_horovod():
    """``horovod.torch``, or :class:`DistribSetupError` saying how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise DistribSetupError(
            f"Horovod with PyTorch support is not importable ({exc}); install it into this environment "
            "(README: Installing into your own environment), run `make setup` in a checkout to build it, "
            "or use the torch engine (distrib.init(engine='torch'), python -m launch --engine torch)") from exc
    return hvd


# The ids of the threads hvd.init() started, kept on Horovod's module: they belong to its
# process-wide runtime (a HorovodComm is made anew by every distrib.init()), and its re-init
# (elastic reform) replaces them.
ENGINE_THREADS = "_distrib_engine_threads"


def _remember_engine_threads(hvd, threads) -> None:
    setattr(hvd, ENGINE_THREADS, threads)


class HorovodComm(Comm):
    """Collectives over Horovod. Names are explicit everywhere: Horovod's default name of an
    object collective is the object's type, which differs between the root (a dict) and the
    others (None)."""

    engine = "horovod"
    supports_adasum = True

    def __init__(self, hvd=None):
        super().__init__()
        self._hvd = hvd if hvd is not None else import_horovod()
        self._ops = {"average": self._hvd.Average, "sum": self._hvd.Sum, "adasum": self._hvd.Adasum}
        self._ring = RingSockets()  # the Gloo connections of the world this comm joined (none: not known)

    @classmethod
    def start(cls) -> Tuple["HorovodComm", bool]:
        """Initialise Horovod unless it is; returns the comm and whether this call started it."""
        import os
        hvd = import_horovod()
        if hvd.is_initialized():
            return cls(hvd), False
        if "OMPI_COMM_WORLD_SIZE" in os.environ and not hvd.mpi_built():
            raise DistribSetupError("this worker was started by mpirun, but Horovod was built without MPI; "
                                    "rebuild it with MPI (make setup) or launch with --controller gloo")
        comm = cls(hvd)
        comm._join()
        return comm, True

    def _join(self) -> None:
        """``hvd.init()``, remembering the connections it opened when Gloo runs the world, and
        having the kernel drop those whose peer host goes silent (see ring_sockets)."""
        ring, threads = priority.started_threads(
            lambda: RingSockets.opened_during(self._hvd.init, exclude_port=status_channel_port()))
        _remember_engine_threads(self._hvd, threads)  # lowered while PowerSGD's step computes (priority.py)
        self._ring = RingSockets() if self._hvd.mpi_enabled() else ring  # under MPI the sockets are MPI's
        self._ring.watch_peers()

    def mark_broken(self, exc: BaseException) -> None:
        """A peer is gone: cut this worker's Gloo connections at once, so that a peer blocked in a
        receive from this worker fails now instead of after the Gloo timeout (see ring_sockets)."""
        super().mark_broken(exc)
        self._ring.sever()

    def reform(self) -> None:
        """Elastic: leave the broken world and join the re-formed one (Horovod's own reset)."""
        self._hvd.shutdown()
        self._join()
        self.clear_broken()

    rank = property(lambda self: self._hvd.rank())
    size = property(lambda self: self._hvd.size())
    local_rank = property(lambda self: self._hvd.local_rank())
    local_size = property(lambda self: self._hvd.local_size())
    cross_rank = property(lambda self: self._hvd.cross_rank())
    cross_size = property(lambda self: self._hvd.cross_size())

    @property
    def controller(self) -> str:
        return "mpi" if self._hvd.mpi_enabled() else "gloo"

    @property
    def uses_nccl(self) -> bool:
        return bool(self._hvd.nccl_built())

    @property
    def failures(self):
        from horovod.common.exceptions import HorovodInternalError
        return (HorovodInternalError,)

    def _wait(self, handle) -> Handle:
        return Handle(self, lambda: self._hvd.synchronize(handle))

    def _allreduce(self, tensor, name, op):
        return self._hvd.allreduce(tensor, name=name, op=self._ops[op])  # differentiable

    def _allreduce_async_(self, tensor, name, op):
        return self._wait(self._hvd.allreduce_async_(tensor, name=name, op=self._ops[op]))

    def _reducescatter_into_async(self, tensor, out, name):
        # Horovod's public reduce-scatter returns a tensor it allocates; copy it into the
        # caller's buffer on wait (the caller's buffers are what it keeps between steps).
        handle = self._hvd.reducescatter_async(tensor, name=name, op=self._hvd.Average)
        return Handle(self, lambda: out.copy_(self._hvd.synchronize(handle).reshape(out.shape)))

    def _allgather_into_async(self, tensor, out, name):
        handle = self._hvd.allgather_async(tensor.reshape(-1), name=name)
        return Handle(self, lambda: out.copy_(self._hvd.synchronize(handle).reshape(out.shape)))

    def _broadcast_async_(self, tensor, root, name):
        return self._wait(self._hvd.broadcast_async_(tensor, root_rank=root, name=name))

    def _broadcast_object(self, obj, root, name):
        return self._hvd.broadcast_object(obj, root_rank=root, name=name)

    def _allgather_object(self, obj, name):
        return self._hvd.allgather_object(obj, name=name)

    def _barrier(self, name):
        self._hvd.allreduce(torch.zeros(1), name=name, op=self._hvd.Sum)

    def set_engine_priority(self, nice: int) -> None:
        """Horovod's own threads (its background thread, MPI's or Gloo's) at nice value ``nice``
        (distrib/comm/priority.py: lowered while a step computes, raised for its collectives)."""
        priority.set_nice(getattr(self._hvd, ENGINE_THREADS, frozenset()), nice)

    def mpi_transport(self) -> Optional["MpiTransport"]:
        """:class:`MpiTransport` when Horovod runs on MPI with thread support for a second caller
        (Horovod's background thread keeps using MPI), else None. Must be called on all ranks."""
        hvd = self._hvd
        if not hvd.mpi_enabled() or not hvd.mpi_threads_supported():
            return None
        try:
            from mpi4py import MPI
        except ImportError:
            return None
        if not MPI.Is_initialized() or MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            return None
        if MPI.COMM_WORLD.Get_size() != hvd.size():
            return None
        return MpiTransport(self, MPI.COMM_WORLD.Dup())


class MpiTransport:
    """Average a flat buffer in place with mpi4py on a private duplicate of COMM_WORLD (opt-in:
    ``DISTRIB_REDUCER=mpi``; skips Horovod's cycle time).

    Blocking: :meth:`allreduce_async_` does the whole allreduce and returns a finished handle
    (the order of calls is the same on every rank). Only for float32/float64 CPU buffers. Large
    buffers go in chunks of ``chunk_bytes``: shared-memory allreduce of a chunk that stays in
    cache is several times faster per byte than one of 64 MiB (benchmarks/results.md).
    """

    def __init__(self, comm: HorovodComm, mpi_comm, chunk_bytes: int = 4 * 2**20):
        from mpi4py import MPI
        self._owner, self._mpi, self._comm = comm, MPI, mpi_comm
        self._scale = 1.0 / mpi_comm.Get_size()
        self._chunk_bytes = chunk_bytes

    def allreduce_async_(self, buf: torch.Tensor, *, name: str, op: str = "average") -> Handle:
        if op != "average":
            raise ValueError(f"the mpi transport only averages, got op={op!r}")
        return self._owner._start(self._allreduce_now, buf, call=("allreduce", name, buf))

    def _allreduce_now(self, buf: torch.Tensor) -> Handle:
        flat = buf.numpy()
        step = max(1, self._chunk_bytes // buf.element_size())
        for at in range(0, flat.size, step):
            self._comm.Allreduce(self._mpi.IN_PLACE, flat[at:at + step], op=self._mpi.SUM)
        buf.mul_(self._scale)
        return done(self._owner, buf)


# -- Horovod Elastic: its state protocol and retry loop (distrib/elastic.py, distrib/job/run.py) ----------

def elastic_state_base():
    """Horovod's ``State`` class, the base of :class:`distrib.ElasticState`."""
    try:
        from horovod.common.elastic import State
    except ImportError as exc:  # the same one-line fix as distrib.init() gives
        raise DistribSetupError(f"Horovod is not importable ({exc}); run `make setup` (or scripts/bootstrap.sh) "
                                "to build it") from exc
    return State


def notification_manager():
    """Horovod's listener registry for host changes (raised at the state's next commit)."""
    from horovod.common.elastic import notification_manager as manager
    return manager


def hosts_updated_interrupt() -> type:
    from horovod.common.exceptions import HostsUpdatedInterrupt
    return HostsUpdatedInterrupt
