"""Multi-rank CheckpointManager behaviour under real Horovod, for tests/test_checkpoint_multirank.py.

--phase save (2 workers): per-rank RNG round trip, rank 0's fallback choice obeyed by all
ranks, config mismatch and write failures raised on every rank; ends with a good checkpoint
and each rank's post-save draws in OUT/rank-R.json.
--phase resume (any number of workers): restores that checkpoint and checks the draws.
"""
import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

import distrib
from distrib.checkpoint import CheckpointError, CheckpointManager, store
from distrib.rng import seed_everything

p = argparse.ArgumentParser()
p.add_argument("--phase", choices=["save", "resume"], required=True)
p.add_argument("--run-dir", required=True)
p.add_argument("--out", required=True)
args = p.parse_args()
out = Path(args.out)
out.mkdir(exist_ok=True)

ctx = distrib.init(seed=0)
CFG = {"hidden": 8}
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
optimizer = distrib.wrap(model, torch.optim.AdamW(model.parameters(), lr=0.01), ctx)
state = {"model": model, "optimizer": optimizer, "extra": {"note": "x"}}
seed_everything(100 + ctx.rank)


def draws():
    return [random.random(), float(np.random.rand()), torch.rand(2).tolist()]


def train_step():
    optimizer.backward(model(torch.randn(4, 4)).pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()


def barrier(name):
    ctx.comm.barrier(name=name)


def raises_everywhere(fn, match):
    try:
        fn()
    except CheckpointError as exc:
        assert match in str(exc), exc
        return
    raise AssertionError(f"rank {ctx.rank}: no CheckpointError ({match})")


if args.phase == "save":
    ckpt = CheckpointManager(args.run_dir, ctx, keep=3, async_save=True)
    assert ckpt.restore(state, model_config=CFG) is None
    train_step()
    ckpt.save(1, state, model_config=CFG)
    after_1 = draws()
    params_1 = {k: v.clone() for k, v in model.state_dict().items()}
    train_step()
    ckpt.save(2, state, model_config=CFG)
    ckpt.wait()
    if ctx.rank == 0:
        f = Path(args.run_dir) / "checkpoints" / "step-00000002" / store.STATE_FILE
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    barrier("damaged")  # rank 1 must not look before rank 0 has damaged the newest checkpoint
    assert ckpt.restore(state, model_config=CFG) == 1
    assert draws() == after_1, f"rank {ctx.rank}: RNG not restored"
    assert all(torch.equal(v, params_1[k]) for k, v in model.state_dict().items())
    every = ctx.comm.allgather_object(after_1, name="draws")
    assert every[0] != every[1], "ranks had different RNG streams; the checkpoint must keep both"

    raises_everywhere(lambda: ckpt.restore(state, model_config={"hidden": 16}),
                      "was saved with model config hidden=8, this run has hidden=16")

    real_write = store.write_checkpoint
    if ctx.rank == 0:
        def broken(*a, **k):
            raise CheckpointError("cannot write checkpoint to X: simulated failure")
        store.write_checkpoint = broken
    ckpt.save(3, state, model_config=CFG)  # async: fails in rank 0's background thread
    raises_everywhere(lambda: ckpt.save(4, state, model_config=CFG), "simulated failure")
    sync = CheckpointManager(args.run_dir, ctx, keep=3, async_save=False)
    raises_everywhere(lambda: sync.save(4, state, model_config=CFG), "simulated failure")
    store.write_checkpoint = real_write

    sync.save(5, state, model_config=CFG)
    (out / f"rank-{ctx.rank}.json").write_text(json.dumps(draws()))
    sync.close()
    ckpt.close()
else:
    ckpt = CheckpointManager(args.run_dir, ctx, keep=3, seed=11)
    assert ckpt.restore(state, model_config=CFG) == 5
    got = draws()
    saved = out / f"rank-{ctx.rank}.json"
    if saved.exists():
        assert got == json.loads(saved.read_text()), f"rank {ctx.rank}: RNG not restored"
    else:  # a rank the saved run did not have: derived, and not a copy of another rank's
        assert got not in [json.loads(f.read_text()) for f in out.glob("rank-*.json")]
    ckpt.close()
print(f"OK rank {ctx.rank} of {ctx.size} phase {args.phase}", flush=True)
