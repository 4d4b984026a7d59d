"""Generate text from an exported model, with nothing from this repository: ONNX Runtime (+ numpy)
for an .onnx file, torch alone for a TorchScript file.

    python -m distrib.export runs/lm model.onnx --format onnx            # once, in the repository
    python examples/serve.py model.onnx --prompt "The " --tokens 200 --temperature 0.8 --seed 0

Copy this file and the model anywhere: the tokenizer's vocab and the context length travel inside
the model (ONNX metadata / a TorchScript extra file, key "distrib"), so nothing else is needed.
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

SERVE_FORMAT = "distrib-serve-v1"  # what python -m distrib.export writes, repeated: no import of it here
METADATA_KEY, TORCHSCRIPT_EXTRA = "distrib", "distrib.json"


class ServeError(ValueError):
    """A model or prompt that cannot be served; the one-line message says why."""


def load(path: Path):
    """``(run, meta)``: ``run`` maps int64 ids ``[batch, seq]`` to float logits ``[batch, seq, vocab]``."""
    if not path.is_file():
        raise ServeError(f"{path} is not a file; pass the output of python -m distrib.export --format onnx|torchscript")
    try:
        if zipfile.is_zipfile(path):  # a TorchScript archive is a zip file; an ONNX model is protobuf
            if not any("/code/" in name for name in zipfile.ZipFile(path).namelist()):
                raise ServeError(f"{path} is a torch.save file (--format pt), not TorchScript; serve it with "
                                 "examples/generate.py, or export --format torchscript or onnx")
            run, text = _load_torchscript(path)
        else:
            run, text = _load_onnx(path)
        meta = json.loads(text)
    except ServeError:
        raise
    except Exception as exc:
        raise ServeError(f"{path} is not a model exported by python -m distrib.export --format onnx|torchscript "
                         f"({type(exc).__name__})") from exc
    if not isinstance(meta, dict) or meta.get("format") != SERVE_FORMAT:
        raise ServeError(f"{path} has no {SERVE_FORMAT} metadata; export it again with python -m distrib.export")
    return run, meta


def _load_torchscript(path: Path):
    import torch
    files = {TORCHSCRIPT_EXTRA: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(ids)).float().numpy()
    return run, files[TORCHSCRIPT_EXTRA]


def _load_onnx(path: Path):
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if meta is None:
        raise ServeError(f"{path} has no {SERVE_FORMAT} metadata; export it again with python -m distrib.export")
    name = session.get_inputs()[0].name
    return (lambda ids: session.run(None, {name: ids})[0]), meta


def generate(run, block_size: int, ids: list, tokens: int, temperature: float, seed: int) -> list:
    """Append ``tokens`` ids, each from the logits of the last ``block_size`` ids (greedy at 0)."""
    rng = np.random.default_rng(seed)
    ids = list(ids)
    for _ in range(tokens):
        logits = run(np.array([ids[-block_size:]], dtype=np.int64))[0, -1].astype(np.float64)
        if temperature <= 0:
            ids.append(int(logits.argmax()))
            continue
        z = logits / temperature
        p = np.exp(z - z.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate text from a model exported as ONNX or TorchScript.")
    parser.add_argument("model", type=Path, help="an .onnx or TorchScript file from python -m distrib.export")
    parser.add_argument("--prompt", default="\n", help="text to continue (characters of the training corpus)")
    parser.add_argument("--tokens", type=int, default=200, help="characters to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = more random")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    args = parser.parse_args(argv)
    if args.tokens < 0 or args.temperature < 0:
        parser.error("--tokens and --temperature must be >= 0")
    try:
        run, meta = load(args.model)
        vocab = meta["vocab"]
        unknown = sorted(set(args.prompt) - set(vocab))
        if unknown or not args.prompt:
            raise ServeError(f"--prompt must be non-empty text of the model's vocabulary; {unknown!r} are not in it")
    except ServeError as exc:
        print(f"serve.py: error: {exc}", file=sys.stderr)
        return 2
    ids = generate(run, meta["block_size"], [vocab.index(ch) for ch in args.prompt], args.tokens,
                   args.temperature, args.seed)
    print("".join(vocab[i] for i in ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
