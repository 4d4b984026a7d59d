"""Inference artifacts: one self-contained file with the weights and the model config.

    python -m distrib.export CHECKPOINT_OR_RUN_DIR OUT.pt [--key model]

writes ``{"model_state", "model_config", "format": "distrib-model-v1", "step"}``, the same
file ``examples/train_lm.py`` writes as ``RUN_DIR/model.pt``. Loading it needs plain torch
(``torch.load(path, weights_only=True)``): no Horovod, no launcher, no optimizer state.
"""
from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from distrib.checkpoint import store
from distrib.checkpoint.store import CheckpointError

FORMAT = "distrib-model-v1"


class ExportError(ValueError):
    """The input is not an exportable checkpoint or artifact; the message says why."""


def save_model_artifact(path, model_state: Mapping[str, torch.Tensor], model_config: Dict[str, Any],
                        step: Optional[int]) -> Path:
    """Write the inference artifact atomically (temporary file, fsync, rename): a reader never
    sees half a file. Call it on one rank (rank 0)."""
    if not isinstance(model_config, dict):
        raise ExportError(f"model_config must be a dict (e.g. GPTConfig.to_dict()), got {type(model_config).__name__}")
    path = Path(path)
    artifact = {"model_state": {k: v.detach().cpu() for k, v in model_state.items()},
                "model_config": dict(model_config), "format": FORMAT, "step": step}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            torch.save(artifact, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        store.fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_model_artifact(path) -> Dict[str, Any]:
    """Read and check an artifact written by :func:`save_model_artifact` (plain torch)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} is not a file; pass the OUT.pt written by python -m distrib.export or train_lm")
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{path} is not a readable model artifact ({type(exc).__name__}: {_first_line(exc)})") from exc
    if not isinstance(artifact, dict) or artifact.get("format") != FORMAT:
        raise ExportError(f"{path} is not a {FORMAT} artifact; export a checkpoint with python -m distrib.export")
    return artifact


def find_checkpoint(src) -> Path:
    """``src`` itself when it is a checkpoint folder, else the newest valid checkpoint of the run
    dir (or checkpoints dir) ``src``; damaged ones are skipped with a warning on stderr."""
    src = Path(src)
    if not src.is_dir():
        raise ExportError(f"{src} is not a directory; pass a checkpoint folder (.../step-00000100) or a run dir")
    if (src / store.MARKER).exists() or store.step_of(src) is not None:
        store.validate(src)
        return src
    root = src / "checkpoints" if (src / "checkpoints").is_dir() else src

    def warn(path: Path, reason: str) -> None:
        print(f"distrib.export: warning: skipping damaged checkpoint {path} ({reason})", file=sys.stderr)

    found, _ = store.newest_valid(root, warn)
    if found is None:
        raise ExportError(f"{src} holds no valid checkpoint (looked in {root})")
    return found


def export_checkpoint(src, out, key: str = "model") -> Dict[str, Any]:
    """Write the artifact of checkpoint (or newest of run dir) ``src`` to ``out``; return a summary."""
    folder = find_checkpoint(src)
    marker = store.read_marker(folder)
    if not marker.get("model_config"):
        raise ExportError(f"checkpoint {folder} was saved without model_config; "
                          "pass model_config= to CheckpointManager.save")
    saved = store.load_file(folder, store.STATE_FILE)["state"]
    if key not in saved:
        raise ExportError(f"checkpoint {folder} has no {key!r} state (it has {', '.join(sorted(saved))}); "
                          "pass --key NAME")
    save_model_artifact(out, saved[key], marker["model_config"], marker["step"])
    return {"checkpoint": str(folder), "out": str(out), "step": marker["step"], "tensors": len(saved[key])}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distrib.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a checkpoint folder (RUN_DIR/checkpoints/step-N) or a run dir")
    parser.add_argument("out", help="the artifact to write, e.g. model.pt")
    parser.add_argument("--key", default="model", help="name of the model's state in the checkpoint (default: model)")
    args = parser.parse_args(argv)
    try:
        summary = export_checkpoint(args.source, args.out, key=args.key)
    except (ExportError, CheckpointError, OSError) as exc:
        print(f"distrib.export: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {summary['out']} from {summary['checkpoint']} (step {summary['step']}, {summary['tensors']} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
