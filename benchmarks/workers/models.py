"""The models and synthetic batches every implementation trains on, built identically.

    mlp   4.2 M parameters in 4 tensors: communication is a large share of the step
    lm    the example GPT (examples/lm_model.py), 0.43 M parameters in 26 tensors
    lm8   the example GPT at 8 layers (n_embd 128, block 64), 1.6 M parameters in 100 tensors, 2
          sequences per worker: the network section's model whose gradients (6.2 MiB) cost a
          1 Gbit/s link about as much time as its step computes
    conv  a small ResNet-style net with BatchNorm, 0.69 M parameters in 53 tensors: compute
          dominates and the gradients come as many small tensors
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Tuple

import torch

REPO = Path(__file__).resolve().parents[2]
MLP_WIDTHS = (1024, 2048, 1024)  # 4,197,376 parameters
CONV_WIDTH = 16                  # stages of 16, 32, 64, 128 channels
CONV_IMAGE = 32                  # 3 x 32 x 32 inputs, 10 classes
MODELS = ("mlp", "lm", "conv", "lm8")
DEFAULT_BATCH = {"mlp": 64, "lm": 16, "conv": 16, "lm8": 2}
LM8 = {"n_layer": 8, "n_embd": 128, "n_head": 4, "block_size": 64}


def _conv_block(cin: int, cout: int, stride: int) -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def conv_net(width: int = CONV_WIDTH) -> torch.nn.Module:
    """Eight two-conv blocks; the channels double (and the image halves) every second block."""
    nn = torch.nn
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, cout in enumerate((width, width, 2 * width, 2 * width, 4 * width, 4 * width, 8 * width, 8 * width)):
        layers.append(_conv_block(cin, cout, 2 if i % 2 == 0 and i > 0 else 1))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def build(name: str, batch_size: int, seed: int = 0) -> Tuple[torch.nn.Module, Callable]:
    """``(model, loss_fn)``: ``loss_fn(module)`` runs ``module`` (the model, or a wrapper of it
    such as DDP) forward on this worker's fixed batch and returns the loss."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(MLP_WIDTHS[0], MLP_WIDTHS[1]), torch.nn.ReLU(),
                                    torch.nn.Linear(MLP_WIDTHS[1], MLP_WIDTHS[2]))
        x, y = torch.randn(batch_size, MLP_WIDTHS[0]), torch.randn(batch_size, MLP_WIDTHS[2])
        return model, lambda m: torch.nn.functional.mse_loss(m(x), y)
    if name in ("lm", "lm8"):
        sys.path.insert(0, str(REPO / "examples"))
        from lm_model import GPT, CharTokenizer, GPTConfig, load_corpus
        text = load_corpus()[:20000]
        tok = CharTokenizer.from_text(load_corpus())
        cfg = GPTConfig(vocab=tok.vocab, **(LM8 if name == "lm8" else {}))
        model = GPT(cfg)
        ids = torch.tensor(tok.encode(text))
        starts = torch.randint(0, len(ids) - cfg.block_size - 1, (batch_size,))
        idx = torch.stack([ids[s:s + cfg.block_size] for s in starts])
        tgt = torch.stack([ids[s + 1:s + cfg.block_size + 1] for s in starts])
        return model, lambda m: m(idx, tgt)
    if name == "conv":
        model = conv_net()
        x, y = torch.randn(batch_size, 3, CONV_IMAGE, CONV_IMAGE), torch.randint(0, 10, (batch_size,))
        return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)
    raise ValueError(f"model {name!r} is not one of {', '.join(MODELS)}")


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
