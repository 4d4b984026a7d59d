"""The soak's trainer: the example LM (examples/lm_model.py, a tiny size) on ``distrib.Run``.

Runs unchanged under ``python -m launch --elastic`` and ``--max-restarts`` and trains until it is
stopped. Every rank appends three kinds of lines to OUT/steps.<host>.<pid>.log:

    P time phase                          start-up: started (before the imports), imported,
                                          joined (distrib.init() returned), ready (before the first step)
    B time step epoch rank size samples   before the step's backward: the samples it trains on
    E time step rank size                 after the optimizer step: the step is done

The B line is written before the step's gradients can reach the allreduce, so every sample a
kept step trained on is on record, whatever instant a kill lands at (a line after the step could
be lost with a rank killed between its allreduce and its write). Which records the final state
kept is worked out afterwards (benchmarks/soak/accounting.py): a rolled-back or restarted run
trains the same step numbers again, later.
"""
from __future__ import annotations

import time

STARTED = time.time()  # before the imports: a joining worker's start-up is part of a rejoin's cost

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
import distrib  # noqa: E402
from lm_model import CharDataset, CharTokenizer, GPT, GPTConfig, load_corpus  # noqa: E402


class Indexed(torch.utils.data.Dataset):
    """Each item with its index, so a step can say which samples it trained on."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return x, y, i


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True, help="a folder every host sees")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--every", type=int, default=10, help="steps between elastic commits and checkpoints")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of other work per step")
    p.add_argument("--seed", type=int, default=3)
    return p.parse_args()


def dataset(block_size: int):
    """The whole shipped corpus in overlapping windows, each item with its index; and the tokenizer."""
    text = load_corpus()
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return Indexed(CharDataset(ids, block_size, block_size // 2)), tokenizer


def main():
    phases = [("started", STARTED), ("imported", time.time())]
    args = parse_args()
    ctx = distrib.init(seed=args.seed)
    phases.append(("joined", time.time()))
    data, tokenizer = dataset(args.block_size)
    config = GPTConfig(vocab=tokenizer.vocab, block_size=args.block_size, n_layer=1, n_head=2, n_embd=32,
                       dropout=0.0)
    torch.manual_seed(args.seed)
    model = GPT(config)
    optimizer = distrib.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-3), ctx)
    loader = distrib.ShardedLoader(data, args.batch_size, ctx, seed=args.seed)
    schedule = distrib.LRSchedule(optimizer, base_lr=1e-3, world_size=ctx.size, decay="constant")
    run = distrib.Run(ctx, args.out / "run", model=model, optimizer=optimizer, loader=loader, schedule=schedule,
                      checkpoint_every=args.every, commit_every=args.every, log_every=50,
                      model_config=config.to_dict(), seed=args.seed, preemption=False)
    log = open(args.out / f"steps.{socket.gethostname()}.{os.getpid()}.log", "a", buffering=1)
    for phase, t in phases + [("ready", time.time())]:
        log.write(f"P {t:.6f} {phase}\n")
    for step, (x, y, index) in run.steps(10 ** 9):
        world = f"{run.ctx.rank} {run.ctx.size}"
        log.write(f"B {time.time():.6f} {step} {run.epoch} {world} {','.join(map(str, index.tolist()))}\n")
        optimizer.backward(model(x, y))
        optimizer.step()
        optimizer.zero_grad()
        log.write(f"E {time.time():.6f} {step} {world}\n")
        if args.step_sleep:
            time.sleep(args.step_sleep)


if __name__ == "__main__":
    main()
