"""distrib's benchmark harness: ``python -m benchmarks`` (``make bench``).

Every figure is a ratio to a reference measured side by side in the same run (A and B
alternated over several rounds), reported as the median over rounds with its min-max spread.
Sections live in :mod:`benchmarks.registry`.
"""
