"""The phases of a training step's time breakdown: the one list, in display order.

:class:`distrib.watch.metrics.NestedPhaseTimer` times them (``perf_counter``, no device synchronisation),
``metrics.jsonl`` carries them as ``t_<phase>`` (plus ``t_other``: the rest of the step), and
``python -m distrib.report`` reads them back.
"""
PHASES = ("data", "compute", "allreduce", "optimizer", "checkpoint")
