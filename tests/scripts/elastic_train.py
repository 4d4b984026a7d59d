"""One epoch of elastic training that records which samples each committed step trained on.

Fault injection for tests: --fail-at-step K makes the worker holding rank --fail-rank die at
step K (--fail-mode kill: SIGKILL to itself; exception: a Python error), once per run
(a marker file in --out stops the restarted world from failing again). Every commit, rank 0
appends the samples of every rank since the previous commit to OUT/indices.<pid>.txt; rolled-back
steps are never written, so the files hold each sample the final model trained on.

Rank 0 records the whole world's samples (gathered each step) rather than each rank its own: a
worker killed after its gradients went into a step's allreduce but before it wrote its samples
would leave samples the model did train on unrecorded, since the survivors' commit keeps that step.
Rank 0 also appends each committed step's samples, per rank, to OUT/steps.<pid>.jsonl: with the
float64 model, a test replays them in one plain torch process and must end with the same parameters.
"""
import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch

import distrib
import distrib.elastic

p = argparse.ArgumentParser()
p.add_argument("--out", type=Path, required=True)
p.add_argument("--samples", type=int, default=192)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--commit-every", type=int, default=2)
p.add_argument("--fail-at-step", type=int, default=-1)
p.add_argument("--fail-rank", type=int, default=1)
p.add_argument("--fail-mode", choices=["kill", "exception"], default="kill")
p.add_argument("--step-sleep", type=float, default=0.0, help="slow each step down (seconds)")
p.add_argument("--wait-for-size", type=int, default=0, help="keep training slowly until the world has this size")
args = p.parse_args()

ctx = distrib.init(seed=0)
hvd = distrib.context.import_horovod()
torch.manual_seed(0)
# float64: the parameters a plain torch replay of the committed steps computes differ by rounding only
data = torch.utils.data.TensorDataset(torch.arange(args.samples, dtype=torch.float64).unsqueeze(1) / args.samples,
                                      torch.arange(args.samples))
model = torch.nn.Linear(1, 1).double()
optimizer = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=1e-4), ctx)
loader = distrib.ShardedLoader(data, args.batch_size, ctx, seed=5)
schedule = distrib.LRSchedule(optimizer, base_lr=1e-4, world_size=ctx.size, total_steps=1000)
state = distrib.elastic.ElasticState(ctx, model=model, optimizer=optimizer, loader=loader, schedule=schedule)
pending = []  # (step, the samples of every rank in rank order) for each step since the last commit
failed_marker = args.out / "failed-once"
sizes_seen = args.out / f"sizes.{os.getpid()}.txt"  # step, rank, size, torch threads: one line per attempt


def commit(state):
    if state.ctx.rank == 0:
        with open(args.out / f"indices.{os.getpid()}.txt", "a") as f:
            f.write("".join(f"{i}\n" for _, ranks in pending for samples in ranks for i in samples))
        with open(args.out / f"steps.{os.getpid()}.jsonl", "a") as f:
            f.write("".join(json.dumps({"step": step, "samples": ranks}) + "\n" for step, ranks in pending))
    pending.clear()
    state.commit()


@distrib.elastic.run
def train(state):
    pending.clear()  # a restore rolled the uncommitted steps back
    with open(sizes_seen, "a") as f:
        f.write(f"{state.step} {state.ctx.rank} {state.ctx.size} {torch.get_num_threads()}\n")
    for x, index in loader:
        if state.step == args.fail_at_step and state.ctx.rank == args.fail_rank and not failed_marker.exists():
            failed_marker.write_text(str(os.getpid()))
            if args.fail_mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        state.step += 1
        pending.append((state.step, hvd.allgather_object(index.tolist(), name="elastic_train.samples")))
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if state.step % args.commit_every == 0:
            commit(state)
        if args.wait_for_size and state.ctx.size < args.wait_for_size:
            time.sleep(0.5)
    commit(state)


train(state)
params = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
with open(args.out / f"final.{os.getpid()}.json", "w") as f:
    json.dump({"rank": state.ctx.rank, "size": state.ctx.size, "step": state.step, "params": params,
               "epoch": loader.epoch, "lr": schedule.lr}, f)
