"""Stop at a step boundary when Slurm warns of the end of a job, checkpoint, and requeue.

Slurm sends ``SIGUSR2`` some time before the time limit (``#SBATCH --signal=USR2@90``; not
USR1, which NCCL may catch) and ``SIGTERM`` when it preempts or cancels a job. Saving inside a
signal handler fails intermittently (Lightning issue 21406), so the handler only records the
signal; the training loop asks :meth:`PreemptionHandler.should_stop` at each step boundary, and
all ranks agree through one small allreduce so that they stop at the same step::

    preemption = distrib.PreemptionHandler()
    for step in ...:
        train_step()
        if preemption.should_stop(ctx):      # all ranks, every step
            checkpoints.save(step, state)     # all ranks
            checkpoints.close()               # all ranks: an asynchronous write must end before
            preemption.requeue(ctx)           # all ranks; rank 0 runs `scontrol requeue`, which ends the job
            return 0                          # exit 0: Slurm starts the job again, --resume auto
    preemption.close()

:class:`distrib.Run` does all of this at every step boundary.

Only ``SIGUSR2`` leads to a requeue; after ``SIGTERM`` (scancel, preemption by Slurm, which
requeues by itself when configured to) the run saves and exits without requeueing. A run that
fails (non-zero exit) is never requeued by this module. The number of requeues is capped by
``DISTRIB_MAX_REQUEUES`` (default 20) against ``SLURM_RESTART_COUNT``.

distrib never imports launch/, so the few SLURM variables needed here are read below rather
than through ``launch.slurm_env``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Callable, Dict, Mapping, Optional, Sequence


DEFAULT_MAX_REQUEUES = 20
REQUEUE_SIGNAL = signal.SIGUSR2

# Bit values summed over ranks: which kinds of signal any rank received.
_REQUEUE, _TERMINATE = 0, 1


def requeue_target(env: Mapping[str, str]) -> Optional[str]:
    """The id ``scontrol requeue`` needs: ``ARRAYJOB_TASK`` for an array task, else the job id.

    None outside a Slurm job.
    """
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def max_requeues(env: Mapping[str, str]) -> int:
    raw = env.get("DISTRIB_MAX_REQUEUES", str(DEFAULT_MAX_REQUEUES))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"DISTRIB_MAX_REQUEUES={raw!r} is not a count; set it to an integer >= 0")
    return value


def restart_count(env: Mapping[str, str]) -> int:
    raw = env.get("SLURM_RESTART_COUNT", "0") or "0"
    if not raw.isdigit():
        raise ValueError(f"SLURM_RESTART_COUNT={raw!r} is not a count (Slurm sets an integer >= 0)")
    return int(raw)


def _comm_sum(comm, values: Sequence[int]) -> Sequence[int]:
    import torch

    # One name per shape: [requeue, terminate] flags, or [1] for the barrier in requeue().
    total = comm.allreduce(torch.tensor(list(values), dtype=torch.int64), op="sum",
                           name=f"distrib.job.preemption.sum{len(values)}")
    return [int(v) for v in total.tolist()]


class PreemptionHandler:
    """Records SIGUSR2/SIGTERM; decides with the other ranks when to stop; requeues on rank 0.

    Create it in the main thread (Python only delivers signals there); ``close()`` (or leaving a
    ``with`` block) puts the previous handlers back.

    ``check_every``: run the agreement allreduce only every N calls of :meth:`should_stop`
    (one ~1 ms collective; N=1 stops at the first step boundary after the signal).
    ``env``, ``run`` and ``allreduce_sum`` are for tests: the environment to read, the function
    that runs ``scontrol``, and the cross-rank sum of a list of ints.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGUSR2, signal.SIGTERM), check_every: int = 1,
                 env: Optional[Mapping[str, str]] = None,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                 allreduce_sum: Optional[Callable[[Sequence[int]], Sequence[int]]] = None):
        if check_every < 1:
            raise ValueError(f"check_every={check_every} must be >= 1 (1: check at every step)")
        self._env = os.environ if env is None else env
        self._max_requeues = max_requeues(self._env)  # validate early, not at the end of a long run
        self._run = run
        self._allreduce_sum = allreduce_sum
        self._check_every = check_every
        self._calls = 0
        self._received: Dict[int, int] = {}   # signal number -> times received (on this rank)
        self._decision: Optional[str] = None  # None, "requeue" or "terminate" once agreed
        self._previous: Dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be created in the main thread "
                               "(Python delivers signals only there)")
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _sum(self, ctx, values: Sequence[int]) -> Sequence[int]:
        if self._allreduce_sum is not None:
            return self._allreduce_sum(values)
        return _comm_sum(ctx.comm, values)

    # Runs between two bytecodes of the main thread: only record, never do I/O or collectives.
    def _on_signal(self, signum, frame) -> None:
        self._received[signum] = self._received.get(signum, 0) + 1

    @property
    def signal_received(self) -> bool:
        """True once this rank received a signal (the ranks may not agree yet)."""
        return bool(self._received)

    @property
    def decision(self) -> Optional[str]:
        """``"requeue"`` (SIGUSR2), ``"terminate"`` (SIGTERM) once the ranks agreed to stop, else None."""
        return self._decision

    def should_stop(self, ctx) -> bool:
        """Whether all ranks should stop now (checkpoint, then :meth:`requeue`).

        Must be called on all processes at the same step boundaries: every ``check_every``-th
        call is an allreduce, and all ranks get the same answer.
        """
        if self._decision is not None:
            return True
        self._calls += 1
        if self._calls % self._check_every:
            return False
        local = [0, 0]
        for sig in self._received:
            local[_REQUEUE if sig == REQUEUE_SIGNAL else _TERMINATE] = 1
        if getattr(ctx, "size", 1) > 1:
            total = self._sum(ctx, local)
        else:
            total = local
        if total[_TERMINATE]:   # a SIGTERM anywhere: the job is going away, do not requeue it
            self._decision = "terminate"
        elif total[_REQUEUE]:
            self._decision = "requeue"
        return self._decision is not None

    def requeue(self, ctx) -> bool:
        """Requeue this Slurm job after a SIGUSR2; returns True when ``scontrol requeue`` succeeded.

        Must be called on all processes after the checkpoint was saved: it starts with a
        barrier so that rank 0 requeues (and Slurm kills the job) only once every rank has
        finished saving. Only rank 0 runs ``scontrol``; other ranks return False. Does nothing
        (False, with a message) after SIGTERM, outside Slurm, or when the requeue budget
        ``DISTRIB_MAX_REQUEUES`` is spent. Also restores the previous signal handlers.
        """
        size = getattr(ctx, "size", 1)
        if size > 1:
            # Barrier: every rank has returned from its checkpoint save before the requeue kills the job.
            self._sum(ctx, [1])
        self.close()
        if getattr(ctx, "rank", 0) != 0:
            return False
        if self._decision != "requeue":
            _say(f"stopping without requeue (decision: {self._decision or 'no signal'})")
            return False
        target = requeue_target(self._env)
        if target is None:
            _say("SIGUSR2 received outside a Slurm job (no SLURM_JOB_ID): checkpoint saved, not requeuing")
            return False
        restarts = restart_count(self._env)
        if restarts >= self._max_requeues:
            _say(f"job {target} was already requeued {restarts} times (DISTRIB_MAX_REQUEUES="
                 f"{self._max_requeues}): not requeuing again; resubmit it to continue")
            return False
        proc = self._run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            _say(f"`scontrol requeue {target}` failed (exit {proc.returncode}): "
                 f"{(proc.stderr or proc.stdout or '').strip()}; resubmit the job to continue")
            return False
        _say(f"requeued job {target} (restart {restarts + 1} of at most {self._max_requeues})")
        return True

    def close(self) -> None:
        """Put back the signal handlers that were installed before this object (idempotent)."""
        while self._previous:
            sig, previous = self._previous.popitem()
            signal.signal(sig, previous)

    def __enter__(self) -> "PreemptionHandler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _say(message: str) -> None:
    print(f"[distrib.job.preemption] {message}", file=sys.stderr, flush=True)
