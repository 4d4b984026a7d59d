"""Time training steps of one implementation; rank 0 writes the timings to --out.

``--model mlp,lm,conv`` times several models one after the other in the same processes, so that
one launch serves them all (a launch costs more than the steps it times). ``--variants`` times
several ways of wrapping the same model in the same processes, alternated (A B, then B A, ...);
every variant builds its model anew from the same seed. The file holds
``{"by_model": {model: {"variants": {variant: [step ms, ...]}, ...}}}``. With ``--link-rates``
(the network benchmark, one worker per host) each rate's variants run with this host's link
limited to it, and a variant's key is ``variant@rate``; ``wire_bytes`` then holds, per key, the
bytes this host's link sent per timed step (eth0's tx_bytes counter: everything on the wire).

    alone     plain torch, no communication; under mpirun -np 2 two such processes share the
              cores at once (the compute floor of a 2-worker step on this machine)
    distrib   distrib.wrap; variants: buckets (the default reducer), per-parameter, fp16 (buckets
              with compression="fp16"), local4, local8 (local_sgd=LocalSGD(every=4 | 8): time the mean
              over a window of a multiple of H steps), powersgd1/2/4 (compression="powersgd" at rank 1, 2, 4,
              low-rank from the first timed step), and horovod, horovod-fp16: plain
              hvd.DistributedOptimizer in the same processes, i.e. under the same launcher, Open MPI
              flags and threads
    horovod   hvd.DistributedOptimizer (the launch decides the Open MPI flags and cycle time);
              variants: default, fp16 (hvd.Compression.fp16)
    ddp       torch DDP over Gloo (torchrun); variants: default (25 MB buckets), fp16 (default
              with DDP's fp16_compress_hook), powersgd1/2/4 (default with DDP's powerSGD_hook
              at rank 1 and 4, low-rank from the first timed step), and tuned-<MB>: gradient_as_bucket_view=True,
              bucket_cap_mb=MB, broadcast_buffers=False (BatchNorm statistics stay per worker,
              as under distrib and Horovod), and distrib-torch (distrib-torch-powersgd2/4: with PowerSGD
              rank 2 or 4): distrib.wrap on the torch engine
              (distrib.init(engine="torch") joins the same Gloo process group), alternated with DDP
              in the same processes; distrib-torch-bucket-<MB> (DISTRIB_BUCKET_MB: distrib's own
              sweep), and one variant per lever: distrib-torch-gloo (DISTRIB_SHM=0: Gloo's allreduce
              instead of shared memory), and on that Gloo path distrib-torch-divide-after
              (DISTRIB_PRESCALE=0), distrib-torch-first-1mb (DISTRIB_FIRST_BUCKET_MB=1: DDP's small first
              bucket on one host); a candidate: distrib-torch-overlap-step (DISTRIB_OVERLAP_STEP=1: the
              optimizer steps each bucket as its average arrives instead of once after the last)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from benchmarks.stats import rotate  # noqa: E402
from benchmarks.workers.models import DEFAULT_BATCH, MODELS, build, grad_bytes  # noqa: E402

VARIANTS = {"alone": ("default",), "horovod": ("default", "fp16"),
            "distrib": ("buckets", "per-parameter", "fp16", "powersgd1", "powersgd2", "powersgd4", "local4", "local8",
                        "horovod", "horovod-fp16"),
            "ddp": ("default", "fp16", "powersgd1", "powersgd2", "powersgd4", "distrib-torch", "distrib-torch-gloo",
                    "distrib-torch-divide-after", "distrib-torch-first-1mb", "distrib-torch-overlap-step", "distrib-torch-powersgd2", "distrib-torch-powersgd4")}


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=sorted(VARIANTS), required=True)
    p.add_argument("--model", default="mlp", help=f"{', '.join(MODELS)}, or a comma-separated list timed in order")
    p.add_argument("--variants", default="default", help="comma-separated variants, alternated in-process")
    p.add_argument("--segments", type=int, default=1, help="alternations of the variants")
    p.add_argument("--rotate", type=int, default=0, help="start the variant order at this index (the round)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--link-rates", default="", help="network benchmark: comma-separated tc rates (1gbit,...); "
                   "before each rate's variants every worker limits its host's eth0 to it (root, one worker per host)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.rates = args.link_rates.split(",") if args.link_rates else [""]
    args.models = args.model.split(",")
    args.variant_list = args.variants.split(",")
    if not set(args.models) <= set(MODELS):
        p.error(f"--model: unknown model in {args.model!r}; choose from {', '.join(MODELS)}")
    for v in args.variant_list:
        if v not in VARIANTS[args.impl] and not (args.impl == "ddp" and (_ddp_bucket_mb(v) or _distrib_bucket_mb(v))):
            p.error(f"--variants: {v!r} is not a variant of {args.impl}; choose from "
                    f"{', '.join(VARIANTS[args.impl])}"
                    f"{', tuned-<MB>, distrib-torch-bucket-<MB>' if args.impl == 'ddp' else ''}")
    return args


def _ddp_bucket_mb(variant: str) -> float:
    try:
        return float(variant[len("tuned-"):]) if variant.startswith("tuned-") else 0.0
    except ValueError:
        return 0.0


def _distrib_bucket_mb(variant: str) -> float:
    prefix = "distrib-torch-bucket-"
    try:
        return float(variant[len(prefix):]) if variant.startswith(prefix) else 0.0
    except ValueError:
        return 0.0


def _set_env(**values) -> None:
    """Set (a string) or remove (None) each variable: a variant's reducer settings, undone for the next."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _powersgd_rank(variant: str) -> int:
    return int(variant[len("powersgd"):]) if variant.startswith("powersgd") else 0


