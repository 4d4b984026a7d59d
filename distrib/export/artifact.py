"""The self-contained model file (weights + model config) and the atomic write of any export.

``distrib-model-v1`` is what ``examples/train_lm.py`` writes as ``RUN_DIR/model.pt`` and what
``python -m distrib.export ... --format pt`` writes: ``{"model_state", "model_config", "format",
"step"}``, loadable with plain ``torch.load(path, weights_only=True)``. ``--quantize int8`` writes
``distrib-model-int8-v1`` instead: the state dict of the dynamically quantized model, which only
loads into a model quantized the same way (:func:`distrib.export.formats.load_pt`).
"""
from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from distrib.checkpoint import store

FORMAT = "distrib-model-v1"
INT8_FORMAT = "distrib-model-int8-v1"


class ExportError(ValueError):
    """The input cannot be exported or the output cannot be written; the one-line message says why."""


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class PendingOutput:
    """``out`` written under a temporary name in its own folder and renamed into place only by
    :meth:`commit`, so a failed or refused export leaves nothing behind: not the temporary file,
    not the folders created for it. Opening it creates the (empty) temporary file at once, which
    proves the path writable before any slow work starts."""

    def __init__(self, out) -> None:
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._created: List[Path] = []
        self._committed = False

    def __enter__(self) -> "PendingOutput":
        if self.out.is_dir():
            raise ExportError(f"output {self.out} is a directory; pass a file name such as {self.out / 'model.onnx'}")
        try:
            missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as exc:
            self.discard()
            raise ExportError(f"cannot write {self.out}: {exc.strerror or exc}; choose another output path") from None
        return self

    def commit(self) -> Path:
        """fsync the finished temporary file, rename it to ``out``, fsync the folder."""
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.out)
        store.fsync_dir(self.out.parent)
        self._committed = True
        return self.out

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                pass  # someone else put something there meanwhile: not ours to remove
        self._created = []

    def __exit__(self, *exc_info) -> None:
        if not self._committed:
            self.discard()


def write_artifact(path, model_state: Mapping[str, Any], model_config: Dict[str, Any], step: Optional[int],
                   fmt: str = FORMAT, origin=None) -> None:
    """``torch.save`` the artifact dict to ``path`` as it is (no temporary name: see PendingOutput).
    ``origin`` (:class:`distrib.export.origin.Origin`) goes in as a plain dict under ``"origin"``."""
    if not isinstance(model_config, dict):
        raise ExportError(f"model_config must be a dict (e.g. GPTConfig.to_dict()), got {type(model_config).__name__}")
    state = OrderedDict((k, v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in model_state.items())
    # The per-module versions: a quantized Linear reads its packed weights only when told its version.
    state._metadata = getattr(model_state, "_metadata", None)
    artifact = {"model_state": state, "model_config": dict(model_config), "format": fmt, "step": step}
    if origin is not None:
        artifact["origin"] = origin.to_dict()
    torch.save(artifact, path)


def save_model_artifact(path, model_state: Mapping[str, torch.Tensor], model_config: Dict[str, Any],
                        step: Optional[int], origin=None) -> Path:
    """Write the inference artifact atomically (temporary file, fsync, rename): a reader never
    sees half a file. ``origin`` (:class:`distrib.export.origin.Origin`: the model's code and the
    held-out text) lets ``python -m distrib.export`` re-export it without being told them. Call
    it on one rank (rank 0)."""
    if not isinstance(model_config, dict):
        raise ExportError(f"model_config must be a dict (e.g. GPTConfig.to_dict()), got {type(model_config).__name__}")
    with PendingOutput(path) as pending:
        write_artifact(pending.tmp, model_state, model_config, step, origin=origin)
        return pending.commit()


def load_model_artifact(path, formats=(FORMAT,)) -> Dict[str, Any]:
    """Read and check an artifact written by :func:`save_model_artifact` (plain torch)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} is not a file; pass the OUT.pt written by python -m distrib.export or train_lm")
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{path} is not a readable model artifact ({type(exc).__name__}: {first_line(exc)})") from exc
    if not isinstance(artifact, dict) or artifact.get("format") not in formats:
        raise ExportError(f"{path} is not a {' or '.join(formats)} artifact; export a checkpoint with "
                          "python -m distrib.export")
    return artifact
