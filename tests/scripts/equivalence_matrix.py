"""distrib on N workers against plain single-process torch on the same global batch, case by case.

Used by tests/test_equivalence_matrix.py. Every rank trains each case with distrib.wrap on its
shard of every micro-batch, and also computes the reference: the same model, optimizer and
schedule in plain torch (no distrib, no Horovod) on the whole global batch of the step, in one
backward pass. Float64 throughout, one intra-op thread, so the only difference left is the
order of floating-point sums. Rank 0 writes, per case, the largest difference to the reference
and between ranks (or the error the case raised), plus the results of the API checks, as JSON.
"""
import argparse
import json
import os
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import distrib
from distrib.evaluate import weighted_mean

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--cases", default="all")
p.add_argument("--no-checks", action="store_true", help="only the cases (to run them one by one on other code)")
args = p.parse_args()

ctx = distrib.init(seed=0)
comm = ctx.comm  # the engine the run was started on: Horovod or torch.distributed
# Before anything else draws: each rank's own stream (checked below against plain torch).
first_draws = torch.rand(4)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
N, B, STEPS = ctx.size, 4, 4  # workers, samples per worker per micro-batch, steps


@dataclass(frozen=True)
class Case:
    optimizer: str = "sgd"          # sgd (momentum 0.9, weight decay) or adamw (weight decay)
    accumulate: int = 1
    synchronize: bool = False       # call optimizer.synchronize() before step()
    max_grad_norm: Optional[float] = None
    compression: str = "none"
    model: str = "mlp"              # mlp | partial (a head only some samples use) | never (a head no one uses)
    #                                 | bn (SyncBatchNorm vs BatchNorm on the global batch) | extra (a parameter outside the model)
    freeze_at: Optional[int] = None  # step at which the first layer's bias is frozen (after wrap)
    scheduler: Optional[str] = None  # onecycle | cosine | lambda
    two_models: bool = False        # a second model and optimizer wrapped in the same process
    two_losses: bool = False        # two backward passes per micro-batch (no_sync for the first)
    reducer: str = "auto"


CASES = {
    **{f"{o}-acc{k}-{'sync' if s else 'nosync'}": Case(optimizer=o, accumulate=k, synchronize=s)
       for o in ("sgd", "adamw") for k in (1, 3) for s in (False, True)},
    "adamw-clip-acc3-sync": Case(optimizer="adamw", accumulate=3, synchronize=True, max_grad_norm=0.05),
    "sgd-fp16-compression": Case(compression="fp16"),
    "adamw-unused-on-some-ranks-acc3": Case(optimizer="adamw", accumulate=3, model="partial"),
    "adamw-unused-on-every-rank": Case(optimizer="adamw", model="never"),
    "sgd-unused-on-every-rank-per-parameter": Case(model="never", reducer="per-parameter"),
    "sgd-frozen-after-wrap": Case(freeze_at=2),
    "adamw-frozen-after-wrap-sync": Case(optimizer="adamw", freeze_at=2, synchronize=True),
    "sgd-syncbatchnorm": Case(model="bn"),
    "adamw-parameter-outside-the-model": Case(optimizer="adamw", model="extra"),
    "two-models-one-process": Case(two_models=True, accumulate=2),
    "two-losses-no-sync": Case(optimizer="adamw", two_losses=True),
    "adamw-onecycle": Case(optimizer="adamw", scheduler="onecycle"),
    "sgd-cosine": Case(scheduler="cosine", accumulate=3),
    "adamw-lambda": Case(optimizer="adamw", scheduler="lambda", synchronize=True),
}


