"""The step: what runs inside every training step, on every rank.

``optim`` (``wrap()`` -> :class:`DistributedOptimizer`, and the plain data-parallel update),
``gradients`` (one step's gradient traffic as a state machine), ``reducers`` (how gradients
travel: flat buckets or one allreduce per tensor), ``broadcast`` (rank 0's training state on
every rank), ``buffers`` and ``sync_batchnorm`` (buffers and BatchNorm statistics over the
world). ZeRO (:mod:`distrib.sharding`) and PowerSGD (:mod:`distrib.compression`) are other
parts the optimizer composes, chosen before the gradient exchange is built.
"""
