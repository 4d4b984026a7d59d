"""Step time of one training step, side by side: plain torch, distrib.wrap, distrib shard="gradients",
Horovod's own DistributedOptimizer and DDP, on the GPT of examples/lm_model.py.

Started by scripts/gpu_check.py under ``python -m launch -np N``. Every variant trains its own
copy of the same model (same initial weights) with AdamW, clipping at 1.0 and bf16 autocast, on
random tokens that already live on the device. The variants take turns: each round runs
``--steps`` steps of every variant, in a rotated order, timed between two device
synchronisations; the table gives each variant's median ms/step with its min-max over rounds,
and its ratio to the baseline measured in the same rounds (plain torch at world size 1, DDP at
larger sizes). ``--cpu``: a small model on the CPU with Gloo, to run every code path on a
machine without a GPU; its times mean nothing.
"""
import argparse
import contextlib
import json
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))
import distrib  # noqa: E402
from benchmarks.stats import fmt, fmt_value, ratios, rotate, summary  # noqa: E402
from distrib.context import import_horovod  # noqa: E402
from lm_model import GPT, GPTConfig  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--cpu", action="store_true", help="dry run on the CPU with a small model")
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--steps", type=int, default=20, help="steps per variant per round")
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--n-layer", type=int, default=12)
p.add_argument("--n-embd", type=int, default=768)
p.add_argument("--n-head", type=int, default=12)
p.add_argument("--block-size", type=int, default=256)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--variants", default="plain,distrib,distrib-gradients,horovod,ddp")
args = p.parse_args()

ctx = distrib.init(seed=0, engine="horovod")  # Horovod's own optimizer is one of the variants
hvd = import_horovod()
device = torch.device("cpu") if args.cpu else ctx.device
if not args.cpu and device.type != "cuda":
    raise SystemExit("gpu_check_bench: this worker got no GPU (use --cpu for a dry run)")
VOCAB = "".join(chr(32 + i) for i in range(96))
CONFIG = GPTConfig(vocab=VOCAB, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                   n_embd=args.n_embd)
AUTOCAST = dict(device_type=device.type, dtype=torch.bfloat16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DDP needs torch.distributed beside Horovod: one machine, rank 0's port for everyone.
port = hvd.broadcast_object(free_port() if ctx.rank == 0 else None, root_rank=0, name="bench.port")
if not dist.is_initialized():
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=ctx.rank, world_size=ctx.size)


def new_model():
    torch.manual_seed(0)
    return GPT(CONFIG).to(device)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)


def clip(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def torch_step(model, opt):
    """Plain torch's bf16 step with clipping: the reference itself, and DDP's (DDP reduces in backward)."""
    def step(x, y):
        with torch.autocast(**AUTOCAST):
            loss = model(x, y)
        loss.backward()
        clip(model)
        opt.step()
        opt.zero_grad()
    return step


def plain():
    model = new_model()
    return torch_step(model, adamw(model))


def distrib_variant(shard):
    def build():
        model = new_model()
        opt = distrib.wrap(model, adamw(model), ctx, precision="bf16", max_grad_norm=1.0, shard=shard)

        def step(x, y):
            with opt.autocast():
                loss = model(x, y)
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
        return step
    return build


def horovod():
    model = new_model()
    opt = hvd.DistributedOptimizer(adamw(model), named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def step(x, y):  # Horovod's documented way to clip: synchronize, clip, step without a second exchange
        with torch.autocast(**AUTOCAST):
            loss = model(x, y)
        loss.backward()
        opt.synchronize()
        clip(model)
        with opt.skip_synchronize():
            opt.step()
        opt.zero_grad()
    return step


def ddp():
    model = DistributedDataParallel(new_model(), device_ids=[device] if device.type == "cuda" else None)
    return torch_step(model, adamw(model))


BUILDERS = {"plain": plain, "distrib": distrib_variant(None), "distrib-gradients": distrib_variant("gradients"),
            "horovod": horovod, "ddp": ddp}
names = [n for n in args.variants.split(",") if n and not (n == "plain" and ctx.size > 1)]
unknown = set(names) - set(BUILDERS)
if unknown:
    raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from {', '.join(BUILDERS)}")
baseline = "plain" if ctx.size == 1 and "plain" in names else "ddp"
g = torch.Generator().manual_seed(ctx.rank)
data = [(torch.randint(len(VOCAB), (args.batch_size, args.block_size), generator=g).to(device),
         torch.randint(len(VOCAB), (args.batch_size, args.block_size), generator=g).to(device))
        for _ in range(4)]


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, n: int) -> float:
    """ms per step over n steps, between two device synchronisations."""
    sync()
    start = time.perf_counter()
    for i in range(n):
        step(*data[i % len(data)])
    sync()
    return (time.perf_counter() - start) * 1000 / n


steps = {}
for name in names:
    steps[name] = BUILDERS[name]()
    timed(steps[name], args.warmup)
ms = {name: [] for name in names}
for r in range(args.rounds):
    for name in rotate(names, r):
        ms[name].append(timed(steps[name], args.steps))

if ctx.rank == 0:
    params = sum(p.numel() for p in new_model().parameters())
    result = {"world_size": ctx.size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": vars(args), "parameters": params, "baseline": baseline,
              "ms_per_step": {n: summary(v) for n, v in ms.items()}, "rounds": ms,
              "vs_baseline": {n: ratios(v, ms[baseline]) for n, v in ms.items() if baseline in ms}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    lines = [f"world size {ctx.size}, {result['device']}, GPT {args.n_layer}x{args.n_embd} ({params:,} parameters), "
             f"block {args.block_size}, batch {args.batch_size} per worker, bf16 autocast, AdamW, clip 1.0; "
             f"{args.rounds} alternated rounds of {args.steps} steps",
             "", f"| variant | ms/step, median (min-max) | vs {baseline}, same rounds |", "|---|---|---|"]
    for n in names:
        vs = fmt(result["vs_baseline"][n]) if n in result["vs_baseline"] else "-"
        lines.append(f"| {n} | {fmt_value(result['ms_per_step'][n])} | {vs} |")
    print("\n".join(lines), flush=True)
with contextlib.suppress(Exception):
    dist.destroy_process_group()
