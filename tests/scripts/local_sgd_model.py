"""The net, inner optimizers and batches of tests/scripts/local_sgd_train.py, shared with
tests/test_local_sgd.py, which replays the same training in one process."""
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.unused = torch.nn.Linear(3, 3)  # never in the forward pass
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def inner(params, kind):
    """--inner sgd (momentum, weight decay) or adamw."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


def batch(rank, step, k):
    """Rank ``rank``'s batch of step ``step``, micro-batch ``k``, in the default dtype."""
    gen = torch.Generator().manual_seed(1000 * rank + 10 * step + k)
    return torch.randn(4, 6, generator=gen), torch.randn(4, 1, generator=gen)