class Net(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        if kind == "bn":
            self.body.insert(1, torch.nn.BatchNorm1d(16))
        if kind in ("partial", "never"):
            self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        out = self.body(x)
        if self.kind == "partial":
            used = x[:, 7] > 0  # only the samples flagged in the data take this branch
            if used.any():
                out = out + used[:, None].to(x.dtype) * self.head(x)
        return out


def make_data(case: Case):
    """The whole run's samples: step s, micro-batch j, rank r -> a block of B rows."""
    gen = torch.Generator().manual_seed(7)
    rows = STEPS * case.accumulate * N * B
    x, y = torch.randn(rows, 8, generator=gen), torch.randn(rows, 1, generator=gen)
    if case.model == "partial":
        x[:, 7] = -1.0
        for s in range(STEPS):  # rank 0's shard of micro-batch 0 of every step, nothing else
            start = s * case.accumulate * N * B
            x[start:start + B, 7] = 1.0
    return x, y


def shard(data, case: Case, step: int, micro: int, rank: int):
    start = ((step * case.accumulate + micro) * N + rank) * B
    return tuple(t[start:start + B] for t in data)


def global_batch(data, case: Case, step: int):
    size = case.accumulate * N * B
    return tuple(t[step * size:(step + 1) * size] for t in data)


def build(case: Case, seed: int, distributed: bool):
    torch.manual_seed(seed)
    model = Net(case.model)
    extra = torch.nn.Parameter(torch.tensor([0.5])) if case.model == "extra" else None
    if distributed and ctx.rank != 0:  # another init: wrap's broadcast must erase it
        with torch.no_grad():
            for q in list(model.parameters()) + ([extra] if extra is not None else []):
                q.add_(torch.randn_like(q))
    if distributed and case.model == "bn":
        model = distrib.SyncBatchNorm.convert(model)
    params = list(model.parameters()) + ([extra] if extra is not None else [])
    if case.optimizer == "sgd":
        inner = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        inner = torch.optim.AdamW(params, lr=0.01, weight_decay=0.5)
    return model, extra, inner


def loss_of(model, extra, x, y):
    out = model(x)
    if extra is not None:
        out = out * extra
    return F.mse_loss(out, y)


def scheduler_for(case: Case, opt):
    if case.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)
    if case.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    if case.scheduler == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return None


def snapshot(model, extra):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if extra is not None:
        state["extra"] = extra.detach().clone()
    return state


def train(case: Case, distributed: bool, seed: int = 1234):
    data = make_data(case)
    model, extra, inner = build(case, seed, distributed)
    opt = (distrib.wrap(model, inner, ctx, accumulate=case.accumulate, max_grad_norm=case.max_grad_norm,
                        compression=case.compression) if distributed else inner)
    schedule = scheduler_for(case, opt)
    if distributed and schedule is not None:
        opt.load_state_dict(opt.state_dict())  # as a resume does: the schedule must still drive the steps
    for step in range(STEPS):
        if case.freeze_at == step:
            model.body[0].bias.requires_grad_(False)
        if distributed:
            for micro in range(case.accumulate):
                x, y = shard(data, case, step, micro, ctx.rank)
                if case.two_losses:
                    out = model(x)
                    with opt.no_sync():
                        opt.backward(F.mse_loss(out, y), retain_graph=True)
                    opt.backward(0.1 * out.pow(2).mean())
                else:
                    opt.backward(loss_of(model, extra, x, y))
            if case.synchronize:
                opt.synchronize()
            opt.step()
            opt.zero_grad()
        else:
            x, y = global_batch(data, case, step)
            if case.two_losses:
                out = model(x)
                (F.mse_loss(out, y) + 0.1 * out.pow(2).mean()).backward()
            else:
                loss_of(model, extra, x, y).backward()
            if case.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([q for q in inner.param_groups[0]["params"]], case.max_grad_norm)
            inner.step()
            inner.zero_grad()
        if schedule is not None:
            schedule.step()
    return snapshot(model, extra)


