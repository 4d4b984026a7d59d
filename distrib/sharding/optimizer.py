"""ZeRO's optimizer side: each rank keeps optimizer state for, and steps, only the elements it owns.

:class:`ZeroShard` cuts the user's optimizer into *pieces* (:mod:`distrib.sharding.layout`):
views into the real parameters, so stepping a piece updates the model in place and no master
copy exists. A private optimizer of the user's class (same hyper-parameters, which follow the
user's ``param_groups`` at every step, so LR schedules keep working) steps the pieces; then every
bucket's updated chunk is allgathered into every rank's parameters. The gradient norm for
clipping is the square root of the sum of every rank's partial sum of squares (one allreduce),
and the fp16 loss scaler skips the step on every rank when any rank saw an inf.

The state it saves (:meth:`ZeroShard.state_dict`) holds this rank's pieces and the global
offsets of every rank's pieces; :mod:`distrib.checkpoint.sharded` writes one file per rank and
re-cuts them for another world size.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from distrib.sharding import layout as lay
from distrib.sharding.collectives import Pool

SHARDED_FORMAT = "distrib-sharded-optimizer-v1"
# The optimizers whose state is per parameter element (plus a scalar step count), so a slice of a
# parameter steps exactly like those elements of the whole. Anything with per-tensor state or
# per-tensor math (LBFGS, Adafactor's factored moments, Lamb's trust ratio, ...) is refused.
SUPPORTED = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.RMSprop)
SCALAR_KEYS = frozenset({"step"})  # every other state entry of SUPPORTED is one value per element
STAGES = ("optimizer", "gradients")


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless ``optimizer`` can be sharded element by element."""
    if type(optimizer) not in SUPPORTED:
        names = ", ".join(c.__name__ for c in SUPPORTED)
        raise ValueError(f"shard= needs an optimizer whose state is per parameter element ({names}); "
                         f"{type(optimizer).__name__} is not one of them: use shard=None")


