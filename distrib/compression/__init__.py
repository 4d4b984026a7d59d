"""Gradient compression beyond fp16 on the wire: PowerSGD's low-rank averaging
(``distrib.wrap(..., compression="powersgd", powersgd=distrib.PowerSGD(rank=4))``).

``powersgd``: the algorithm, pure tensor math on one process; ``reducer``: the reducer that
runs it over Horovod behind :class:`distrib.step.optim.DistributedOptimizer`.
"""
from distrib.compression.powersgd import PowerSGD

__all__ = ["PowerSGD"]
