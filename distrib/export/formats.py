"""Writing a model as pt / TorchScript / ONNX (fp32 or dynamic int8), and loading each back the
way a deployment does (``torch.load``, ``torch.jit.load``, ONNX Runtime) for verification.

Every artifact carries what serving needs besides the weights, under the key ``distrib`` (the
ONNX model's metadata, a ``distrib.json`` extra file of the TorchScript archive): the vocab,
block_size, step, quantization and the I/O contract. ``examples/serve.py`` reads it from there.

onnx / onnxruntime are imported only when an ONNX export is asked for.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from distrib.export.artifact import FORMAT, INT8_FORMAT, load_model_artifact, write_artifact
from distrib.export.model import build_model, instantiate

FORMATS = ("pt", "torchscript", "onnx")
SERVE_FORMAT = "distrib-serve-v1"
METADATA_KEY = "distrib"
TORCHSCRIPT_EXTRA = "distrib.json"
INPUT, OUTPUT = "idx", "logits"
Runner = Callable[[torch.Tensor], torch.Tensor]  # int64 [batch, seq] -> float32 logits [batch, seq, vocab]


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' deprecation warnings and progress logs: the export prints its own
    summary, and its verification (not a warning) decides whether the artifact is right."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def serving_metadata(config: Dict[str, Any], step, quantization: str) -> Dict[str, Any]:
    return {"format": SERVE_FORMAT, "vocab": config["vocab"], "block_size": int(config["block_size"]),
            "step": step, "quantization": quantization, "model_config": config,
            "input": f"{INPUT}: int64 [batch, seq], 1 <= seq <= block_size",
            "output": f"{OUTPUT}: float32 [batch, seq, len(vocab)]"}


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch's post-training dynamic quantization: Linear weights stored as int8 (per tensor),
    activations quantized on the fly; embeddings and LayerNorms stay fp32."""
    from torch.ao.quantization import quantize_dynamic
    with _quiet():
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


# -- writing ---------------------------------------------------------------------------------------
def write(fmt: str, model: torch.nn.Module, path: Path, example: torch.Tensor, meta: Dict[str, Any]) -> None:
    """Write ``model`` (fp32, or already quantized by :func:`quantize_int8` for pt/torchscript) to
    ``path`` in ``fmt``. ``example`` is an input of the model's shape contract, used for tracing."""
    if fmt == "pt":
        fmt_name = INT8_FORMAT if meta["quantization"] != "none" else FORMAT
        write_artifact(path, model.state_dict(), meta["model_config"], meta["step"], fmt=fmt_name)
    elif fmt == "torchscript":
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, (example,), check_trace=False)
        with open(path, "wb") as f:  # a file object, so the archive is not named after the temporary file
            torch.jit.save(traced, f, _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})
    elif fmt == "onnx":
        _write_onnx(model, path, example, meta)
    else:
        raise AssertionError(f"unknown format {fmt}")  # the CLI offers only FORMATS


def _write_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor, meta: Dict[str, Any]) -> None:
    from torch.export import Dim
    # Batch and sequence length are dynamic; the position table caps the sequence at block_size.
    shapes = {INPUT: {0: Dim("batch"), 1: Dim("seq", max=meta["block_size"])}}
    with _quiet():
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=shapes, verbose=False)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    program.save(str(path), external_data=False)


def quantize_onnx(fp32_path: Path, path: Path, meta: Dict[str, Any]) -> None:
    """ONNX Runtime's dynamic quantization of the fp32 ONNX file: int8 MatMul weights."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with _quiet():
        disabled = logging.root.manager.disable
        logging.disable(logging.WARNING)  # "consider pre-processing": a hint about static quantization
        try:
            quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8)
        finally:
            logging.disable(disabled)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save(proto, str(path))


# -- loading back ------------------------------------------------------------------------------------
def load(fmt: str, path: Path, factory=None) -> Runner:
    """The artifact at ``path`` loaded as a deployment would, as a function of a token batch."""
    if fmt == "pt":
        model = load_pt(path, factory)
        return lambda idx: _no_grad(model, idx)
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        return lambda idx: _no_grad(module, idx)
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as the torch side (OMP_NUM_THREADS)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda idx: torch.from_numpy(session.run([OUTPUT], {INPUT: idx.numpy()})[0])


def load_pt(path: Path, factory) -> torch.nn.Module:
    """A pt artifact (fp32 or int8) back into a model built by ``factory`` from its config."""
    with _quiet():  # torch.load of quantized tensors warns about TypedStorage, inside torch
        artifact = load_model_artifact(path, formats=(FORMAT, INT8_FORMAT))
    config = artifact["model_config"]
    if artifact["format"] == FORMAT:
        return build_model(factory, config, artifact["model_state"])
    model = quantize_int8(instantiate(factory, config))
    model.load_state_dict(artifact["model_state"])  # weights that do not fit raise: the caller reports it
    return model.eval()


def _no_grad(module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(idx)


def read_metadata(fmt: str, path: Path) -> Dict[str, Any]:
    """The ``distrib`` metadata embedded in a torchscript or onnx artifact."""
    if fmt == "torchscript":
        files = {TORCHSCRIPT_EXTRA: ""}
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        return json.loads(files[TORCHSCRIPT_EXTRA])
    import onnx
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[METADATA_KEY])
