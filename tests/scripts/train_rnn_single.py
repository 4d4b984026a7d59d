"""The single-process version of examples/train_rnn.py (what a user starts from): plain PyTorch.

    python tests/scripts/train_rnn_single.py --steps 60 --out final.pt

The same training with the same flags; tests/test_train_rnn.py compares the distributed
example against it (the README counts the lines from this to the full example).
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from lm_model import CharTokenizer, load_corpus  # noqa: E402
from rnn_model import RNNConfig, RNNModel, batchify, chunk, chunks  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=600)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--eval-batch-size", type=int, default=8)
p.add_argument("--bptt", type=int, default=32)
p.add_argument("--lr", type=float, default=2.0)
p.add_argument("--clip", type=float, default=0.25)
p.add_argument("--anneal-threshold", type=float, default=0.0)
p.add_argument("--emb", type=int, default=64)
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--max-chars", type=int, default=0)
p.add_argument("--seed", type=int, default=1111)
p.add_argument("--out", default="model.pt")
args = p.parse_args()

torch.manual_seed(args.seed)
text = load_corpus()
text = text[:args.max_chars] if args.max_chars else text
tokenizer = CharTokenizer.from_text(text)
ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
split = int(len(ids) * 0.9)
train_data, val_data = batchify(ids[:split], args.batch_size), batchify(ids[split:], args.eval_batch_size)
model = RNNModel(RNNConfig(len(tokenizer.vocab), args.emb, args.hidden))
criterion = torch.nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=0,
                                                     threshold=args.anneal_threshold)


def evaluate(data):
    model.eval()
    hidden, total = model.init_hidden(data.shape[0]), 0.0
    with torch.no_grad():
        for i in range(chunks(data, args.bptt)):
            x, y = chunk(data, i, args.bptt)
            logits, hidden = model(x, hidden)
            total += criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    model.train()
    return total / chunks(data, args.bptt)


step, best, losses, lrs, vals = 0, float("inf"), [], [], []
while step < args.steps:
    hidden = model.init_hidden(args.batch_size)
    for i in range(chunks(train_data, args.bptt)):
        x, y = chunk(train_data, i, args.bptt)
        hidden = tuple(h.detach() for h in hidden)  # truncated BPTT: carry the state, not its graph
        logits, hidden = model(x, hidden)
        loss = criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if i == chunks(train_data, args.bptt) - 1:  # the end of an epoch
            val = evaluate(val_data)
            vals.append(val)
            print(f"step {step} validation loss {val:.3f} ppl {math.exp(val):.1f}")
            if val < best:
                best = val
                torch.save(model.state_dict(), args.out + ".best")
            plateau.step(val)
        if step == args.steps:
            break
torch.save({"model": model.state_dict(), "hidden": hidden, "best": best, "losses": losses, "lrs": lrs,
            "vals": vals}, args.out)
