"""Train a character-level GPT on the shipped corpus, data-parallel over Horovod workers.

    python -m launch -np 2 examples/train_lm.py            # or: make train
    horovodrun -np 2 python examples/train_lm.py           # plain Horovod works too

Writes RUN_DIR/metrics.jsonl, RUN_DIR/checkpoints/step-*/ and, at the end, RUN_DIR/model.pt.
Resumes from the newest good checkpoint in RUN_DIR by default (--resume auto).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distrib  # noqa: E402
from distrib.export import Origin, record_origin, save_model_artifact  # noqa: E402
from lm_model import CORPUS_PATH, CharDataset, CharTokenizer, GPT, GPTConfig, load_corpus  # noqa: E402

HELDOUT_FROM = 0.9  # trained on the first 90 % of the corpus, validated on the rest


class _Parser(argparse.ArgumentParser):
    """Errors as one line, not argparse's usage block: every worker prints it and the launcher
    repeats the failing rank's stderr, so a usage block would fill the screen three times."""

    def error(self, message: str):
        print(f"train_lm: error: {message}; see python examples/train_lm.py --help", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; raises ValueError naming a bad value and its fix (argparse's own errors exit 2)."""
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per worker per micro-batch")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate for ONE worker (scaled by --lr-scaling)")
    p.add_argument("--lr-scaling", choices=["linear", "sqrt", "none"], default="sqrt")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--run-dir", default="runs/lm")
    p.add_argument("--resume", default="auto", help="auto (newest good checkpoint), none, or a checkpoint path")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (>= 2)")
    p.add_argument("--sync-checkpoint", action="store_true", help="write checkpoints in the foreground")
    p.add_argument("--commit-every", type=int, default=10,
                   help="elastic mode: steps between in-memory commits (work lost when a worker dies)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation passes (0: only at the end)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--compression", choices=["none", "fp16"], default="none", help="gradient compression on the wire")
    p.add_argument("--shard", choices=["none", "optimizer", "gradients"], default="none",
                   help="split the optimizer state (optimizer), and the averaged gradients too (gradients), "
                        "across the workers: ZeRO stages 1 and 2")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--corpus", type=Path, default=CORPUS_PATH)
    p.add_argument("--sample-tokens", type=int, default=200, help="characters to generate at the end (0: none)")
    model = p.add_argument_group("model size (the defaults train in minutes on 2 CPU cores)")
    model.add_argument("--block-size", type=int, default=64)
    model.add_argument("--n-layer", type=int, default=2)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--n-embd", type=int, default=128)
    model.add_argument("--dropout", type=float, default=0.0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "accumulate", "log_every", "commit_every", "block_size", "n_layer",
                 "n_head", "n_embd"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # A negative interval would silently mean "every step" (step % -1 == 0).
    for name, zero in (("checkpoint_every", "only at the end"), ("eval_every", "only at the end"),
                       ("warmup", "no warm-up")):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: {zero}), got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.keep < 2:
        raise ValueError(f"--keep {args.keep} is too few: keep at least 2 checkpoints (the newest may be cut short "
                         "by a crash)")
    return args


def build_data(args, tokenizer: CharTokenizer, text: str):
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    split = int(len(ids) * HELDOUT_FROM)
    stride = args.block_size // 2  # overlapping windows: more samples from a small corpus
    return CharDataset(ids[:split], args.block_size, stride), CharDataset(ids[split:], args.block_size, args.block_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = distrib.init(seed=args.seed)
    text = load_corpus(args.corpus)
    tokenizer = CharTokenizer.from_text(text)
    config = GPTConfig(vocab=tokenizer.vocab, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    train_set, val_set = build_data(args, tokenizer, text)

    model = GPT(config).to(ctx.device)
    optimizer = distrib.wrap(model, torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1), ctx,
                             accumulate=args.accumulate, precision=args.precision,
                             compression=args.compression, max_grad_norm=args.max_grad_norm,
                             shard=None if args.shard == "none" else args.shard)
    schedule = distrib.LRSchedule(optimizer, base_lr=args.lr, world_size=ctx.size, total_steps=args.steps,
                                  warmup_steps=args.warmup, scaling=args.lr_scaling)
    on_gpu = ctx.device.type == "cuda"  # pinned host batches: their copies to the GPU do not block
    loader = distrib.ShardedLoader(train_set, args.batch_size, ctx, seed=args.seed, pin_memory=on_gpu)

    def validation(ctx):  # on every rank, with the current world (it changes under --elastic)
        batches = distrib.eval_loader(val_set, args.batch_size, ctx, pin_memory=on_gpu)
        # evaluate() moves each batch to the model's device; the loss stays a tensor until the end
        return distrib.evaluate(model, batches, lambda m, b: ({"loss": m(b[0], b[1])}, len(b[0])))

    run = distrib.Run(ctx, args.run_dir, model=model, optimizer=optimizer, loader=loader, schedule=schedule,
                      resume=args.resume, checkpoint_every=args.checkpoint_every, keep=args.keep,
                      async_save=not args.sync_checkpoint, evaluate=validation, eval_every=args.eval_every,
                      log_every=args.log_every, tensorboard=args.tensorboard, commit_every=args.commit_every,
                      model_config=config.to_dict(), seed=args.seed)
    # What `python -m distrib.export RUN_DIR` needs besides the checkpoints: this model's code and
    # the text held out from training.
    origin = Origin(model=f"{Path(__file__).resolve().with_name('lm_model.py')}:GPT",
                    corpus=str(Path(args.corpus).resolve()), heldout_from=HELDOUT_FROM)
    if run.ctx.is_main:
        record_origin(run.run_dir, origin)
    distrib.rank0_print(ctx, f"training {sum(p.numel() for p in model.parameters()):,} parameters on {ctx.size} "
                             f"workers ({ctx.controller}{', elastic' if ctx.elastic else ''}), "
                             f"steps {run.step}->{args.steps}, run dir {run.run_dir}")
    if run.step >= args.steps:
        distrib.rank0_print(ctx, f"{run.run_dir} is already at step {run.step} of --steps {args.steps}: nothing "
                                 "to train (raise --steps to continue it, or pass --resume none or another "
                                 "--run-dir to start over)")

    for _, batch in run.steps(args.steps):
        # wrap(accumulate=k), k > 1: each step is a list of k micro-batches, one backward each
        for x, y in (batch if args.accumulate > 1 else [batch]):
            with optimizer.autocast():
                loss = model(x.to(run.ctx.device, non_blocking=True), y.to(run.ctx.device, non_blocking=True))
            optimizer.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        run.log(loss=loss)

    if run.ctx.is_main:
        save_model_artifact(run.run_dir / "model.pt", model.state_dict(), config.to_dict(), run.step, origin=origin)
        print(f"validation loss {run.last_eval['loss']:.3f} (uniform guess: {math.log(config.vocab_size):.3f}); "
              f"model written to {run.run_dir / 'model.pt'}")
        if args.sample_tokens:
            prompt = torch.tensor([tokenizer.encode("The ")], device=ctx.device)
            out = model.generate(prompt, args.sample_tokens, temperature=0.8,
                                 generator=torch.Generator(device=ctx.device).manual_seed(args.seed))
            print("sample:\n" + tokenizer.decode(out[0].tolist()))
    return 0


def cli() -> int:
    """main() with the mistakes a user can make (bad flags for this checkpoint, a run directory
    that cannot be written, a broken Horovod) as one line on stderr and exit code 2, instead of
    a traceback; the launcher shows that line as the worker's failure."""
    try:
        return main()
    except (ValueError, FileNotFoundError, distrib.CheckpointError, distrib.DistribSetupError) as exc:
        print(f"train_lm: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
