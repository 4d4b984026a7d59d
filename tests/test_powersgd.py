"""PowerSGD (compression="powersgd"): the math against a reference written here, on one process,
and a real 2-rank run against that reference applied to both ranks' gradients in one process
followed by plain torch SGD (the same global batch)."""
from __future__ import annotations

import pytest
import torch

from distrib.compression.powersgd import PowerSGD, PowerSGDState, initial_q, should_compress
from tests.helpers import SCRIPTS, assert_resume_after_a_kill_is_bit_exact, run_launch, run_torchrun


class ReferencePowerSGD:
    """PowerSGD as the paper writes it, for W ranks in one process: per matrix, Householder QR
    (torch.linalg.qr) instead of the library's Gram-Schmidt (equal up to the signs of columns,
    which P P^T does not see), a Python loop instead of flat buffers."""

    def __init__(self, shapes, config: PowerSGD, world: int, dtype=torch.float64):
        self.config, self.world = config, world
        self.compress = [should_compress(s, config.rank, config.min_compression_rate) for s in shapes]
        self.dims = [(s[0], s.numel() // s[0], min(s[0], s.numel() // s[0], config.rank)) if c else None
                     for s, c in zip(shapes, self.compress)]
        # the initial Q's are drawn in the library's order: matrices grouped by (n, m, r)
        order = sorted((i for i, c in enumerate(self.compress) if c),
                       key=lambda i: [d for d in dict.fromkeys(self.dims[j] for j in range(len(shapes))
                                                               if self.compress[j])].index(self.dims[i]))
        self.q = dict(zip(order, initial_q([self.dims[i] for i in order], config.seed, dtype)))
        self.errors = [{i: torch.zeros(self.dims[i][:2], dtype=dtype) for i in self.q} for _ in range(world)]
        self.step = 0

    def average(self, grads_per_rank):
        """grads_per_rank[w][i] -> the averaged gradients (list over i), as every rank gets them."""
        out = []
        plain = self.step < self.config.start_step
        for i in range(len(grads_per_rank[0])):
            gs = [g[i] for g in grads_per_rank]
            if plain or not self.compress[i]:
                out.append(sum(gs) / self.world)
                continue
            n, m, _ = self.dims[i]
            m_in = [g.reshape(n, m) + self.errors[w][i] for w, g in enumerate(gs)]
            q = torch.linalg.qr(self.q[i]).Q
            p = torch.linalg.qr(sum(x @ q for x in m_in)).Q
            self.q[i] = sum(x.t() @ p for x in m_in) / self.world
            approx = p @ self.q[i].t()
            for w in range(self.world):
                self.errors[w][i] = m_in[w] - approx
            out.append(approx.reshape(gs[0].shape))
        self.step += 1
        return out


def simulate(states, grads_per_rank):
    """The library's PowerSGDState on W 'ranks' in one process, the collectives done by hand."""
    world = len(states)
    p_mean = sum(s.start(g).clone() for s, g in zip(states, grads_per_rank)) / world
    q_mean = sum(s.after_p_mean(p_mean.clone()).clone() for s in states) / world
    outs = [[g.clone() for g in grads] for grads in grads_per_rank]
    for i in states[0].uncompressed:  # the reducer's plain allreduce
        for out in outs:
            out[i] = sum(g[i] for g in grads_per_rank) / len(states)
    for s, out in zip(states, outs):
        s.finish(q_mean.clone(), out)
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg="every rank must get the same average")
    return outs[0]


SHAPES = [torch.Size(s) for s in [(40, 30), (30,), (40, 30), (16, 3, 3, 3), (5, 200), (3, 4)]]


def random_grads(gen, world=2):
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(world)]


@pytest.mark.parametrize("rank,compressed", [(1, [0, 2, 3, 4]), (4, [0, 2, 3])])
def test_state_matches_the_reference_over_steps(rank, compressed):
    config = PowerSGD(rank=rank, start_step=0)
    states = [PowerSGDState(SHAPES, config, dtype=torch.float64, device=torch.device("cpu")) for _ in range(2)]
    ref = ReferencePowerSGD(SHAPES, config, 2)
    assert [i for i, c in enumerate(ref.compress) if c] == states[0].compressed == compressed
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = random_grads(gen)
        got, want = simulate(states, grads), ref.average(grads)
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"tensor {i}")
    # the uncompressed tensors are the exact average; the compressed ones are not (rank < min(n, m))
    assert torch.allclose(got[1], (grads[0][1] + grads[1][1]) / 2)
    assert not torch.allclose(got[0], (grads[0][0] + grads[1][0]) / 2, atol=1e-3)


