"""The models and synthetic batches every implementation trains on, built identically."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Tuple

import torch

REPO = Path(__file__).resolve().parents[2]
MLP_WIDTHS = (1024, 2048, 1024)  # 4,197,376 parameters


def build(name: str, batch_size: int, seed: int = 0) -> Tuple[torch.nn.Module, Callable]:
    """``(model, loss_fn)``: ``loss_fn(module)`` runs ``module`` (the model, or a wrapper of it
    such as DDP) forward on this worker's fixed batch and returns the loss."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(MLP_WIDTHS[0], MLP_WIDTHS[1]), torch.nn.ReLU(),
                                    torch.nn.Linear(MLP_WIDTHS[1], MLP_WIDTHS[2]))
        x, y = torch.randn(batch_size, MLP_WIDTHS[0]), torch.randn(batch_size, MLP_WIDTHS[2])
        return model, lambda m: torch.nn.functional.mse_loss(m(x), y)
    if name == "lm":
        sys.path.insert(0, str(REPO / "examples"))
        from lm_model import GPT, CharTokenizer, GPTConfig, load_corpus
        text = load_corpus()[:20000]
        tok = CharTokenizer.from_text(load_corpus())
        cfg = GPTConfig(vocab=tok.vocab)
        model = GPT(cfg)
        ids = torch.tensor(tok.encode(text))
        starts = torch.randint(0, len(ids) - cfg.block_size - 1, (batch_size,))
        idx = torch.stack([ids[s:s + cfg.block_size] for s in starts])
        tgt = torch.stack([ids[s + 1:s + cfg.block_size + 1] for s in starts])
        return model, lambda m: m(idx, tgt)
    raise ValueError(f"model {name!r} is not one of mlp, lm")


DEFAULT_BATCH = {"mlp": 64, "lm": 16}