def train_two_models(case: Case, distributed: bool):
    """Two models, two optimizers (SGD and AdamW), backward of both before either steps."""
    data = make_data(case)
    sgd_case, adamw_case = Case(accumulate=case.accumulate), Case(optimizer="adamw", accumulate=case.accumulate)
    (m1, _, o1), (m2, _, o2) = build(sgd_case, 1, distributed), build(adamw_case, 2, distributed)
    if distributed:
        o1 = distrib.wrap(m1, o1, ctx, accumulate=case.accumulate)
        o2 = distrib.wrap(m2, o2, ctx, accumulate=case.accumulate)
    for step in range(STEPS):
        micro_batches = ([shard(data, case, step, j, ctx.rank) for j in range(case.accumulate)] if distributed
                         else [global_batch(data, case, step)])
        for x, y in micro_batches:
            F.mse_loss(m1(x), y).backward()
            F.mse_loss(m2(x), y).backward()
        for opt in (o1, o2):
            opt.step()
            opt.zero_grad()
    return {**{f"a.{k}": v for k, v in snapshot(m1, None).items()},
            **{f"b.{k}": v for k, v in snapshot(m2, None).items()}}


def initial_state(case: Case):
    if case.two_models:
        (m1, _, _), (m2, _, _) = build(Case(), 1, False), build(Case(optimizer="adamw"), 2, False)
        return {**{f"a.{k}": v for k, v in snapshot(m1, None).items()},
                **{f"b.{k}": v for k, v in snapshot(m2, None).items()}}
    model, extra, _ = build(case, 1234, False)
    return snapshot(model, extra)


def max_difference(a, b):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


results = {}
selected = CASES if args.cases == "all" else {k: CASES[k] for k in args.cases.split(",")}
for name, case in selected.items():
    os.environ["DISTRIB_REDUCER"] = case.reducer
    try:
        runner = train_two_models if case.two_models else train
        got, want = runner(case, True), runner(case, False)
        ranks = comm.allgather_object(got, name=f"matrix.{name}")
        results[name] = {"error": None, "vs_torch": max_difference(got, want),
                         "across_ranks": max(max_difference(ranks[0], r) for r in ranks),
                         # how far the reference moved from its start: a case that trains nothing proves nothing
                         "reference_moved": max_difference(want, initial_state(case))}
    except Exception:  # noqa: BLE001 - recorded per case; the test fails on it
        results[name] = {"error": traceback.format_exc(limit=3)}


# -- API checks (no reference run needed) -----------------------------------------------------
checks = {}


def check(name):
    def register(fn):
        if args.no_checks:
            return fn
        try:
            checks[name] = fn()
        except Exception:  # noqa: BLE001
            checks[name] = {"error": traceback.format_exc(limit=3)}
        return fn
    return register


@check("rng")
def _():
    torch.manual_seed(0)
    plain = torch.rand(4, dtype=torch.float32)  # what a single-process script seeded with 0 draws
    draws = comm.allgather_object(first_draws.tolist(), name="check.rng")
    return {"draws": draws, "rank0_is_plain_torch": torch.equal(torch.tensor(draws[0], dtype=torch.float32), plain)}


@check("dataloader_workers")
def _():
    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.rand(1)  # what a random augmentation draws in the worker process
    loader = distrib.ShardedLoader(Augmented(), 4, ctx, seed=3, num_workers=2)
    draws = [float(v) for batch in loader for v in batch.flatten()]
    again = [float(v) for batch in distrib.ShardedLoader(Augmented(), 4, ctx, seed=3, num_workers=2) for v in batch.flatten()]
    return {"draws": comm.allgather_object(draws, name="check.loader"), "reproducible": draws == again}


@check("evaluate_with_an_empty_rank")
def _():
    sums, count = ({"loss": 6.0, "acc": 1.0}, 2) if ctx.rank == 0 else ({}, 0)
    return weighted_mean(sums, count)


@check("optimizer_calls_per_step")
def _():
    """How many times one step() calls the wrapped torch optimizer's step, and the buckets: one
    call per bucket when the step overlaps the transfer (DISTRIB_OVERLAP_STEP=1), else one."""
    model = Net("mlp")
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = distrib.wrap(model, inner, ctx)
    calls = []
    inner.register_step_post_hook(lambda *_: calls.append(1))
    opt.backward(model(torch.randn(B, 8)).pow(2).mean())
    opt.step()
    buckets = len(opt._reducer.buckets)
    opt.close()
    return {"calls": len(calls), "buckets": buckets}


