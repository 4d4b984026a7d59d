"""The torch engine: distrib's collectives over ``torch.distributed`` (Gloo on CPU, NCCL on GPU).

Picked by ``distrib.init(engine="torch")``, ``DISTRIB_ENGINE=torch`` (``python -m launch --engine
torch`` sets it), or when the script runs under ``torchrun``. The workers find each other through
torchrun's variables (:data:`WORLD_VARIABLES`: ``init_process_group("env://")``); with none of them
set the process is a world of one. Horovod need not be installed.

Horovod's ``Average`` has no Gloo counterpart (``ReduceOp.AVG`` is NCCL's), so on Gloo an average
is a sum divided by the world size when the handle is waited for: on the device, no host sync.
"""
from __future__ import annotations

import atexit
import datetime
import sys
import os
from typing import Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from distrib.comm.base import Comm, DistribSetupError, Handle

# What torchrun (and python -m launch --engine torch) give every worker.
WORLD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Enough to say "this process was started as one worker of a torch world".
REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun(env: Mapping[str, str]) -> bool:
    """True when the rendezvous variables of a torch world are set (torchrun, our launcher)."""
    return all(name in env for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise DistribSetupError(f"{name}={raw!r} is not a non-negative integer; "
                                "start the workers with torchrun or python -m launch --engine torch")
    return int(raw)


EXIT_BARRIER_S = 5.0


def _leave(dist_module) -> None:
    """Destroy the group distrib started, after the other ranks got here too. A rank whose peer
    already tore its group down can abort in Gloo's teardown ("terminate called without an active
    exception", seen when one rank exits while another still writes its results). A process that
    is dying of an uncaught exception (``sys.last_value``) does not wait; one that exits
    otherwise while its peers still train waits at most EXIT_BARRIER_S for them."""
    if not dist_module.is_initialized():
        return
    if (getattr(sys, "last_value", None) is None and dist_module.get_backend() == "gloo"
            and dist_module.get_world_size() > 1):
        try:
            dist_module.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_S))
        except Exception:  # noqa: BLE001 - a peer gone or busy: leave anyway
            pass
    dist_module.destroy_process_group()


class _Allreduce(torch.autograd.Function):
    """An allreduce that autograd sees through: the gradient is reduced the same way."""

    @staticmethod
    def forward(ctx, tensor, comm, op):
        ctx.comm, ctx.op = comm, op
        out = tensor.detach().clone()
        comm._reduce_now(out, op)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        ctx.comm._reduce_now(grad, ctx.op)
        return grad, None, None


