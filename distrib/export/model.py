"""Rebuilding the trained model from its config, and the held-out text it is verified on.

A checkpoint holds a state dict and a config dict, not code: the export imports the model's
class from ``FILE.py:NAME`` (or ``package.module:NAME``), as the training run recorded it
(:mod:`distrib.export.origin`) or as ``--model`` names it. A class whose constructor takes a
dataclass (``GPT(cfg: GPTConfig)``) gets that dataclass built from the config dict; any other
callable gets the dict as keywords.

The models exported this way are token-id language models: ``forward(idx)`` with ``idx`` an
int64 ``[batch, seq]`` tensor returns logits ``[batch, seq, vocab]``, and the config carries the
tokenizer's ``vocab`` (a string, one character per id) and ``block_size`` (the longest ``seq``).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
import typing
import uuid
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from distrib.export.artifact import ExportError, first_line

EXAMPLE_SPEC = "examples/lm_model.py:GPT"  # only named in messages, as an example of the form


def load_factory(spec: str) -> Callable[..., torch.nn.Module]:
    """The callable named by ``FILE.py:NAME`` or ``module:NAME``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ExportError(f"--model {spec!r} is not FILE.py:NAME or module:NAME (e.g. {EXAMPLE_SPEC})")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ExportError(f"model code {where} not found; pass --model FILE.py:NAME")
            module_name = f"_distrib_export_model_{uuid.uuid4().hex[:8]}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module  # dataclasses look their module up while being built
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"cannot import the model code {where} ({type(exc).__name__}: {first_line(exc)}); "
                          "pass --model FILE.py:NAME") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ExportError(f"{where} has no class or function {name!r}; pass --model FILE.py:NAME")
    return factory


def _config_type(factory) -> type | None:
    """The dataclass the first constructor argument is annotated with, if any."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
        params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    except (NameError, TypeError, ValueError):
        return None
    hint = hints.get(params[0].name) if params else None
    return hint if dataclasses.is_dataclass(hint) else None


def instantiate(factory, config: Dict[str, Any]) -> torch.nn.Module:
    """A fresh (untrained) model of ``config``, in eval mode."""
    for key in ("vocab", "block_size"):
        if key not in config:
            raise ExportError(f"model config has no {key!r}: the export handles token-id language models whose "
                              "config carries 'vocab' and 'block_size' (like examples/lm_model.py's GPTConfig)")
    try:
        config_type = _config_type(factory)
        return (factory(config_type(**config)) if config_type else factory(**config)).eval()
    except Exception as exc:
        raise ExportError(f"the model config is damaged ({type(exc).__name__}: {first_line(exc)}); "
                          "export another checkpoint or pass the matching --model") from exc


def build_model(factory, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model in eval mode with the trained weights; a config or weights that do not fit are
    one ExportError (a damaged config is caught here, before anything is written)."""
    model = instantiate(factory, config)
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise ExportError(f"the weights do not fit the model config ({type(exc).__name__}: {first_line(exc)}); "
                          "export another checkpoint or pass the matching --model") from exc
    return model


def heldout_windows(corpus: Path, vocab: str, block_size: int, heldout_from: float = 0.0) -> torch.Tensor:
    """Every non-overlapping ``block_size + 1`` window of the corpus's held-out part (from the
    fraction ``heldout_from`` of it on: what the training run did not train on), int64
    ``[n, block_size + 1]``."""
    if not corpus.is_file():
        raise ExportError(f"held-out text {corpus} not found; pass --corpus FILE (the text the model was trained on)")
    text = corpus.read_text(encoding="utf-8")
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(text) - index.keys())
    if unknown:
        raise ExportError(f"{corpus} has characters {''.join(unknown[:10])!r} that are not in the model's vocab; "
                          "pass --corpus with the text the model was trained on")
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    val = ids[int(len(ids) * heldout_from):]
    starts = range(0, len(val) - block_size - 1, block_size)
    if not starts:
        raise ExportError(f"{corpus} is too short to hold out one sequence of {block_size + 1} characters")
    return torch.stack([val[s:s + block_size + 1] for s in starts])