@check("one_exchange_per_step")
def _():
    """Elements the engine is asked to allreduce in one step of synchronize() + step()."""
    model = Net("mlp")
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    sent = []
    carrier = opt._reducer.transport  # the engine, or its faster transport for this host (shared memory)
    real = carrier.allreduce_async_
    carrier.allreduce_async_ = lambda tensor, **k: (sent.append(tensor.numel()), real(tensor, **k))[1]
    try:
        opt.backward(model(torch.randn(B, 8)).pow(2).mean())
        opt.synchronize()
        opt.step()
    finally:
        del carrier.allreduce_async_  # the class's own again
    opt.close()
    params = list(model.parameters())
    return {"elements_sent": sum(sent), "gradient_elements": sum(q.numel() for q in params), "parameters": len(params),
            "carrier": type(carrier).__name__}


@check("two_backward_passes_refused")
def _():
    model = torch.nn.Linear(8, 1)
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    out = model(torch.randn(B, 8))
    opt.backward(out.pow(2).mean(), retain_graph=True)
    try:
        opt.backward(out.abs().mean())
    except RuntimeError as exc:
        message = str(exc)
    else:
        message = None
    opt.close()
    return {"message": message}


@check("optimizer_api")
def _():
    class MySGD(torch.optim.SGD):  # a user subclass keeps its own methods
        def describe(self):
            return "mine"
    model = torch.nn.Linear(8, 1)
    inner = MySGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = distrib.wrap(model, inner, ctx)
    opt.backward(model(torch.randn(B, 8)).pow(2).mean())
    opt.step()
    saved = opt.state_dict()
    plain = MySGD(torch.nn.Linear(8, 1).parameters(), lr=0.5, momentum=0.9)
    plain.load_state_dict(saved)  # torch's own format
    opt.load_state_dict(saved)
    try:
        distrib.wrap(model, opt, ctx)
        double_wrap = None
    except ValueError as exc:
        double_wrap = str(exc)
    return {"isinstance": isinstance(opt, torch.optim.Optimizer), "subclass_kept": inner.describe() == "mine",
            "plain_loads_it": plain.param_groups[0]["lr"] == 0.1 and len(plain.state) == 2,
            "round_trip": opt.state_dict()["state"][0]["momentum_buffer"].tolist()
            == saved["state"][0]["momentum_buffer"].tolist(),
            "double_wrap": double_wrap}


@check("sync_buffers")
def _():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx, sync_buffers=True)
    seen = {}  # the running statistics as each forward starts (this hook runs after distrib's)
    model.register_forward_pre_hook(lambda m, _: seen.update(var=m[1].running_var.tolist()))
    gen = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own data, another scale
    for _ in range(3):
        opt.backward(model(torch.randn(B, 8, generator=gen) * (1 + ctx.rank)).pow(2).mean())
        opt.step()
        opt.zero_grad()
    ranks = comm.allgather_object({"seen": seen["var"], "after": model[1].running_var.tolist()}, name="check.buffers")
    return {"at_forward": [r["seen"] for r in ranks], "after_forward": [r["after"] for r in ranks]}


@check("sync_batchnorm_statistics")
def _():
    torch.manual_seed(6)
    layer = distrib.SyncBatchNorm(3)
    gen = torch.Generator().manual_seed(200)
    x = torch.randn(N * B, 3, generator=gen) * 3 + 1
    layer(x[ctx.rank * B:(ctx.rank + 1) * B])
    reference = torch.nn.BatchNorm1d(3)
    reference(x)
    ranks = comm.allgather_object(layer.running_var.tolist(), name="check.syncbn")
    return {"running_var_per_rank": ranks, "single_process": reference.running_var.tolist(),
            "running_mean_error": float((layer.running_mean - reference.running_mean).abs().max())}


if ctx.rank == 0:
    with open(args.out, "w") as f:
        json.dump({"size": ctx.size, "controller": ctx.controller, "engine": ctx.engine, "cases": results, "checks": checks}, f, indent=1)
