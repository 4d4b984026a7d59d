"""Count, on any device, the calls that would make the host wait for a GPU.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches them; CI has no GPU, so this
counts what causes them instead, under a ``TorchDispatchMode``:

* ``aten._local_scalar_dense``: what ``.item()``, ``float(t)``, ``int(t)`` and ``bool(t)`` call
  (the host reads a value the device has not produced yet);
* ``Tensor.tolist()`` (it reads every value without going through the dispatcher);
* a host value written into an existing tensor by a blocking op: ``t[k] = 1.0`` becomes a
  ``copy_`` from a tensor made of host data (``aten.lift_fresh``), which on a GPU is a blocking
  host-to-device copy. ``copy_(host_tensor, non_blocking=True)`` and ``fill_(1.0)`` do not wait
  and are not counted.

Each counted call is recorded with the first stack frame outside torch and this file, so a
failure names the line to fix.
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_IGNORED_FRAMES = ("/torch/", "sync_counter.py", "contextlib.py")


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not any(part in frame.filename for part in _IGNORED_FRAMES):
            folder, name = frame.filename.rsplit("/", 2)[-2:]
            return f"{folder}/{name}:{frame.lineno} {frame.line}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...``; then ``c.calls`` lists what would have waited for the device."""

    def __init__(self):
        super().__init__()
        self.calls: List[str] = []
        self._host_made = {}  # id -> tensor made from host data inside the block (kept alive: ids stay unique)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls.append(f"reads a value on the host: {_caller()}")
        elif func is torch.ops.aten.lift_fresh.default:
            self._host_made[id(out)] = out
        elif func._schema.is_mutable and self._writes_host_value(func, args, kwargs):
            self.calls.append(f"writes a host value into a tensor: {_caller()}")
        return out

    def _writes_host_value(self, func, args, kwargs) -> bool:
        if func is torch.ops.aten.copy_.default and (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
            return False
        return any(torch.is_tensor(a) and id(a) in self._host_made for a in args[1:])

    @contextlib.contextmanager
    def counting(self) -> Iterator["SyncCounter"]:
        """The dispatch mode plus ``Tensor.tolist``, which bypasses the dispatcher."""
        original = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            counter.calls.append(f"reads values on the host (tolist): {_caller()}")
            return original(tensor)

        torch.Tensor.tolist = tolist
        try:
            with self:
                yield self
        finally:
            torch.Tensor.tolist = original
            self._host_made.clear()