def test_full_rank_is_the_exact_average():
    shapes = [torch.Size((6, 9)), torch.Size((9, 4))]
    config = PowerSGD(rank=9, start_step=0, min_compression_rate=0)  # 0: compress every matrix
    states = [PowerSGDState(shapes, config, dtype=torch.float64, device=torch.device("cpu")) for _ in range(2)]
    assert states[0].compressed == [0, 1]
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(2)]
        for got, a, b in zip(simulate(states, grads), *grads):
            torch.testing.assert_close(got, (a + b) / 2, rtol=1e-10, atol=1e-12)
    # each rank's error is its own gradient minus the average: they cancel over the ranks
    for i in states[0].compressed:
        assert (states[0].errors[i] + states[1].errors[i]).abs().max() < 1e-10


def test_error_feedback_makes_the_sum_over_steps_converge():
    """Rank 1 of a fixed 40 x 30 gradient per rank: one step transmits a small part of it, but
    with error feedback the sum over T steps is T times the average up to one step's error, so
    the mean over steps converges to the true average (without it, it stays rank-1)."""
    shapes = [torch.Size((40, 30))]
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(shapes[0], generator=gen, dtype=torch.float64)] for _ in range(2)]
    mean = (grads[0][0] + grads[1][0]) / 2
    states = [PowerSGDState(shapes, PowerSGD(rank=1, start_step=0), dtype=torch.float64, device=torch.device("cpu"))
              for _ in range(2)]
    total, rel = torch.zeros_like(mean), []
    for t in range(1, 201):
        total += simulate(states, [[g[0].clone()] for g in grads])[0]
        if t in (1, 20, 200):
            rel.append(float((total / t - mean).norm() / mean.norm()))
    assert rel[0] > 0.5          # one rank-1 step misses most of a random matrix
    assert rel[2] < rel[1] / 4   # error feedback: the running mean keeps closing in
    assert rel[2] < 0.1


def test_a_zero_gradient_stays_finite_and_an_overflow_restarts():
    shapes = [torch.Size((20, 10))]
    states = [PowerSGDState(shapes, PowerSGD(rank=2, start_step=0), dtype=torch.float64, device=torch.device("cpu"))
              for _ in range(2)]
    zero = [[torch.zeros(shapes[0], dtype=torch.float64)] for _ in range(2)]
    assert torch.equal(simulate(states, zero)[0], zero[0][0])
    bad = [[torch.full(shapes[0], float("inf"), dtype=torch.float64)] for _ in range(2)]
    simulate(states, bad)  # the step a GradScaler skips
    for s in states:
        assert all(torch.equal(e, torch.zeros_like(e)) for e in s.errors.values())
        assert torch.equal(s.q_flat, s.q_start)


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank must be an int >= 1"),
    ({"start_step": -1}, "start_step must be an int >= 0"),
    ({"min_compression_rate": -1}, "min_compression_rate must be >= 0"),
])
def test_bad_config_is_one_line_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        PowerSGD(**kwargs)
    assert "try" in str(info.value) and "\n" not in str(info.value)


# -- 2 ranks through the launcher ---------------------------------------------------------------