def tx_bytes(device: str = "eth0") -> int:
    """Bytes this host's link has sent (the kernel's counter)."""
    return int(Path(f"/sys/class/net/{device}/statistics/tx_bytes").read_text())


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)


def join(impl):
    """(rank, size, barrier) of this process's job, initialising the communication once."""
    if impl == "alone":
        if "OMPI_COMM_WORLD_SIZE" not in os.environ:
            return 0, 1, lambda: None
        from mpi4py import MPI  # a pair of independent processes: only to start each model together
        return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size, MPI.COMM_WORLD.Barrier
    if impl in ("distrib", "horovod"):
        import horovod.torch as hvd
        if impl == "distrib":
            import distrib
            distrib.init()
        elif not hvd.is_initialized():
            hvd.init()
        return hvd.rank(), hvd.size(), lambda: hvd.allreduce(torch.zeros(1), name="barrier")
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def limit_link(rate: str, device: str = "eth0") -> None:
    """A token bucket on this host's link, as tests/nodes.py's limit_bandwidth sets it from outside."""
    subprocess.run(["tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate, "burst", "1mb",
                    "latency", "50ms"], check=True, capture_output=True)


def wrap(impl, variant, model, warmup: int = 5):
    """(module to run forward, optimizer with zero_grad/step, close()); PowerSGD variants go
    low-rank after ``warmup`` steps"""
    if impl == "alone":
        return model, _sgd(model), lambda: None
    if impl == "distrib" and not variant.startswith("horovod"):
        import distrib
        os.environ["DISTRIB_REDUCER"] = "per-parameter" if variant == "per-parameter" else "auto"
        if _powersgd_rank(variant):
            opt = distrib.wrap(model, _sgd(model), distrib.init(), compression="powersgd",
                               powersgd=distrib.PowerSGD(rank=_powersgd_rank(variant), start_step=warmup))
        elif variant.startswith("local"):  # local SGD: the parameters averaged every H steps
            opt = distrib.wrap(model, _sgd(model), distrib.init(),
                               local_sgd=distrib.LocalSGD(every=int(variant[len("local"):])))
        else:
            opt = distrib.wrap(model, _sgd(model), distrib.init(), compression="fp16" if variant == "fp16" else "none")
        return model, opt, opt.close  # close: its gradient hooks and buckets
    if variant.startswith("distrib-torch"):  # in DDP's processes: the same process group, launcher and threads
        import distrib
        bucket_mb = _distrib_bucket_mb(variant)
        gloo_levers = ("distrib-torch-gloo", "distrib-torch-divide-after", "distrib-torch-first-1mb")
        _set_env(DISTRIB_REDUCER="auto", DISTRIB_PRESCALE="0" if variant == "distrib-torch-divide-after" else None,
                 DISTRIB_FIRST_BUCKET_MB="1" if variant == "distrib-torch-first-1mb" else None,
                 DISTRIB_SHM="0" if variant in gloo_levers else None,
                 DISTRIB_OVERLAP_STEP="1" if variant == "distrib-torch-overlap-step" else None,
                 DISTRIB_BUCKET_MB=str(bucket_mb) if bucket_mb else None)
        psgd = {"compression": "powersgd", "powersgd": distrib.PowerSGD(rank=_powersgd_rank(variant[14:]),
                                                                        start_step=warmup)} if "powersgd" in variant else {}
        opt = distrib.wrap(model, _sgd(model), distrib.init(engine="torch"), **psgd)
        return model, opt, opt.close
    if impl == "horovod" or variant.startswith("horovod"):
        import horovod.torch as hvd
        compression = hvd.Compression.fp16 if variant.endswith("fp16") else hvd.Compression.none
        opt = hvd.DistributedOptimizer(_sgd(model), named_parameters=model.named_parameters(),
                                       compression=compression)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model, opt, lambda: None
    mb = _ddp_bucket_mb(variant)
    kwargs = dict(gradient_as_bucket_view=True, bucket_cap_mb=mb, broadcast_buffers=False) if mb else {}
    if _powersgd_rank(variant):
        # One bucket: over Gloo, the hook's chained allreduces of several buckets interleave in a
        # different order on each rank ("Received data size doesn't match expected size", abort).
        kwargs = dict(bucket_cap_mb=1024)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **kwargs)
    if variant == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
        ddp.register_comm_hook(None, fp16_compress_hook)
    if _powersgd_rank(variant):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
        # the same schedule as distrib's: plain allreduce in the warm-up steps, low-rank after
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=_powersgd_rank(variant),
                                   start_powerSGD_iter=max(2, warmup))
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    return ddp, _sgd(ddp), lambda: None


