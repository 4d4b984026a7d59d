"""Generate text with a trained character-level GPT, on one process with plain PyTorch.

    python examples/generate.py runs/lm/model.pt --prompt "The " --tokens 200 --temperature 0.8 --seed 0

The model file is the artifact train_lm.py writes as RUN_DIR/model.pt, or the output of
``python -m distrib.export RUN_DIR OUT.pt``. No Horovod and no launcher are needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_model import GPT, CharTokenizer, GPTConfig  # noqa: E402

FORMAT = "distrib-model-v1"  # distrib.export.FORMAT, repeated so this file needs torch only


def load_model(path: Path) -> GPT:
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass RUN_DIR/model.pt or the output of python -m distrib.export")
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable model file ({type(exc).__name__})") from exc
    if not isinstance(artifact, dict) or artifact.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file; a checkpoint folder must be exported first "
                         "with python -m distrib.export")
    try:
        model = GPT(GPTConfig.from_dict(artifact["model_config"]))
        model.load_state_dict(artifact["model_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: its weights do not fit its model config ({first_line}); "
                         "export it again with python -m distrib.export") from exc
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate text with a trained char-level GPT.")
    parser.add_argument("model", type=Path, help="model artifact (RUN_DIR/model.pt or distrib.export output)")
    parser.add_argument("--prompt", default="\n", help="text to continue (characters of the training corpus)")
    parser.add_argument("--tokens", type=int, default=200, help="characters to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = more random")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    args = parser.parse_args(argv)
    if args.tokens < 0:
        parser.error(f"--tokens must be >= 0, got {args.tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    try:
        model = load_model(args.model)
        tokenizer = CharTokenizer(model.config.vocab)
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise ValueError("--prompt is empty; give at least one character")
    except ValueError as exc:
        print(f"generate.py: error: {exc}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.tokens, temperature=args.temperature, generator=generator)
    print(tokenizer.decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
