"""distrib: data-parallel PyTorch training on Horovod.

    ctx = distrib.init()
    opt = distrib.wrap(model, torch.optim.AdamW(model.parameters()), ctx)
    loader = distrib.ShardedLoader(dataset, batch_size, ctx, seed=0)
"""
from distrib._version import __version__
from distrib.context import Context, DistribSetupError, init
from distrib.data import ShardedLoader
from distrib.log import get_logger, rank0_print
from distrib.optim import DistributedOptimizer, wrap
from distrib.schedule import LRSchedule, scaled_lr

__all__ = ["Context", "DistribSetupError", "init", "ShardedLoader", "DistributedOptimizer", "wrap",
           "LRSchedule", "scaled_lr", "rank0_print", "get_logger"]
