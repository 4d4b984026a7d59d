"""A recurrent character-level language model and its token stream, in plain PyTorch.

The shape of PyTorch's word_language_model example: the training text is cut into ``columns``
contiguous streams (``batchify``), and each step reads the next ``bptt`` tokens of every stream,
carrying the LSTM's hidden state from one step to the next (truncated backpropagation through
time). No distrib imports: examples/train_rnn.py and its single-process version share it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn

Hidden = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class RNNConfig:
    vocab_size: int
    emb: int = 64
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.0

    def to_dict(self) -> Dict:
        return asdict(self)


class RNNModel(nn.Module):
    def __init__(self, cfg: RNNConfig):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.Embedding(cfg.vocab_size, cfg.emb)
        self.rnn = nn.LSTM(cfg.emb, cfg.hidden, cfg.layers, dropout=cfg.dropout if cfg.layers > 1 else 0.0,
                           batch_first=True)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, x: torch.Tensor, hidden: Hidden) -> Tuple[torch.Tensor, Hidden]:
        """``x``: (columns, bptt) token ids -> logits (columns, bptt, vocab) and the next hidden state."""
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden

    def init_hidden(self, columns: int) -> Hidden:
        """The zero state of ``columns`` streams: (layers, columns, hidden) twice (LSTM's h and c)."""
        shape = (self.rnn.num_layers, columns, self.rnn.hidden_size)
        return torch.zeros(shape), torch.zeros(shape)


def batchify(ids: torch.Tensor, columns: int) -> torch.Tensor:
    """(columns, length): column ``c`` is the ``c``-th contiguous piece of the stream."""
    length = len(ids) // columns
    return ids[:length * columns].view(columns, length)


def chunk(data: torch.Tensor, i: int, bptt: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of chunk ``i`` of every column."""
    return data[:, i * bptt:(i + 1) * bptt], data[:, i * bptt + 1:(i + 1) * bptt + 1]


def chunks(data: torch.Tensor, bptt: int) -> int:
    """Whole chunks of ``bptt`` tokens (with their targets) in every column."""
    return (data.shape[1] - 1) // bptt


class StreamColumns(torch.utils.data.Dataset):
    """Item ``i * columns + c`` is chunk ``i`` of column ``c``: read in order (no shuffling), one
    global batch of ``columns`` items is one chunk of every column, and with ``distrib.ShardedLoader``
    each rank gets the same contiguous columns at every step."""

    def __init__(self, ids: torch.Tensor, columns: int, bptt: int):
        self.data, self.columns, self.bptt = batchify(ids, columns), columns, bptt
        self.chunks = chunks(self.data, bptt)

    def __len__(self) -> int:
        return self.chunks * self.columns

    def __getitem__(self, item: int) -> Tuple[torch.Tensor, torch.Tensor]:
        i, c = divmod(item, self.columns)
        x, y = chunk(self.data[c:c + 1], i, self.bptt)
        return x[0], y[0]
