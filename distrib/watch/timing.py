"""The phases of a training step's time breakdown: the one list, in display order.

:class:`distrib.watch.metrics.NestedPhaseTimer` times them (``perf_counter``, no device synchronisation),
``metrics.jsonl`` carries them as ``t_<phase>`` (plus ``t_other``: the rest of the step), and
``python -m distrib.report`` reads them back. :func:`time_optimizer` charges an optimizer's step
to them without touching its methods.
"""
from typing import Callable, ContextManager

from distrib.step.optim import DistributedOptimizer

PHASES = ("data", "compute", "allreduce", "optimizer", "checkpoint")


def time_optimizer(optimizer, phase: Callable[[str], ContextManager]) -> Callable[[], None]:
    """Charge the optimizer's step to ``phase("optimizer")`` (and a wrapped optimizer's gradient
    wait to ``phase("allreduce")``) without touching its methods; returns the undo. A plain torch
    optimizer (a world of one) is timed with torch's own step hooks."""
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.time_phases(phase)
        return lambda: optimizer.time_phases(None)
    open_phases = []

    def enter(*_):
        timing = phase("optimizer")
        timing.__enter__()
        open_phases.append(timing)

    def leave(*_):
        open_phases.pop().__exit__(None, None, None)
    hooks = [optimizer.register_step_pre_hook(enter), optimizer.register_step_post_hook(leave)]
    return lambda: [hook.remove() for hook in hooks] and None