def time_variant(args, name, variant, count_bytes: bool = False):
    """Step times (ms) after the warm-up, the wall-clock time the first step ended, the model, and
    (``count_bytes``) the bytes this host's link sent per timed step."""
    model, loss_fn = build(name, DEFAULT_BATCH[name])
    module, opt, close = wrap(args.impl, variant, model, args.warmup)
    times, first_done, sent = [], None, None
    for i in range(args.warmup + args.steps):
        if count_bytes and i == args.warmup:
            sent = tx_bytes()
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(module).backward()
        opt.step()
        times.append(time.perf_counter() - t)
        first_done = first_done or time.time()
    if sent is not None:
        sent = (tx_bytes() - sent) / args.steps
    close()
    return [1e3 * x for x in times[args.warmup:]], first_done, model, sent


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, size, barrier = join(args.impl)
    by_model = {}
    for name in args.models:
        found = {"variants": {}, "process_start_unix": t_start, "size": size}
        for seg in range(args.segments):
            for rate in rotate(args.rates, args.rotate + seg):
                if rate:
                    limit_link(rate)
                for variant in rotate(args.variant_list, args.rotate + seg):
                    barrier()  # every rank starts the variant together (and has limited its link)
                    ms, first_done, model, sent = time_variant(args, name, variant, count_bytes=bool(rate))
                    key = f"{variant}@{rate}" if rate else variant
                    found["variants"].setdefault(key, []).extend(ms)
                    if sent is not None:
                        found.setdefault("wire_bytes", {}).setdefault(key, []).append(sent)
                    found.setdefault("first_step_unix", first_done)
        found.update(params=sum(p.numel() for p in model.parameters()), grad_bytes=grad_bytes(model),
                     tensors=len(list(model.parameters())), batch=DEFAULT_BATCH[name])
        by_model[name] = found
    barrier()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"impl": args.impl, "by_model": by_model}))


if __name__ == "__main__":
    main()
