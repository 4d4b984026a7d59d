"""Train the network section's LM (lm8) for --steps steps (on to --max-steps), measuring its
validation loss every --eval-every steps.

Every variant sees the same global batches: step s draws 2 x --batch windows of the corpus's
first 90 % from a generator seeded with s; a worker takes its half, the single-process
``--reference`` run takes them all. The validation loss is the mean over fixed windows of the
last 10 % (for local SGD, of the ranks' mean parameters). Under the launcher (2 workers),
``--variants`` are distrib.wrap with compression none (fp32), fp16, powersgd1, powersgd4
(PowerSGD from step --start-step), local<H> (local SGD, average every H steps), diloco<H>
(DiLoCo's outer Nesterov), trained one after the other in the same processes; under torchrun,
ddp-powersgd1/4 (DDP with its powerSGD_hook). Rank 0 writes ``{"val_loss": {variant: loss at
--steps}, "curve": {variant: {step: loss}}, "seconds": {...}}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from benchmarks.workers.models import LM8, REPO  # noqa: E402

VARIANTS = ("fp32", "fp16", "powersgd1", "powersgd2", "powersgd4", "local4", "local8", "diloco8")
DDP_VARIANTS = ("ddp-powersgd1", "ddp-powersgd2", "ddp-powersgd4")  # under torchrun: DDP with its own powerSGD_hook
WORKERS = 2  # the global batch is WORKERS x --batch, also in the reference run


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--reference", action="store_true", help="one process, plain torch, the whole global batch")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--start-step", type=int, default=30, help="PowerSGD's plain-allreduce warm-up")
    p.add_argument("--max-steps", type=int, default=0, help="train on to this step (the same-wall-time column)")
    p.add_argument("--eval-every", type=int, default=10, help="validation loss every this many steps")
    p.add_argument("--batch", type=int, default=4, help="windows per worker per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.variant_list = [] if args.reference else args.variants.split(",")
    bad = [v for v in args.variant_list if v not in VARIANTS + DDP_VARIANTS and not v.startswith(("local", "diloco"))]
    if bad:
        p.error(f"--variants: {', '.join(bad)} not in {', '.join(VARIANTS + DDP_VARIANTS)}")
    return args


def data(cfg_block: int):
    sys.path.insert(0, str(REPO / "examples"))
    from lm_model import CharTokenizer, load_corpus
    text = load_corpus()
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text))
    split = int(len(ids) * 0.9)
    return tok, ids[:split], ids[split:]


def windows(ids: torch.Tensor, starts: torch.Tensor, block: int):
    return (torch.stack([ids[s:s + block] for s in starts]), torch.stack([ids[s + 1:s + block + 1] for s in starts]))


def distrib_options(variant: str, args) -> dict:
    """distrib.wrap's options of a variant: fp32, fp16, powersgd<r>, local<H> (local SGD: AdamW on
    each rank, the parameters averaged every H steps), diloco<H> (the same, DiLoCo's outer Nesterov)."""
    import distrib
    if variant in ("fp32", "fp16"):
        return {"compression": "fp16"} if variant == "fp16" else {}
    if variant.startswith("powersgd"):
        return {"compression": "powersgd", "powersgd": distrib.PowerSGD(rank=int(variant[len("powersgd"):]),
                                                                        start_step=args.start_step)}
    if variant.startswith("local"):
        return {"local_sgd": distrib.LocalSGD(every=int(variant[len("local"):]))}
    return {"local_sgd": distrib.LocalSGD.diloco(every=int(variant[len("diloco"):]))}


def validation_loss(model, val_ids, block: int, comm=None) -> float:
    """The mean loss over 64 fixed windows of the held-out text; with ``comm`` (local SGD, whose
    ranks differ between averages) of the ranks' mean parameters, put back afterwards."""
    gen = torch.Generator().manual_seed(12345)
    starts = torch.randint(0, len(val_ids) - block - 1, (64,), generator=gen)
    params = list(model.parameters())
    own = [p.detach().clone() for p in params] if comm is not None else None
    with torch.no_grad():
        if comm is not None:
            for i, p in enumerate(params):
                p.copy_(comm.allreduce(p.detach().clone(), name=f"converge.eval.{i}"))
        x, y = windows(val_ids, starts, block)
        loss = float(model(x, y))
        if own is not None:
            for p, o in zip(params, own):
                p.copy_(o)
    return loss


def train(args, variant: str, rank: int, size: int, ctx=None) -> dict:
    """{step: validation loss} every --eval-every steps up to --max-steps (at least --steps)."""
    sys.path.insert(0, str(REPO / "examples"))
    from lm_model import GPT, GPTConfig
    tok, train_ids, val_ids = data(LM8["block_size"])
    block = LM8["block_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=tok.vocab, **LM8))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    comm = None
    if variant.startswith("ddp-"):
        model = ddp_powersgd(model, int(variant[len("ddp-powersgd"):]), args.start_step)
    elif ctx is not None:
        import distrib
        opt = distrib.wrap(model, opt, ctx, **distrib_options(variant, args))
        comm = ctx.comm if variant.startswith(("local", "diloco")) else None
    curve = {}
    for step in range(max(args.steps, args.max_steps)):
        gen = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(train_ids) - block - 1, (WORKERS * args.batch,), generator=gen)
        mine = starts if size == 1 else starts[rank * args.batch:(rank + 1) * args.batch]
        x, y = windows(train_ids, mine, block)
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve[step + 1] = validation_loss(model, val_ids, block, comm)
    if ctx is not None and not variant.startswith("ddp-"):
        opt.close()
    return curve


def ddp_powersgd(model, rank: int, start_step: int):
    """DDP over Gloo with torch's powerSGD_hook at ``rank`` (the fair reference): the same warm-up
    and min_compression_rate (2) as distrib's PowerSGD; one bucket, as in the step worker."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1024)
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=max(2, start_step),
                               min_compression_rate=2, use_error_feedback=True, warm_start=True)
    ddp.register_comm_hook(state, psgd.powerSGD_hook)
    return ddp


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = {"val_loss": {}, "seconds": {}, "steps": args.steps, "global_batch": WORKERS * args.batch}
    if args.reference:
        t = time.perf_counter()
        curve = train(args, "single", 0, 1)
        out["val_loss"]["single"], out["curve"] = curve[args.steps], {"single": curve}
        out["seconds"]["single"] = time.perf_counter() - t
        Path(args.out).write_text(json.dumps(out))
        return
    if all(v.startswith("ddp-") for v in args.variant_list):  # under torchrun
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank, size, ctx = dist.get_rank(), dist.get_world_size(), None
    else:
        import distrib
        ctx = distrib.init()
        rank, size = ctx.rank, ctx.size
    out["curve"] = {}
    for variant in args.variant_list:
        t = time.perf_counter()
        curve = out["curve"][variant] = train(args, variant, rank, size, ctx)
        out["val_loss"][variant] = curve[args.steps]
        out["seconds"][variant] = time.perf_counter() - t
    if rank == 0:
        Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
