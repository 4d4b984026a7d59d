"""Train a recurrent (LSTM) character-level language model on the shipped corpus, data-parallel.

    python -m launch -np 2 examples/train_rnn.py --steps 600
    python -m launch --elastic --min-np 1 --max-np 2 -H host1:1,host2:1 examples/train_rnn.py

PyTorch's word_language_model, ported: the training text is cut into --batch-size stream columns
(the global batch), each step reads the next --bptt characters of every column and carries the
LSTM's hidden state to the next step (truncated BPTT). Each worker owns a contiguous block of
columns (ShardedLoader(shuffle=False)) and its block's hidden state (``run.rank_state``). At the
end of each pass over the text (an epoch) the validation loss is measured, the best one kept
(``run.state``, RUN_DIR/best.pt) and the learning rate divided by 4 when it did not improve
(ReduceLROnPlateau). All of it is in every checkpoint: a killed run resumes bit-exact. The
global batch stays --batch-size columns whatever the number of workers (keep_global_batch), so
an elastic shrink keeps the steps per epoch and the learning rate; the surviving workers take
over the dead one's columns with their hidden state (split_concat).

Writes RUN_DIR/metrics.jsonl (loss averaged over the workers, tokens/s), RUN_DIR/checkpoints/,
RUN_DIR/best.pt and, at the end, RUN_DIR/model.pt. The single-process script it was ported
from is tests/scripts/train_rnn_single.py.
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
from distrib.export import save_model_artifact  # noqa: E402
from lm_model import CORPUS_PATH, CharTokenizer, load_corpus  # noqa: E402
from rnn_model import RNNConfig, RNNModel, StreamColumns, batchify, chunk, chunks  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as train_lm.py does
        print(f"train_rnn: error: {message}; see python examples/train_rnn.py --help", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=16,
                   help="stream columns in all (the global batch; divisible by every number of workers)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="validation stream columns in all")
    p.add_argument("--bptt", type=int, default=32, help="characters per step of each column")
    p.add_argument("--lr", type=float, default=2.0, help="SGD learning rate (divided by 4 on a plateau)")
    p.add_argument("--clip", type=float, default=0.25, help="gradient norm clipping")
    p.add_argument("--anneal-threshold", type=float, default=0.0,
                   help="relative improvement of the validation loss below which the lr is annealed")
    p.add_argument("--emb", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--max-chars", type=int, default=0, help="use only the corpus' first characters (0: all)")
    p.add_argument("--corpus", type=Path, default=CORPUS_PATH)
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--run-dir", default="runs/rnn")
    p.add_argument("--resume", default="auto", help="auto (newest good checkpoint), none, or a checkpoint path")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (>= 2)")
    p.add_argument("--sync-checkpoint", action="store_true", help="write checkpoints in the foreground")
    p.add_argument("--commit-every", type=int, default=10, help="elastic mode: steps between in-memory commits")
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "eval_batch_size", "bptt", "emb", "hidden", "commit_every", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0: only at the end), got {args.checkpoint_every}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = distrib.init(seed=args.seed)
    if args.batch_size % ctx.size:
        raise ValueError(f"--batch-size {args.batch_size} (stream columns) cannot be split over {ctx.size} workers; "
                         "use a multiple of the number of workers")
    text = load_corpus(args.corpus)
    text = text[:args.max_chars] if args.max_chars else text
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    split = int(len(ids) * 0.9)
    train_set, val_data = StreamColumns(ids[:split], args.batch_size, args.bptt), batchify(ids[split:], args.eval_batch_size)
    config = RNNConfig(len(tokenizer.vocab), args.emb, args.hidden)
    model = RNNModel(config)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=args.lr), ctx, max_grad_norm=args.clip)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=0,
                                                         threshold=args.anneal_threshold)
    # In order, so that each worker reads its own columns at every step; the global batch (the
    # columns) stays the same when the number of workers changes.
    loader = distrib.ShardedLoader(train_set, args.batch_size // ctx.size, ctx, shuffle=False, keep_global_batch=True)

    def validation(ctx):  # this worker's validation columns, its own hidden state carried along them
        mine = val_data[distrib.eval_shard(len(val_data), ctx.rank, ctx.size)]
        hidden = model.init_hidden(len(mine))

        def loss_of(model, batch):
            nonlocal hidden
            logits, hidden = model(batch[0], hidden)
            return {"loss": criterion(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))}, batch[1].numel()
        return distrib.evaluate(model, [chunk(mine, i, args.bptt) for i in range(chunks(mine, args.bptt))] if len(mine)
                                else [], loss_of, ctx)

    def end_of_epoch(run):  # after this epoch's validation and annealing: keep the best, restart the streams
        if run.last_eval["loss"] < run.state["best"]:
            run.state["best"] = run.last_eval["loss"]
            if run.ctx.is_main:
                save_model_artifact(run.run_dir / "best.pt", model.state_dict(), config.to_dict(), run.step)
        run.rank_state["hidden"] = model.init_hidden(loader.batch_size)

    run = distrib.Run(ctx, args.run_dir, model=model, optimizer=optimizer, loader=loader, lr_scheduler=plateau,
                      evaluate=validation, eval_every="epoch", on_epoch_end=end_of_epoch, state={"best": math.inf},
                      rank_state={"hidden": model.init_hidden(loader.batch_size)},
                      reshard={"hidden": distrib.split_concat(dim=1)}, resume=args.resume,
                      checkpoint_every=args.checkpoint_every, keep=args.keep, async_save=not args.sync_checkpoint,
                      log_every=args.log_every, commit_every=args.commit_every, model_config=config.to_dict(),
                      seed=args.seed, average_logged=True, tokens_per_sample=args.bptt)
    distrib.rank0_print(ctx, f"training an LSTM of {sum(p.numel() for p in model.parameters()):,} parameters on "
                             f"{ctx.size} workers, {len(loader)} steps per epoch, steps {run.step}->{args.steps}")

    for _, (x, y) in run.steps(args.steps):
        logits, hidden = model(x, run.rank_state["hidden"])
        loss = criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        run.rank_state["hidden"] = tuple(h.detach() for h in hidden)  # carried, without its graph (truncated BPTT)
        run.log(loss=loss)

    if run.ctx.is_main:
        save_model_artifact(run.run_dir / "model.pt", model.state_dict(), config.to_dict(), run.step)
        print(f"validation loss {run.last_eval['loss']:.3f} (ppl {math.exp(run.last_eval['loss']):.1f}), "
              f"best {run.state['best']:.3f}; model written to {run.run_dir / 'model.pt'}")
    return 0


def cli() -> int:
    try:
        return main()
    except (ValueError, FileNotFoundError, distrib.CheckpointError, distrib.DistribSetupError) as exc:
        print(f"train_rnn: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
