"""What every engine offers distrib, and the rules that hold whatever the engine.

:class:`Comm` is the one object through which distrib's collectives go (as torch passes a
``process_group``). An engine (:mod:`distrib.comm.horovod`, :mod:`distrib.comm.torch`,
:mod:`distrib.comm.local`) implements the ``_``-prefixed methods; the public ones add what must
hold at every call site:

* the heartbeat is beaten before each collective, with the collective's kind, name, shape and
  dtype (:mod:`distrib.watch.heartbeat`: a rank that never reached a collective its peers wait in has
  the lowest count, and the launcher blames it; ranks that enter different collectives, or the
  same with another shape, are named by the launcher at once);
* every collective is named by the caller (``name=``: the wrapped optimizer's prefix and what it
  sends), so two models trained in one process never pair their tensors;
* the "world is broken" latch: once a collective raised the engine's peer-failure error
  (:attr:`Comm.failures`), every later collective raises the same error at once, without
  touching the engine, until :meth:`Comm.clear_broken` (elastic recovery, after the world
  re-formed). The rest of a broken step cannot hang or send half its tensors.
  Inside :meth:`Comm.failures_deferred` (``Run.steps()`` puts it around the user's loop body) a
  failure closes the latch without raising, and every collective returns its input unchanged:
  the rest of the step runs to its end, and the caller raises :attr:`Comm.broken` at the step
  boundary, where the elastic recovery loop can catch it. Nothing has to wrap the user's objects.

Every collective must be called on all ranks, in the same order. None of them reads a tensor's
value on the host (a GPU step never waits for the device here).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from distrib.watch.heartbeat import beat

OPS = ("average", "sum", "adasum")


class DistribSetupError(RuntimeError):
    """The engine is missing or unusable, or the workers cannot form one world; the message
    says how to fix it."""


DistribSetupError.__module__ = "distrib"  # tracebacks name it as users import it: distrib.DistribSetupError


class Handle:
    """An asynchronous collective in flight. :meth:`wait` blocks until it is done and returns
    its result (the tensor it wrote); call it once, on every rank that started it."""

    __slots__ = ("_comm", "_wait", "_void")

    def __init__(self, comm: "Comm", wait: Callable[[], Any]):
        self._comm, self._wait = comm, wait
        self._void: Any = None  # what wait() returns in a broken world while failures are deferred

    def wait(self) -> Any:
        return self._comm._guarded(self._wait, void=self._void)


def done(comm: "Comm", result: Any = None) -> Handle:
    """A handle whose collective already finished (one-process worlds, blocking transports)."""
    return Handle(comm, lambda: result)


class Comm:
    """The collectives of one world of workers. Subclasses set :attr:`engine` and :attr:`failures`
    and implement the ``_`` methods; callers use only the public ones."""

    engine = "none"
    controller = "none"  # how the workers found each other (Horovod: mpi or gloo; torch: its backend)
    supports_adasum = False
    uses_nccl = False  # collectives run on NCCL (GPU ranks must then not share a GPU)
    # The cap (MB) of the first gradient bucket (the last layers'), when the engine wants it smaller
    # than the others so that communication starts early in backward (DDP's 1 MiB); None: no special case.
    first_bucket_mb: Optional[float] = None
    # An average is a sum, then a division by the world size in the training thread when the handle
    # is waited for (Gloo has no average op): a caller that copies the tensor anyway can divide while
    # copying and ask for op="sum" instead.
    divides_average = False

    def __init__(self):
        self.broken: Optional[BaseException] = None
        self._deferring = False

    # -- who is where --------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def size(self) -> int:
        raise NotImplementedError

    @property
    def local_rank(self) -> int:
        raise NotImplementedError

    @property
    def local_size(self) -> int:
        raise NotImplementedError

    @property
    def cross_rank(self) -> int:
        raise NotImplementedError

    @property
    def cross_size(self) -> int:
        raise NotImplementedError

    @property
    def failures(self) -> Tuple[type, ...]:
        """Exception types by which this engine says a peer is gone (the latch closes on them)."""
        return ()

    def set_engine_priority(self, nice: int) -> None:
        """The engine's own threads at nice value ``nice`` (distrib/comm/priority.py); engines whose
        threads do not poll leave them alone."""

    # -- the latch -----------------------------------------------------------------------------
    def mark_broken(self, exc: BaseException) -> None:
        """A collective raised one of :attr:`failures`: close the latch (an engine may also tell
        its peers at once, see HorovodComm)."""
        self.broken = exc

    def clear_broken(self) -> None:
        """The world re-formed (elastic): collectives may run again."""
        self.broken = None

    def host_transport(self, numel: int, dtype: torch.dtype, *, name: str):
        """A faster allreduce for ``numel`` elements of CPU gradients per rank than the engine's own,
        when the engine has one for its layout (the torch engine on one host: shared memory), else
        None. Collective: call it on every rank."""
        return None

    @contextlib.contextmanager
    def failures_deferred(self) -> Iterator[None]:
        """Inside this block a peer failure does not raise: the latch closes, and this and every
        later collective return their input unchanged (an async one a finished handle). The
        caller checks :attr:`broken` when the block ends and raises it where it can recover."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _guarded(self, fn: Callable, *args, void: Any = None):
        if self.broken is not None:
            if self._deferring:
                return void
            raise self.broken
        try:
            return fn(*args)
        except self.failures as exc:
            self.mark_broken(exc)
            if self._deferring:
                return void
            raise

    def _start(self, fn: Callable, *args, call: Tuple[str, str, Optional[torch.Tensor]] = ("collective", "?", None),
               void: Any = None, asynchronous: bool = False):
        """Run ``fn`` under the latch, after telling the heartbeat which collective this rank
        enters (``call``: kind, name, tensor): the launcher compares the ranks' records to catch
        a skipped or reordered collective, or another shape (see launch/collective_check.py).
        ``void``: the result in a broken world while failures are deferred (for an asynchronous
        collective, what its handle's ``wait()`` then returns)."""
        kind, name, tensor = call
        if tensor is None:
            beat(f"{kind}:{name}")
        else:  # shape and dtype are host metadata: no device sync
            beat(f"{kind}:{name}", list(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        if not asynchronous:
            return self._guarded(fn, *args, void=void)
        handle = self._guarded(fn, *args, void=None)
        if handle is None:  # broken and deferred: nothing was started
            handle = done(self, void)
        handle._void = void
        return handle

    def _check_op(self, op: str) -> None:
        if op not in OPS:
            raise ValueError(f"op={op!r} is not one of {', '.join(OPS)}")
        if op == "adasum" and not self.supports_adasum:
            raise ValueError(f"op='adasum' needs the Horovod engine (this run uses {self.engine}); "
                             "use op='average' or start the job with the Horovod engine")

    # -- tensors -------------------------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, *, name: str, op: str = "average") -> torch.Tensor:
        """A new tensor: ``tensor`` reduced over all ranks. Differentiable (the gradient is
        reduced the same way), so it can sit in a forward pass (SyncBatchNorm)."""
        self._check_op(op)
        return self._start(self._allreduce, tensor, name, op, call=("allreduce", name, tensor), void=tensor)

    def allreduce_async_(self, tensor: torch.Tensor, *, name: str, op: str = "average") -> Handle:
        """Start reducing ``tensor`` in place over all ranks; ``handle.wait()`` returns it."""
        self._check_op(op)
        return self._start(self._allreduce_async_, tensor, name, op, call=("allreduce", name, tensor), void=tensor,
                           asynchronous=True)

    def reducescatter_into_async(self, tensor: torch.Tensor, out: torch.Tensor, *, name: str) -> Handle:
        """Start averaging ``tensor`` over all ranks; this rank's equal part (``tensor.numel() //
        size`` elements, the ``rank``-th) lands in ``out``, a buffer the caller owns."""
        if tensor.numel() != out.numel() * self.size:
            raise ValueError(f"reduce-scatter of {tensor.numel()} elements into {out.numel()} on {self.size} ranks")
        return self._start(self._reducescatter_into_async, tensor, out, name, call=("reducescatter", name, tensor),
                           void=out, asynchronous=True)

    def allgather_into_async(self, tensor: torch.Tensor, out: torch.Tensor, *, name: str) -> Handle:
        """Start concatenating every rank's ``tensor`` (same size everywhere) into ``out``."""
        if out.numel() != tensor.numel() * self.size:
            raise ValueError(f"allgather of {tensor.numel()} elements into {out.numel()} on {self.size} ranks")
        return self._start(self._allgather_into_async, tensor, out, name, call=("allgather", name, tensor),
                           void=out, asynchronous=True)

    def broadcast_async_(self, tensor: torch.Tensor, *, root: int = 0, name: str) -> Handle:
        """Start overwriting ``tensor`` with ``root``'s, in place."""
        return self._start(self._broadcast_async_, tensor, root, name, call=("broadcast", name, tensor), void=tensor,
                           asynchronous=True)

    def broadcast_tensors(self, named: Sequence[Tuple[str, torch.Tensor]], *, root: int = 0, prefix: str) -> None:
        """``root``'s values in every ``(name, tensor)`` of ``named``, in place; all started, then
        all waited for. Every rank must pass the same names in the same order."""
        handles = [self.broadcast_async_(t, root=root, name=f"{prefix}.{n}") for n, t in named]
        for handle in handles:
            handle.wait()

    # -- picklable objects ---------------------------------------------------------------------
    def broadcast_object(self, obj: Any, *, root: int = 0, name: str) -> Any:
        """``root``'s ``obj`` on every rank (what the others pass is ignored)."""
        return self._start(self._broadcast_object, obj, root, name, call=("broadcast_object", name, None), void=obj)

    def allgather_object(self, obj: Any, *, name: str) -> List[Any]:
        """Every rank's ``obj``, in rank order."""
        return self._start(self._allgather_object, obj, name, call=("allgather_object", name, None),
                           void=[obj])

    def barrier(self, *, name: str) -> None:
        """Return once every rank has called it. Callers say why they need one."""
        self._start(self._barrier, name, call=("barrier", name, None))

    # -- what an engine implements -------------------------------------------------------------
    def _allreduce(self, tensor, name, op):
        raise NotImplementedError

    def _allreduce_async_(self, tensor, name, op) -> Handle:
        raise NotImplementedError

    def _reducescatter_into_async(self, tensor, out, name) -> Handle:
        raise NotImplementedError

    def _allgather_into_async(self, tensor, out, name) -> Handle:
        raise NotImplementedError

    def _broadcast_async_(self, tensor, root, name) -> Handle:
        raise NotImplementedError

    def _broadcast_object(self, obj, root, name):
        raise NotImplementedError

    def _allgather_object(self, obj, name):
        raise NotImplementedError

    def _barrier(self, name) -> None:
        raise NotImplementedError
