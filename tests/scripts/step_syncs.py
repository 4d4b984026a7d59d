"""How often backward() + step() would make the host wait for the device, distrib against plain torch.

Used by tests/test_step_syncs.py (CPU, counted with :class:`sync_counter.SyncCounter`) and by
scripts/gpu_check.py (``--device cuda``: also under ``torch.cuda.set_sync_debug_mode("error")``,
so any synchronising CUDA call raises). Every rank trains a small MLP for a few steps per case
(precision x shard), with clipping on, and counts the calls in its backward and step only
(forward, zero_grad and the loss are the user's). The same loop in plain torch (GradScaler,
clip_grad_norm_, the optimizer's step) is counted alongside: fp16's GradScaler reads its inf
flag once per step, so that is the bar there (on a GPU fp16 runs under the "warn" mode and its
synchronising calls are counted; fp32 and bf16 under "error"). Rank 0 writes every rank's
counts as JSON.
"""
import argparse
import json
import traceback
import warnings

import torch

import distrib
from sync_counter import SyncCounter

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
               help="sgd: its step reads nothing on the host, so the CPU count is absolute; adamw: its step "
                    "counter lives on the host (not a device wait; on a GPU the sync debug mode tells)")
p.add_argument("--steps", type=int, default=3)
args = p.parse_args()

ctx = distrib.init(seed=0)
device = ctx.device if args.device == "cuda" else torch.device("cpu")
if args.device == "cuda" and device.type != "cuda":
    raise SystemExit("--device cuda: this worker got no GPU")
PRECISIONS = ("fp32", "bf16", "fp16")
SHARDS = (None, "optimizer", "gradients")


def make(seed: int, unused_head: bool = False):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)
    if unused_head:
        model.add_module("head", torch.nn.Linear(4, 4).to(device))  # used by rank 0 only
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def forward(model, x, rank: int):
    out = model[2](model[1](model[0](x)))
    if hasattr(model, "head") and rank == 0:
        out = model.head(out)
    return out.float().pow(2).mean()


def batches():
    g = torch.Generator().manual_seed(1 + ctx.rank)
    return [torch.randn(6, 8, generator=g).to(device) for _ in range(args.steps)]


def autocast(precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class CudaSyncs:
    """On a GPU, ``torch.cuda.set_sync_debug_mode`` for the block: "error" (fp32, bf16: the first
    synchronising call raises) or "warn" (fp16: GradScaler's read is expected; each one is counted
    in ``count``). Nothing on the CPU."""

    def __init__(self, raise_on_sync: bool):
        self.mode = "error" if raise_on_sync else "warn"
        self.count = 0
        self._catch = warnings.catch_warnings(record=True)

    def __enter__(self):
        if device.type == "cuda":
            torch.cuda.synchronize()  # what came before is not the step's
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(self.mode)
        return self

    def __exit__(self, *exc):
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._caught)
        return False


def cuda_error_line(exc: BaseException) -> str:
    """The error and the innermost line of distrib (or of this script) that made it."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/distrib/" in f.filename
              or f.filename.endswith("step_syncs.py")]
    where = f" at {frames[-1].filename.rsplit('/', 2)[-2]}/{frames[-1].filename.rsplit('/', 1)[-1]}:" \
            f"{frames[-1].lineno} {frames[-1].line}" if frames else ""
    return f"{str(exc).splitlines()[0]}{where}"


def count_steps(forward, step, zero_grad, raise_on_sync: bool):
    """Count what ``step(loss)`` makes the host wait for, one batch at a time (the forward pass,
    ``forward(x)``, is not counted). On a GPU the sync debug mode's error ends the case."""
    counter, calls, cuda_syncs, cuda_error = SyncCounter(), [], [], None
    for x in batches():
        loss = forward(x)
        try:
            with counter.counting(), CudaSyncs(raise_on_sync=raise_on_sync) as cuda:
                step(loss)
        except RuntimeError as exc:  # the sync debug mode's error: the step is broken, stop this case
            if device.type != "cuda":
                raise
            cuda_error = cuda_error_line(exc)
            break
        calls.append(counter.calls)
        cuda_syncs.append(cuda.count)
        counter.calls = []
        zero_grad()
    return {"per_step": [len(c) for c in calls], "calls": sorted({c for cs in calls for c in cs}),
            "cuda_syncs": cuda_syncs, "cuda_error": cuda_error}


def distrib_counts(precision: str, shard, unused_head: bool = False):
    model, opt = make(0, unused_head)
    opt = distrib.wrap(model, opt, ctx, precision=precision, shard=shard, max_grad_norm=1.0,
                       name=f"syncs.{precision}.{shard}.{unused_head}")

    def forward_pass(x):
        with opt.autocast():
            return forward(model, x, ctx.rank)

    def step(loss):
        opt.backward(loss)
        opt.step()
    # a parameter unused on this rank costs one expected read (the test counts it): "warn" mode
    result = count_steps(forward_pass, step, opt.zero_grad, precision != "fp16" and not unused_head)
    result["norm_is_tensor"] = torch.is_tensor(opt.last_grad_norm)
    opt.close()
    return result


def plain_counts(precision: str):
    model, opt = make(0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def forward_pass(x):
        with autocast(precision):
            return forward(model, x, 0)

    def step(loss):
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    return count_steps(forward_pass, step, opt.zero_grad, precision != "fp16")


results = {"size": ctx.size, "engine": ctx.engine, "device": str(device), "optimizer": args.optimizer, "cases": {}}
for precision in PRECISIONS:
    results["cases"][f"plain-{precision}"] = plain_counts(precision)
    for shard in SHARDS:
        results["cases"][f"distrib-{precision}-{shard or 'none'}"] = distrib_counts(precision, shard)
if ctx.size > 1:
    # a parameter only rank 0 uses: the other ranks must learn whether anyone used it
    results["cases"]["distrib-fp32-none-unused-on-rank-1"] = distrib_counts("fp32", None, unused_head=True)
everyone = ctx.comm.allgather_object(results, name="syncs.results")
if ctx.rank == 0:
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(everyone, f, indent=1)