def reference_run(steps, *, rank, start_step, accumulate=1, clip=None, world=2):
    """The worker script's training in one process: each rank's gradients computed here,
    averaged by ReferencePowerSGD, clipped, stepped by one torch SGD. Returns per-step params."""
    import sys
    torch.set_default_dtype(torch.float64)
    try:
        sys.argv = ["powersgd_train", "--out", "unused"]
        source = (SCRIPTS / "powersgd_train.py").read_text()
        net_src = source[source.index("class Net"):source.index("torch.set_default_dtype")]
        scope = {"torch": torch}
        exec(net_src, scope)
        torch.manual_seed(0)
        model = scope["Net"]()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        params = list(model.parameters())
        names = [n for n, _ in model.named_parameters()]
        ref = ReferencePowerSGD([q.shape for q in params], PowerSGD(rank=rank, start_step=start_step), world)
        history = []
        for step in range(steps):
            per_rank = []
            for r in range(world):
                model.zero_grad(set_to_none=True)
                for k in range(accumulate):
                    gen = torch.Generator().manual_seed(1000 * r + 10 * step + k)
                    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)
                    (torch.nn.functional.mse_loss(model(x), y) / accumulate).backward()
                per_rank.append([torch.zeros_like(q) if q.grad is None else q.grad.clone() for q in params])
            averaged = ref.average(per_rank)
            for q, g, n in zip(params, averaged, names):
                q.grad = None if n.startswith("unused") else g
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], clip)
            opt.step()
            history.append({n: q.detach().clone() for n, q in model.named_parameters()})
        return history
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_two_ranks_equal_the_reference_on_the_global_batch(tmp_path, engine):
    """Rank 2, 2 plain steps then 4 low-rank ones, 2 micro-batches per step, clipping after the
    decompression, and a layer no rank uses (never stepped, though SGD has weight decay); on
    both engines (our launcher with Horovod, torchrun with torch.distributed)."""
    out = tmp_path / "run.pt"
    args = ["--rank", "2", "--start-step", "2", "--steps", "6", "--accumulate", "2", "--clip", "0.5", "--out", out]
    if engine == "horovod":
        run_launch(["-np", "2"], SCRIPTS / "powersgd_train.py", args, timeout=240)
    else:
        run_torchrun(2, SCRIPTS / "powersgd_train.py", args, timeout=240)
    got = torch.load(out)["ranks"]
    want = reference_run(6, rank=2, start_step=2, accumulate=2, clip=0.5)
    for step in range(6):
        for n, w in want[step].items():
            for r in range(2):
                torch.testing.assert_close(got[r][step]["params"][n], w, rtol=1e-9, atol=1e-11,
                                           msg=f"rank {r} step {step} {n}")
    assert got[0][5]["grads"]["unused.weight"] is None
    # Horovod's polling threads at nice 19 while the step computes, from the first low-rank step
    # on; the training thread keeps its priority; the torch engine's threads are left alone
    for r in range(2):
        for step in range(6):
            main, others = got[r][step]["nice"]
            assert main == 0 and (19 in others) == (engine == "horovod" and step >= 2), (r, step, others)
    first = reference_run(1, rank=2, start_step=2)[0]  # ... and it moved nowhere
    assert torch.equal(got[0][5]["params"]["unused.weight"], first["unused.weight"])


@pytest.mark.parametrize("options,message", [
    ({"powersgd": PowerSGD(rank=2)}, "powersgd= is only used with compression='powersgd'"),
    ({"compression": "powersgd", "op": "adasum"}, "compression='powersgd' needs op='average'"),
    ({"compression": "powersgd", "powersgd": 4}, r"powersgd= takes a distrib.PowerSGD\(rank=..."),
    ({"compression": "powersgd", "shard": "optimizer"}, "does not combine with shard="),
])
def test_bad_wrap_options_are_one_line_with_the_fix(options, message):
    import distrib
    from distrib.context import Context
    model = torch.nn.Linear(2, 1)
    ctx = Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match=message) as info:
        distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx, **options)
    assert "\n" not in str(info.value)


@pytest.mark.timeout(400)
def test_kill_and_resume_is_bit_exact_and_another_world_size_restarts_the_error_feedback(tmp_path):
    """Killed right after the checkpoint of step 5 (error feedback, Q and step count in it),
    resumed: steps 5-7 equal an uninterrupted run's bit for bit. Resumed on 1 worker instead,
    the error feedback restarts at zero with a log line that says why."""
    common = ["--rank", "1", "--start-step", "2", "--steps", "8", "--save-every", "5"]
    killed_dir = assert_resume_after_a_kill_is_bit_exact(SCRIPTS / "powersgd_train.py", common, tmp_path, die_at=5,
                                                         steps=8)
    # at another world size the saved error feedback belongs to ranks that are not there
    other = run_launch(["-np", "1"], SCRIPTS / "powersgd_train.py",
                       [*common, "--ckpt-dir", killed_dir, "--out", tmp_path / "one.pt"])
    assert ("PowerSGD error feedback restarts at zero: the checkpoint was written by 2 ranks, this run has 1"
            in other.stderr)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_and_an_fp16_overflow_on_one_process(precision):
    """compression="powersgd" under bf16/fp16 autocast (one process, LocalComm): the steps run,
    clipping sees finite gradients; with fp16, a step whose loss overflows is skipped by the
    grad scaler and PowerSGD restarts its error feedback instead of carrying inf/NaN."""
    import distrib
    from distrib.context import Context
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    ctx = Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo")
    opt = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01), ctx, precision=precision,
                       max_grad_norm=1.0, compression="powersgd", powersgd=PowerSGD(rank=2, start_step=1))
    state = opt._powersgd
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)
        with opt.autocast():
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        if step == 2 and precision == "fp16":
            loss = loss * float("inf")  # overflows: the scaler skips this step
        before = [p.detach().clone() for p in model.parameters()]
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert moved == (not (step == 2 and precision == "fp16")), f"step {step}"
        assert all(torch.isfinite(e).all() for e in state.errors.values())
        assert torch.isfinite(state.q_flat).all()
    assert state.step == 4 and state.compressed  # three low-rank steps, through the overflow
    assert all(torch.isfinite(p).all() for p in model.parameters())
