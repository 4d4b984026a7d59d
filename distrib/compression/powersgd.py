"""PowerSGD (Vogels et al., NeurIPS 2019): low-rank gradient averaging with error feedback.

Pure tensor math on one process; the collectives between the phases are the caller's
(:class:`distrib.compression.reducer.PowerSGDReducer`). For every gradient matrix ``M`` (a
tensor of ``n`` rows viewed as ``n x m``) that is worth compressing, one step is::

    M_in = M + E                      # error feedback: what earlier steps did not transmit
    P    = M_in @ Q                   # Q: m x r, orthonormal columns, kept from the last step
    P    = orthogonalize(mean_ranks P)# 1st collective: all P's in one flat buffer
    Q    = M_in^T @ P                 # 2nd collective: all Q's in one flat buffer,
    Q    = mean_ranks Q               #   averaged
    M'   = P @ Q^T                    # = P P^T mean(M_in): the same on every rank

(torch's hook sums P; orthogonalisation does not see the factor, so P is averaged here and
rides in one collective with the uncompressed tensors, which are averaged too.)
    E    = M_in - M'                  # this rank's share that did not make it

This is torch's ``powerSGD_hook`` per matrix (``torch/distributed/algorithms/ddp_comm_hooks/
powerSGD_hook.py``) with its defaults: warm start (Q reused, re-orthogonalised, each step),
``min_compression_rate`` (a matrix is compressed only when ``(n + m) * r * rate < n * m``),
error feedback; the error of tensors sent uncompressed is not kept (their average is exact).
Differences: the initial Q comes from a private generator (the global RNG, which a checkpoint
restores, is never touched), and a step whose P or Q is not finite (an fp16 loss-scale
overflow, which GradScaler then skips) restarts the error feedback at zero and the warm start
at the initial Q instead of carrying NaN forever. Nothing here reads a tensor's value on the
host.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class PowerSGD:
    """Configuration of ``distrib.wrap(..., compression="powersgd", powersgd=PowerSGD(...))``.

    ``rank``: columns of P and Q (1 to 4 is the useful range: the wire carries ``(n + m) * rank``
    numbers instead of ``n * m``). ``start_step``: steps of plain allreduce first (DDP's
    ``start_powerSGD_iter``; the first steps' gradients are large and change fast: with AdamW the
    LM of the benchmarks needed 30 of 100 steps to end within 1 % of uncompressed at rank 2 and 4,
    DDP's own hook alike).
    ``min_compression_rate``: compress a matrix only when it shrinks at least this much;
    vectors are never compressed (0 compresses every matrix, even where P and Q are larger
    than it: only for checking the math). ``seed``: of the initial Q (the same on every rank).
    """
    rank: int = 4
    start_step: int = 10
    min_compression_rate: float = 2.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"PowerSGD rank must be an int >= 1, got {self.rank!r}; try rank=4")
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"PowerSGD start_step must be an int >= 0, got {self.start_step!r}; try start_step=10")
        if not self.min_compression_rate >= 0:
            raise ValueError(f"PowerSGD min_compression_rate must be >= 0, got {self.min_compression_rate!r}; "
                             "try 2.0")


def as_matrix_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """``(n, m)``: the first dimension by all the others (a conv kernel: out x in*k*k)."""
    n = shape[0] if len(shape) else 1
    numel = 1
    for d in shape:
        numel *= d
    return n, numel // max(n, 1)


def should_compress(shape: Sequence[int], rank: int, min_compression_rate: float) -> bool:
    """Whether a tensor of ``shape`` goes low-rank: a matrix (2+ dims) whose P and Q are at least
    ``min_compression_rate`` times smaller than it (torch's ``_should_compress``)."""
    if len(shape) < 2:
        return False
    n, m = as_matrix_shape(shape)
    r = min(n, m, rank)
    return (n + m) * r * min_compression_rate < n * m


def orthogonalize_(batch: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of each matrix of ``batch`` (``B x n x r``), in place.

    A column that is all zeros (a gradient of zeros) stays zero instead of becoming NaN.
    """
    tiny = torch.finfo(batch.dtype).tiny
    for i in range(batch.shape[2]):
        col = batch[:, :, i:i + 1]
        col.div_(torch.linalg.vector_norm(col, dim=1, keepdim=True).clamp_min(tiny))
        if i + 1 < batch.shape[2]:
            rest = batch[:, :, i + 1:]
            rest.sub_((col * rest).sum(dim=1, keepdim=True) * col)
    return batch


def initial_q(shapes: Sequence[Tuple[int, int, int]], seed: int, dtype: torch.dtype) -> List[torch.Tensor]:
    """The first step's Q of each matrix (``(n, m, r)`` each: an ``m x r`` standard normal
    draw, orthogonalised), from a generator of its own seeded with ``seed``: identical on
    every rank and in every run with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.randn(m, r, generator=gen, dtype=torch.float64).to(dtype) for _, m, r in shapes]
    for q in qs:
        orthogonalize_(q.unsqueeze(0))
    return qs


class PowerSGDState:
    """One rank's PowerSGD state for a fixed list of gradient shapes, and the step's math.

    ``shapes``: every gradient's shape, in the order the caller passes gradients. Those worth
    compressing (:func:`should_compress`) get a P and a Q slice of two flat buffers (grouped by
    shape, so that Gram-Schmidt runs batched) and an error buffer. Per step, on every rank:
    :meth:`start` (``P`` to average over ranks), :meth:`after_p_mean` (``Q`` to average over
    ranks), :meth:`finish` (the low-rank average written into the gradients).
    """

    def __init__(self, shapes: Sequence[torch.Size], config: PowerSGD, *, dtype: torch.dtype,
                 device: torch.device):
        self.config, self.dtype, self.device = config, dtype, device
        self.compressed = [i for i, s in enumerate(shapes) if should_compress(s, config.rank,
                                                                             config.min_compression_rate)]
        self.uncompressed = [i for i in range(len(shapes)) if i not in set(self.compressed)]
        dims = {i: as_matrix_shape(shapes[i]) for i in self.compressed}
        self.dims = {i: (n, m, min(n, m, config.rank)) for i, (n, m) in dims.items()}
        # Matrices of one shape sit side by side in P and Q: one batched Gram-Schmidt per shape.
        by_shape: Dict[Tuple[int, int, int], List[int]] = {}
        for i in self.compressed:
            by_shape.setdefault(self.dims[i], []).append(i)
        self.order = [i for group in by_shape.values() for i in group]
        p_total = sum(self.dims[i][0] * self.dims[i][2] for i in self.order)
        q_total = sum(self.dims[i][1] * self.dims[i][2] for i in self.order)
        self.p_flat = torch.zeros(p_total, dtype=dtype, device=device)
        self.q_flat = torch.zeros(q_total, dtype=dtype, device=device)
        self.p_groups, self.q_groups, self.p, self.q = [], [], {}, {}
        p_at = q_at = 0
        for (n, m, r), members in by_shape.items():
            k = len(members)
            pg = self.p_flat[p_at:p_at + k * n * r].view(k, n, r)
            qg = self.q_flat[q_at:q_at + k * m * r].view(k, m, r)
            self.p_groups.append(pg)
            self.q_groups.append(qg)
            for j, i in enumerate(members):
                self.p[i], self.q[i] = pg[j], qg[j]
            p_at, q_at = p_at + k * n * r, q_at + k * m * r
        self.q_start = torch.zeros_like(self.q_flat)
        for i, q in zip(self.order, initial_q([self.dims[i] for i in self.order], config.seed, dtype)):
            self.q_start[self._q_range(i)].copy_(q.reshape(-1))
        self.q_flat.copy_(self.q_start)
        self.errors = {i: torch.zeros(self.dims[i][:2], dtype=dtype, device=device) for i in self.compressed}
        self._inputs: Dict[int, torch.Tensor] = {}
        self.step = 0  # steps averaged so far (plain or low-rank): decides the warm-up's end

    def _q_range(self, i: int) -> slice:
        start = self.q[i].data_ptr() - self.q_flat.data_ptr()
        start //= self.q_flat.element_size()
        return slice(start, start + self.q[i].numel())

    # -- one step -----------------------------------------------------------------------------
    def start(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """This rank's P of every compressed gradient, in one flat buffer to be averaged (or
        summed) over ranks. ``grads``: every gradient, in the order of ``shapes``. Adds the error feedback."""
        for group in self.q_groups:
            orthogonalize_(group)  # warm start: last step's Q, orthonormal again
        for i in self.compressed:
            n, m, _ = self.dims[i]
            m_in = self.errors[i]
            m_in.add_(grads[i].detach().reshape(n, m).to(self.dtype))  # the error buffer becomes M + E
            self._inputs[i] = m_in
            torch.matmul(m_in, self.q[i], out=self.p[i])
        return self.p_flat

    def after_p_mean(self, p_mean: torch.Tensor) -> torch.Tensor:
        """Given the mean (or sum) of every rank's P: this rank's Q, in one flat buffer to be
        averaged over ranks."""
        if p_mean.data_ptr() != self.p_flat.data_ptr():
            self.p_flat.copy_(p_mean)
        for group in self.p_groups:
            orthogonalize_(group)
        for i in self.compressed:
            # (P^T M)^T, not M^T P: torch's matmul of a transposed large matrix into out= took
            # 10-100x longer here (a slow path); this product is r x m, copied transposed.
            self.q[i].copy_(torch.mm(self.p[i].t(), self._inputs[i]).t())
        return self.q_flat

    def finish(self, q_mean: torch.Tensor, grads: Sequence[torch.Tensor],
               applied: Dict[int, torch.Tensor] = None) -> None:
        """Given the mean of every rank's Q: write ``P Q^T`` (the low-rank average, identical on
        every rank) into the compressed ``grads`` and keep the rest as error.
        ``applied``: per compressed index, an optional 0/1 tensor; 0 (no rank used the
        parameter, so the optimizer will not step it) keeps the whole input as error."""
        if q_mean.data_ptr() != self.q_flat.data_ptr():
            self.q_flat.copy_(q_mean)
        for i in self.compressed:
            n, m, _ = self.dims[i]
            grad = grads[i]
            direct = grad.is_contiguous() and grad.dtype == self.dtype
            approx = grad.view(n, m) if direct else torch.empty(n, m, dtype=self.dtype, device=self.device)
            torch.mm(self.p[i], self.q[i].t(), out=approx)
            if not direct:
                grad.copy_(approx.view_as(grad))
            if applied is not None and i in applied:
                self._inputs[i].addcmul_(approx, applied[i], value=-1)  # the error buffer: M + E - M'
            else:
                self._inputs[i].sub_(approx)
        self._inputs.clear()
        self._restart_if_not_finite()

    def _restart_if_not_finite(self) -> None:
        """After an overflow (fp16 loss scaling): error feedback from zero, warm start from the
        initial Q. Tensor ops only: no host sync."""
        if not self.compressed:
            return
        finite = torch.isfinite(self.q_flat).all() & torch.isfinite(self.p_flat).all()
        torch.where(finite, self.q_flat, self.q_start, out=self.q_flat)
        for e in self.errors.values():
            e.masked_fill_(~finite, 0.0)

    # -- what a checkpoint keeps --------------------------------------------------------------
    def shared_state_dict(self) -> Dict[str, object]:
        """What every rank holds alike: the step count and the warm-start Q's."""
        return {"step": self.step, "q": self.q_flat.detach().clone()}

    def load_shared_state_dict(self, state: Dict[str, object]) -> None:
        q = state["q"]
        if q.shape != self.q_flat.shape:
            raise ValueError(f"PowerSGD state has Q of {q.numel()} numbers, this model needs {self.q_flat.numel()}: "
                             "the checkpoint is of another model or PowerSGD rank; resume with the same "
                             "model and powersgd= settings")
        self.q_flat.copy_(q)
        self.step = int(state["step"])

    def error_state_dict(self) -> Dict[str, torch.Tensor]:
        """This rank's own error feedback (differs per rank)."""
        return {str(i): e.detach().clone() for i, e in self.errors.items()}

    def load_error_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if set(state) != {str(i) for i in self.errors}:
            raise ValueError("PowerSGD error feedback in the checkpoint is for other tensors than this model's; "
                             "resume with the same model and powersgd= settings")
        for i, e in self.errors.items():
            e.copy_(state[str(i)])

    def restart_error_feedback(self) -> None:
        for e in self.errors.values():
            e.zero_()

    def restart(self) -> None:
        """Everything from the beginning: warm-up steps, initial Q, no error. The same on every
        rank whatever each held before (a worker that joins an elastic job has nothing)."""
        self.restart_error_feedback()
        self.q_flat.copy_(self.q_start)
        self.step = 0
