"""Watching a job: what a run reports about itself, to its files and to the launcher.

``metrics`` (``metrics.jsonl``, the step-time breakdown), ``timing`` (the phases of a step),
``progress`` (the progress line), ``log`` (rank-0 printing and logging), ``heartbeat`` (progress
and the collective each rank is in, for the launcher's hang, mismatch and straggler checks),
``crash_record`` (the exception that killed a worker). ``python -m distrib.report`` reads the
metrics back; it stays at the top level because users call it by that name.
"""