class TorchComm(Comm):
    """Collectives over the default ``torch.distributed`` process group."""

    engine = "torch"
    supports_adasum = False

    def __init__(self, env: Optional[Mapping[str, str]] = None):
        super().__init__()
        env = os.environ if env is None else env
        self._size = dist.get_world_size()
        self._rank = dist.get_rank()
        self._local_size = _int(env, "LOCAL_WORLD_SIZE", 1 if self._size == 1 else self._size)
        self._local_rank = _int(env, "LOCAL_RANK", self._rank % self._local_size)
        self._backend = dist.get_backend()
        # NCCL averages on the device; Gloo sums, and the mean is taken when the handle is waited for.
        self._native_avg = self._backend == "nccl"

    @classmethod
    def start(cls, env: Optional[Mapping[str, str]] = None) -> Tuple["TorchComm", bool]:
        """Join the torch world described by the environment unless joined; returns the comm and
        whether this call started it."""
        env = os.environ if env is None else env
        if dist.is_initialized():
            return cls(env), False
        present = [n for n in REQUIRED if n in env]
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"
        if not present:  # a plain `python script.py`: a world of one, with no port to open
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        elif len(present) < len(REQUIRED):
            missing = ", ".join(n for n in REQUIRED if n not in env)
            raise DistribSetupError(f"the torch engine found {', '.join(present)} but not {missing}; start the "
                                    "workers with torchrun or python -m launch --engine torch, which set them all")
        else:
            if backend == "nccl":
                torch.cuda.set_device(_int(env, "LOCAL_RANK", 0) % torch.cuda.device_count())
            dist.init_process_group(backend, init_method="env://")
        # The group distrib started, distrib ends: a process that exits with it alive may abort in
        # its destructor ("terminate called without an active exception", seen under load).
        atexit.register(_leave, dist)
        return cls(env), True

    rank = property(lambda self: self._rank)
    size = property(lambda self: self._size)
    local_rank = property(lambda self: self._local_rank)
    local_size = property(lambda self: self._local_size)

    @property
    def cross_rank(self) -> int:
        return self._rank // self._local_size

    @property
    def cross_size(self) -> int:
        return -(-self._size // self._local_size)

    @property
    def controller(self) -> str:
        return self._backend

    @property
    def divides_average(self) -> bool:
        return not self._native_avg

    @property
    def first_bucket_mb(self) -> Optional[float]:
        """DDP's first bucket (1 MiB) when the world spans hosts: its allreduce crosses the link while
        backward still computes the earlier layers (1 Gbit/s, 2 hosts, lm8, distrib / DDP: 0.94x with
        it, 0.97x without). On one host Gloo's loopback allreduce runs on the cores backward needs,
        so the early start buys nothing and the extra collective costs its latency: none there
        (the step section's lever row measures it)."""
        return 1.0 if self.cross_size > 1 else None

    def host_transport(self, numel: int, dtype: torch.dtype, *, name: str):
        """Shared memory when every rank is on this host and Gloo carries the gradients (Gloo has
        no shared-memory transport: loopback TCP, ~3x slower here; see distrib.comm.shared_memory).
        ``DISTRIB_SHM=0`` keeps Gloo's allreduce (benchmarks, bisecting)."""
        if (self._backend != "gloo" or self._size == 1 or self.cross_size != 1
                or os.environ.get("DISTRIB_SHM", "1") == "0"):
            return None
        from distrib.comm.shared_memory import SharedMemoryTransport
        return SharedMemoryTransport.open(self, numel, dtype, name=name)

    @property
    def uses_nccl(self) -> bool:
        return self._backend == "nccl"

    @property
    def failures(self):
        return (dist.DistBackendError,)

    # -- tensors -------------------------------------------------------------------------------
    def _op(self, op: str):
        return dist.ReduceOp.AVG if op == "average" and self._native_avg else dist.ReduceOp.SUM

    def _finish(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if op == "average" and not self._native_avg and self._size > 1:
            tensor.div_(self._size)
        return tensor

    def _reduce_now(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        dist.all_reduce(tensor, op=self._op(op))
        return self._finish(tensor, op)

    def _allreduce(self, tensor, name, op):
        return _Allreduce.apply(tensor, self, op)

    def _allreduce_async_(self, tensor, name, op):
        work = dist.all_reduce(tensor, op=self._op(op), async_op=True)
        return Handle(self, lambda: (work.wait(), self._finish(tensor, op))[1])

    def _reducescatter_into_async(self, tensor, out, name):
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        work = reduce_scatter(out.view(-1), tensor.reshape(-1), op=self._op("average"), async_op=True)

        def wait():
            work.wait()
            return self._finish(out, "average")
        return Handle(self, wait)

    def _allgather_into_async(self, tensor, out, name):
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = all_gather(out.view(-1), tensor.reshape(-1), async_op=True)
        return Handle(self, lambda: (work.wait(), out)[1])

    def _broadcast_async_(self, tensor, root, name):
        work = dist.broadcast(tensor, src=root, async_op=True)
        return Handle(self, lambda: (work.wait(), tensor)[1])

    # -- objects -------------------------------------------------------------------------------
    def _broadcast_object(self, obj, root, name):
        box = [obj]
        dist.broadcast_object_list(box, src=root)
        return box[0]

    def _allgather_object(self, obj, name):
        out = [None] * self._size
        dist.all_gather_object(out, obj)
        return out

    def _barrier(self, name):
        dist.barrier()
