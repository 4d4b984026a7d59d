"""A steady training loop that logs every completed step, for the recovery benchmark.

    --mode elastic   distrib.elastic (python -m launch --elastic): survivors roll back and go on
    --mode horovod   plain Horovod Elastic (hvd.elastic.TorchState, horovodrun --min-np/--max-np)
    --mode restart   distrib + CheckpointManager (python -m launch --max-restarts): resume
    --mode ddp       torch DDP + torch.save checkpoints (torchrun, elastic or --max-restarts): resume

Every rank appends ``time step rank size generation pid`` to OUT/steps.log after each step
(``generation``: the launcher's restart count, or for elastic the number of times this process
entered the training function), so the harness sees when training went on after a kill.
Runs until killed; --step-sleep paces the steps so that they are a known, steady length.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["elastic", "horovod", "restart", "ddp"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--every", type=int, default=5, help="steps between commits / checkpoints")
    p.add_argument("--step-sleep", type=float, default=0.05)
    return p.parse_args()


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    return model, torch.randn(32, 256)


def log_step(out: Path, step: int, rank: int, size: int, generation: int) -> None:
    with open(out / "steps.log", "a") as f:  # O_APPEND: whole short lines from every process
        f.write(f"{time.time():.6f} {step} {rank} {size} {generation} {os.getpid()}\n")


def train_forever(model, opt, x, step: int, step_sleep: float, after_step) -> None:
    """Paced steps until killed; ``after_step(step)`` checkpoints and logs."""
    while True:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        step += 1
        time.sleep(step_sleep)
        after_step(step)


def run_ddp(args):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model, x = model_and_batch()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    ckpt, step = args.out / "ddp.pt", 0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step = saved["step"]
    generation = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def after_step(step):
        if step % args.every == 0 and rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, ckpt)
        log_step(args.out, step, rank, size, generation)
    train_forever(ddp, opt, x, step, args.step_sleep, after_step)


def run_restart(args):
    import distrib
    from distrib.checkpoint import CheckpointManager
    ctx = distrib.init()
    model, x = model_and_batch()
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=1e-3), ctx)
    ckpts = CheckpointManager(args.out / "run", ctx, keep=2, async_save=False)
    saved = {"model": model, "optimizer": opt}
    step = ckpts.restore(saved) or 0
    generation = int(os.environ.get("DISTRIB_RESTART_COUNT", "0"))

    def after_step(step):
        if step % args.every == 0:
            ckpts.save(step, saved)
        log_step(args.out, step, ctx.rank, ctx.size, generation)
    train_forever(model, opt, x, step, args.step_sleep, after_step)


def elastic_steps(args, model, opt, x, state, world, entered: int) -> None:
    """The loop inside an elastic retry wrapper; ``world()`` is the current (rank, size)."""
    while True:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        state.step += 1
        time.sleep(args.step_sleep)
        if state.step % args.every == 0:
            state.commit()
        log_step(args.out, state.step, *world(), entered)


def run_elastic(args):
    import distrib
    import distrib.elastic
    ctx = distrib.init()
    model, x = model_and_batch()
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=1e-3), ctx)
    state = distrib.elastic.ElasticState(ctx, model=model, optimizer=opt)
    entered = [0]

    @distrib.elastic.run
    def train(state):
        entered[0] += 1
        elastic_steps(args, model, opt, x, state, lambda: (state.ctx.rank, state.ctx.size), entered[0])

    train(state)


def run_horovod(args):
    """Horovod Elastic as its documentation shows it, without distrib."""
    import horovod.torch as hvd
    hvd.init()
    model, x = model_and_batch()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                   named_parameters=model.named_parameters())
    state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0)
    entered = [0]

    @hvd.elastic.run
    def train(state):
        entered[0] += 1
        elastic_steps(args, model, opt, x, state, lambda: (hvd.rank(), hvd.size()), entered[0])

    train(state)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    {"ddp": run_ddp, "restart": run_restart, "elastic": run_elastic, "horovod": run_horovod}[args.mode](args)


if __name__ == "__main__":
    main()
