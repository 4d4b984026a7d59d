"""python -m distrib.export: the command line of :mod:`distrib.export.pipeline`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import distrib.export as package
from distrib.checkpoint.store import CheckpointError
from distrib.export.artifact import ExportError, first_line
from distrib.export.formats import FORMATS
from distrib.export.pipeline import ExportRequest, export

PROG = "python -m distrib.export"


class _OneLineParser(argparse.ArgumentParser):
    """Errors as one line with the fix (argparse would print its usage block first)."""

    def error(self, message: str):
        sys.stderr.write(f"distrib.export: error: {message}; see {PROG} --help\n")
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _OneLineParser(prog=PROG, description=package.__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="a run dir (its newest valid checkpoint), a checkpoint folder "
                                             "(RUN_DIR/checkpoints/step-N) or a model file (RUN_DIR/model.pt)")
    p.add_argument("out", type=Path, help="the file to write, e.g. model.onnx")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="pt (default; onnx when OUT ends in .onnx), torchscript or onnx")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="dynamic int8 quantization of the Linear layers, with a size/loss/latency report")
    p.add_argument("--key", default="model", help="name of the model's state in the checkpoint (default: model)")
    p.add_argument("--model", default=None,
                   help="the model's code, FILE.py:NAME or module:NAME (default: as the run recorded it in "
                        "RUN_DIR/export.json or the model file); 'none' writes a pt file without it (verified "
                        "tensor by tensor)")
    p.add_argument("--corpus", default=None,
                   help="the text the model was trained on (default: as the run recorded it)")
    p.add_argument("--heldout-from", type=float, default=None,
                   help="where the corpus's held-out part starts, as a fraction (default: as the run recorded "
                        "it, else 0: all of it)")
    p.add_argument("--atol", type=float, default=1e-4, help="fp32: max |logit difference| allowed (default 1e-4)")
    p.add_argument("--max-loss-increase", type=float, default=0.02,
                   help="int8: largest relative rise of the held-out loss allowed (default 0.02 = 2 %%)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    fmt = args.format or ("onnx" if args.out.suffix == ".onnx" else "pt")
    try:
        request = ExportRequest(source=args.source, out=args.out, fmt=fmt, quantize=args.quantize, key=args.key,
                                model=args.model, corpus=args.corpus, heldout_from=args.heldout_from,
                                atol=args.atol, max_loss_increase=args.max_loss_increase)
        export(request)
    except (ExportError, CheckpointError, OSError) as exc:
        print(f"distrib.export: error: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
