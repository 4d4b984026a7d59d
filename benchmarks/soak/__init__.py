"""The churn soak (``make soak``): the example LM trained on the 3-host namespace cluster while
workers and whole hosts are killed on a schedule, elastic and in restart mode, against a
failure-free run of the same job in the same invocation. Not part of ``make bench`` (it takes
about 30 minutes at its defaults); ``python -m benchmarks.soak --help`` for the lengths.
"""
