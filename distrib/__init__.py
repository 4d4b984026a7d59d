"""distrib: data-parallel PyTorch training on Horovod or torch.distributed (``distrib.init(engine=...)``).

    ctx = distrib.init()
    opt = distrib.wrap(model, torch.optim.AdamW(model.parameters()), ctx)
    loader = distrib.ShardedLoader(dataset, batch_size, ctx, seed=0)
    run = distrib.Run(ctx, "runs/x", model=model, optimizer=opt, loader=loader)  # resume, checkpoints...
    for step, batch in run.steps(1000): ...

Everything a training script needs is exported here (and ``distrib.ElasticState``, imported on
first use because it needs Horovod's elastic module); the submodules are implementation.
"""
from distrib._version import __version__
from distrib.context import Context, DistribSetupError, init
from distrib.checkpoint import CheckpointError, CheckpointManager
from distrib.comm import Comm, LocalComm
from distrib.compression import LocalSGD, PowerSGD
from distrib.data import ShardedLoader, eval_loader, eval_shard
from distrib.evaluate import evaluate, weighted_mean
from distrib.watch.metrics import MetricsLogger, read_metrics
from distrib.job.preemption import PreemptionHandler
from distrib.job.run import Run
from distrib.watch.log import get_logger, rank0_print
from distrib.step.optim import DistributedOptimizer, wrap
from distrib.job.schedule import LRSchedule, scaled_lr
from distrib.step.sync_batchnorm import SyncBatchNorm
from distrib.job.user_state import RankState, UserState, split_concat

__all__ = ["Context", "DistribSetupError", "init", "ShardedLoader", "DistributedOptimizer", "wrap", "SyncBatchNorm",
           "LRSchedule", "scaled_lr", "PowerSGD", "LocalSGD", "rank0_print", "get_logger",
           "Run", "CheckpointManager", "CheckpointError", "Comm", "LocalComm", "MetricsLogger", "read_metrics",
           "PreemptionHandler", "evaluate", "weighted_mean", "eval_loader", "eval_shard", "UserState", "RankState",
           "split_concat"]


def __getattr__(name):
    # ElasticState imports Horovod's elastic module: only when asked for, so that `import distrib`
    # works (and reports a broken Horovod in one line at init()) without it.
    if name == "ElasticState":
        from distrib.elastic import ElasticState
        return ElasticState
    raise AttributeError(f"module 'distrib' has no attribute {name!r}")