class ZeroShard:
    """This rank's part of the optimizer. Built on all ranks with the same model and optimizer.

    ``params`` are the optimizer's parameters in ``param_groups`` order (index = torch's state id).
    ``name`` prefixes the collective names (unique per wrapped optimizer).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, comm, rank: int, size: int, *, name: str,
                 bucket_bytes: int):
        check_supported(optimizer)
        self.user = optimizer
        self._comm, self.rank, self.size, self.name = comm, rank, size, name
        self.params: List[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(self.params):
            if not p.is_contiguous():
                raise ValueError(f"shard= needs contiguous parameters; parameter {i} (shape {tuple(p.shape)}) "
                                 "is not: make it contiguous before distrib.wrap")
        group_of = [gi for gi, g in enumerate(optimizer.param_groups) for _ in g["params"]]
        # Frozen parameters get no gradient and are never stepped: they are left out.
        trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        self.buckets = lay.plan([self.params[i].numel() for i in trainable],
                                [(self.params[i].dtype, self.params[i].device, group_of[i]) for i in trainable],
                                [self.params[i].element_size() for i in trainable], size, bucket_bytes,
                                indices=trainable)
        # piece tensors: views of the parameters' own storage
        self.pieces: List[List[Tuple[lay.Piece, torch.Tensor]]] = [
            [(pc, self.params[pc.index].detach().view(-1)[pc.start:pc.end]) for pc in b.pieces(rank)]
            for b in self.buckets]
        self._key = {(pc.index, pc.start, pc.end): t for b in self.pieces for pc, t in b}
        self._inner_groups: List[int] = []  # user group of each inner group
        self.pool = Pool()  # allgather buffers, reused every step (and stage 2's bucket buffers)
        self.inner = self._make_inner(group_of)
        if optimizer.state:  # state loaded before wrap: keep this rank's slice of it
            self.load_state_dict(optimizer.state_dict())
        optimizer.state.clear()  # the full state is never kept (that is the point)

    def _make_inner(self, group_of: Sequence[int]) -> torch.optim.Optimizer:
        by_group: Dict[int, List[torch.Tensor]] = {}
        for b in self.pieces:
            for pc, t in b:
                by_group.setdefault(group_of[pc.index], []).append(t)
        groups = []
        for gi in sorted(by_group):
            groups.append({**_hyper(self.user.param_groups[gi]), "params": by_group[gi]})
            self._inner_groups.append(gi)
        if not groups:  # this rank owns nothing (tiny model, many ranks): an optimizer that steps nothing
            groups = [{**_hyper(self.user.param_groups[0]), "params": [torch.zeros(0)]}]
            self._inner_groups.append(0)
        return type(self.user)(groups)

    # -- the step -------------------------------------------------------------------------------------
    def step(self, grad_of: Callable[[int, lay.Piece, torch.Tensor], Optional[torch.Tensor]], *,
             scaler=None, max_grad_norm: Optional[float] = None) -> Optional[torch.Tensor]:
        """Unscale (fp16), clip by the global norm, step this rank's pieces, allgather the
        parameters. ``grad_of(bucket, piece, tensor)`` gives the averaged gradient of a piece
        (or None: not stepped). Must be called on all ranks; returns the global gradient norm
        (a tensor: nothing here waits for the device) when clipping, else None."""
        for inner_group, gi in zip(self.inner.param_groups, self._inner_groups):
            inner_group.update(_hyper(self.user.param_groups[gi]))  # LR schedules write the user's groups
        grads = []
        for bi, b in enumerate(self.pieces):
            for pc, t in b:
                t.grad = grad_of(bi, pc, t)
                if t.grad is not None:
                    grads.append(t.grad)
        fp16 = scaler is not None and scaler.is_enabled()
        local_inf = None
        if fp16:
            scaler.unscale_(self.inner)
            found = scaler._per_optimizer_states[id(self.inner)]["found_inf_per_device"]
            local_inf = sum(found.values(), torch.zeros((), dtype=torch.float64, device=self._device()))
        norm = None
        if max_grad_norm is not None or fp16:
            norm, any_inf = self._global_norm(grads, local_inf)
            if fp16:
                # The scaler saw only this rank's pieces: give it every rank's verdict, so all
                # ranks skip (or take) the step together. (GradScaler keeps it per optimizer.)
                found = scaler._per_optimizer_states[id(self.inner)]["found_inf_per_device"]
                found.clear()
                found[scaler._scale.device] = any_inf.to(device=scaler._scale.device, dtype=torch.float32)
        if max_grad_norm is not None and grads:
            # torch.nn.utils.clip_grad_norm_'s arithmetic, on the global norm
            coef = torch.clamp(max_grad_norm / (norm.to(grads[0].device, grads[0].dtype) + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef)
        if fp16:
            scaler.step(self.inner)
            scaler.update()
        else:
            self.inner.step()
        for b in self.pieces:
            for _, t in b:
                t.grad = None
        # Also after a step the scaler skipped (the pieces are unchanged, so this rewrites the same
        # values): knowing it was skipped would take a read of the inf flag on the host.
        self.allgather_params()
        return norm if max_grad_norm is not None else None

    def _device(self) -> torch.device:
        return self.params[0].device

    def _global_norm(self, grads: List[torch.Tensor], local_inf: Optional[torch.Tensor]):
        """(global norm, any rank saw an inf): two tensors on the device, one allreduce of 2 numbers."""
        zero = torch.zeros((), dtype=torch.float64, device=self._device())
        partial = sum((torch.linalg.vector_norm(g, 2, dtype=torch.float64) ** 2 for g in grads), zero)
        inf = zero if local_inf is None else local_inf.to(zero.device, torch.float64)
        both = self._comm.allreduce(torch.stack([partial, inf]), name=f"{self.name}.norm", op="sum")
        return torch.sqrt(both[0]), (both[1] > 0) | ~torch.isfinite(both[0])

    def allgather_params(self, window: int = 2) -> None:
        """Every rank's updated chunks into every rank's parameters, bucket by bucket (at most
        ``window`` in flight, so the receive buffers stay small). Must be called on all ranks."""
        pending: List[Tuple[int, Any, torch.Tensor, torch.Tensor]] = []
        for bi, (b, pieces) in enumerate(zip(self.buckets, self.pieces)):
            dtype = self.params[b.members[0]].dtype
            send = self.pool.take(b.chunk, dtype, self._device())
            full = self.pool.take(b.chunk * self.size, dtype, self._device())
            for pc, t in pieces:
                send[pc.at:pc.at + pc.numel].copy_(t)
            send[sum(pc.numel for pc, _ in pieces):].zero_()  # the padding of the last chunk
            pending.append((bi, self._comm.allgather_into_async(send, full, name=f"{self.name}.ag.{bi}"), send, full))
            while len(pending) > window:
                self._unpack(*pending.pop(0))
        while pending:
            self._unpack(*pending.pop(0))

    def _unpack(self, bi: int, handle, send: torch.Tensor, full: torch.Tensor) -> None:
        handle.wait()
        b = self.buckets[bi]
        with torch.no_grad():
            for index, offset, numel in zip(b.members, b.offsets, b.numels):
                self.params[index].view(-1).copy_(full[offset:offset + numel])
        self.pool.give(send)
        self.pool.give(full)

    # -- state ----------------------------------------------------------------------------------------
    def owned_ranges(self) -> List[Tuple[int, int, int]]:
        return lay.owned(self.buckets, self.rank)

    def state_dict(self) -> Dict[str, Any]:
        """This rank's pieces of the state, with the global offsets every rank's pieces have
        (``owners``) and the user's param groups in torch's form (params as indices)."""
        pieces = []
        for b in self.pieces:
            for pc, t in b:
                state = self.inner.state.get(t)
                if state:
                    pieces.append({"index": pc.index, "start": pc.start, "end": pc.end, "state": dict(state)})
        return {"format": SHARDED_FORMAT, "world_size": self.size, "rank": self.rank,
                "param_groups": _indexed_groups(self.user), "shapes": [list(p.shape) for p in self.params],
                "owners": [lay.owned(self.buckets, r) for r in range(self.size)], "pieces": pieces}

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        """Load a sharded state cut for this rank (:mod:`distrib.checkpoint.sharded` re-cuts one
        saved at another world size), or a plain torch optimizer state dict (this rank keeps
        its slice of it)."""
        _check_groups(self.user, saved["param_groups"])
        for group, saved_group in zip(self.user.param_groups, saved["param_groups"]):
            group.update(_hyper(saved_group))
        self.inner.state.clear()
        if saved.get("format") == SHARDED_FORMAT:
            mine = {(p["index"], p["start"], p["end"]): p["state"] for p in saved["pieces"]}
            extra = sorted(set(mine) - set(self._key))
            if extra:
                raise ValueError(f"sharded optimizer state for element ranges {extra[:3]} that rank {self.rank} "
                                 f"of {self.size} does not own; load it through distrib.checkpoint, which "
                                 "re-cuts it for this world size")
            for key, state in mine.items():
                self._set_state(self._key[key], state)
            return
        for (index, start, end), t in self._key.items():
            state = saved["state"].get(index)
            if state:
                self._set_state(t, {k: v.reshape(-1)[start:end] if per_element(k, v) else v
                                    for k, v in state.items()})

    def _set_state(self, t: torch.Tensor, state: Dict[str, Any]) -> None:
        self.inner.state[t] = {k: (v.detach().to(t.device, dtype=t.dtype if per_element(k, v) else v.dtype).clone()
                                   if torch.is_tensor(v) else v) for k, v in state.items()}

    def nbytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(v.numel() * v.element_size() for s in self.inner.state.values() for v in s.values()
                   if torch.is_tensor(v))


def per_element(key: str, value: Any) -> bool:
    """An optimizer state entry with one value per parameter element (sliced when sharding)."""
    return torch.is_tensor(value) and key not in SCALAR_KEYS


def _hyper(group: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _indexed_groups(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    groups, at = [], 0
    for g in optimizer.param_groups:
        groups.append({**_hyper(g), "params": list(range(at, at + len(g["params"])))})
        at += len(g["params"])
    return groups


def _check_groups(optimizer: torch.optim.Optimizer, saved_groups: List[Dict[str, Any]]) -> None:
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in saved_groups]
    if ours != theirs:
        raise ValueError(f"optimizer state has param groups of sizes {theirs}, this optimizer {ours}")
