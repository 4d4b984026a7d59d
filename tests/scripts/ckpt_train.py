"""A tiny char-GPT training run with async checkpoints, for tests/test_checkpoint_kill.py.

Every piece of state a resume must restore is exercised: dropout (per-rank torch RNG), a
shuffled sharded loader, AdamW moments, an LR schedule, and python/numpy RNG draws folded
into the "extra" state. Rank 0 prints ``step N`` after each step and writes every rank's
final parameters to --out (atomically) when the run is complete. It also prints
``resumed from S params D`` after the restore (S = 0 when it started over) and ``params N D``
at every checkpoint step, D a digest of the model's parameters: the step a resume started from,
and whether it got the parameters the run had at that step.
"""
import argparse
import hashlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
import distrib  # noqa: E402
from distrib.checkpoint import CheckpointManager  # noqa: E402
from distrib.rng import rng_state, seed_everything  # noqa: E402
from lm_model import GPT, CharDataset, CharTokenizer, GPTConfig, load_corpus  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--run-dir", required=True)
p.add_argument("--steps", type=int, default=60)
p.add_argument("--every", type=int, default=4)
p.add_argument("--resume", default="auto")
p.add_argument("--sync", action="store_true")
p.add_argument("--out", required=True)
args = p.parse_args()

ctx = distrib.init(seed=0)
text = load_corpus()[:12000]
tokenizer = CharTokenizer.from_text(text)
config = GPTConfig(vocab=tokenizer.vocab, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
model = GPT(config)
optimizer = distrib.wrap(model, torch.optim.AdamW(model.parameters(), lr=3e-3), ctx)
schedule = distrib.LRSchedule(optimizer, base_lr=3e-3, world_size=ctx.size, total_steps=args.steps,
                              warmup_steps=5)
ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
loader = distrib.ShardedLoader(CharDataset(ids, config.block_size, 8), 8, ctx, seed=3)
seed_everything(1000 + ctx.rank)  # per-rank dropout masks: each rank's RNG must come back
extra = {"noise": 0.0}
state = {"model": model, "optimizer": optimizer, "scheduler": schedule, "loader": loader, "extra": extra}

ckpt = CheckpointManager(args.run_dir, ctx, keep=2, async_save=not args.sync)
step = ckpt.restore(state, resume=args.resume, model_config=config.to_dict()) or 0


def digest(model) -> str:
    return hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()


if ctx.rank == 0:
    print(f"resumed from {step} params {digest(model)}", flush=True)
batches = loader.forever()
while step < args.steps:
    x, y = next(batches)
    loss = model.train()(x, y)
    optimizer.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    schedule.step()
    # python + numpy RNG draws, summed over ranks so that "extra" stays replicated
    draw = torch.tensor([random.random() + float(np.random.rand())], dtype=torch.float64)
    extra["noise"] += float(ctx.comm.allreduce(draw, op="sum", name="noise"))
    step += 1
    if ctx.rank == 0:
        print(f"step {step}", flush=True)
    if step % args.every == 0 or step == args.steps:
        if ctx.rank == 0:
            print(f"params {step} {digest(model)}", flush=True)
        ckpt.save(step, state, model_config=config.to_dict())
ckpt.close()

everyone = ctx.comm.allgather_object({"params": {k: v.clone() for k, v in model.state_dict().items()},
                                 "noise": extra["noise"], "rank": ctx.rank, "rng": rng_state()}, name="final")
if ctx.rank == 0:
    tmp = Path(args.out + ".tmp")
    torch.save({"ranks": everyone, "step": step}, tmp)
    os.replace(tmp, args.out)
    print("done", flush=True)
