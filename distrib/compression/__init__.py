"""Gradient compression beyond fp16 on the wire: PowerSGD's low-rank averaging
(``distrib.wrap(..., compression="powersgd", powersgd=distrib.PowerSGD(rank=4))``).

``powersgd``: the algorithm, pure tensor math on one process; ``reducer``: the reducer that
runs it over Horovod behind :class:`distrib.step.optim.DistributedOptimizer`; ``local_sgd``: local
steps with an average every H steps through an outer optimizer (local SGD, DiLoCo:
``distrib.wrap(..., local_sgd=distrib.LocalSGD(every=H))``).
"""
from distrib.compression.local_sgd import LocalSGD
from distrib.compression.powersgd import PowerSGD

__all__ = ["LocalSGD", "PowerSGD"]
