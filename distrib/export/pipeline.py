"""One export: read the trained model, write the artifact under a temporary name, load it back the
way a deployment does, compare it with the trained model on held-out text, and only then rename
it into place. A refused or failed export leaves nothing behind."""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from distrib.export import formats
from distrib.export.artifact import ExportError, PendingOutput, first_line
from distrib.export.model import EXAMPLE_SPEC, build_model, heldout_windows, load_factory
from distrib.export.source import Source, read_source
from distrib.export.verify import max_abs_diff, mean_loss, side_by_side_ms

CHECK_SEQUENCES = 8       # held-out sequences the logits are compared on
LATENCY_BATCH = 32        # sequences per timed batch (train_lm's default batch size)
ENGINES = {"pt": "torch.load + the model code", "torchscript": "torch.jit.load", "onnx": "ONNX Runtime"}
WEIGHTS_ONLY = "none"     # --model none: a pt file of the weights, no model code


@dataclass(frozen=True)
class ExportRequest:
    source: Path
    out: Path
    fmt: str = "pt"
    quantize: Optional[str] = None                 # None or "int8"
    key: str = "model"                             # the model's entry in the checkpoint state
    # None: as the training run recorded it (distrib.export.origin), else the export asks for it
    model: Optional[str] = None                    # FILE.py:NAME or module:NAME; "none": pt only, weights
    #                                                compared bit for bit, no code needed
    corpus: Optional[str] = None                   # the text the model was trained on
    heldout_from: Optional[float] = None           # where its held-out part starts (a fraction of the text)
    atol: float = 1e-4                             # fp32: max |logit difference| allowed
    max_loss_increase: float = 0.02                # int8: held-out loss may rise by this fraction at most

    def __post_init__(self) -> None:
        if self.fmt not in formats.FORMATS:
            raise ExportError(f"unknown format {self.fmt!r}; choose one of {', '.join(formats.FORMATS)}")
        if self.quantize not in (None, "int8"):
            raise ExportError(f"unknown --quantize {self.quantize!r}; the one offered is int8")
        if self.model == WEIGHTS_ONLY and (self.fmt != "pt" or self.quantize):
            raise ExportError(f"--format {self.fmt}{' --quantize int8' if self.quantize else ''} needs the model "
                              "code; pass --model FILE.py:NAME")
        if not self.atol > 0 or not self.max_loss_increase > 0:
            raise ExportError("--atol and --max-loss-increase must be > 0")


def export(req: ExportRequest, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the export of ``req``; return its figures. Raises ExportError (or CheckpointError) with
    a one-line message and writes nothing when the input is bad or the verification fails."""
    src = read_source(req.source, req.key)
    if req.model == WEIGHTS_ONLY:
        with PendingOutput(req.out) as pending:
            return _export_weights_only(src, pending, say)
    origin = src.recorded.overridden(req.model, req.corpus, req.heldout_from)
    if origin.model is None:
        raise ExportError(f"{src.origin} does not record the model's code; pass --model FILE.py:NAME "
                          f"(e.g. {EXAMPLE_SPEC}), or --model none for a pt file of the weights alone")
    if origin.corpus is None:
        raise ExportError(f"{src.origin} does not record the text it was trained on; pass --corpus FILE "
                          "(and --heldout-from F: where its held-out part starts, e.g. 0.9 for the last 10 %)")
    factory = load_factory(origin.model)
    model = build_model(factory, src.config, src.state)
    block = int(src.config["block_size"])
    windows = heldout_windows(Path(origin.corpus), src.config["vocab"], block, origin.heldout_from)
    # Checked shapes differ from the traced example's, so a graph that froze a shape fails here.
    checks = [windows[:CHECK_SEQUENCES, :-1], windows[:1, :min(5, block)]]
    example = windows[:2, :max(2, block // 2)]
    say(f"exporting step {src.step} of {src.origin} to {req.out} ({req.fmt}{', int8' if req.quantize else ''})")
    with PendingOutput(req.out) as pending, tempfile.TemporaryDirectory() as scratch:
        if req.quantize:
            result = _export_int8(req, factory, model, src, windows, checks, example, pending, Path(scratch), say)
        else:
            result = _export_fp32(req, factory, model, src, checks, example, pending, say)
        pending.commit()
    say(f"wrote {req.out} ({req.out.stat().st_size:,} bytes)")
    return result


def _reference(model):
    def run(idx):
        with torch.no_grad():
            return model(idx)
    return run


def _write(fmt, model, path, example, meta) -> None:
    try:
        formats.write(fmt, model, path, example, meta)
    except OSError as exc:
        raise ExportError(f"cannot write {path.parent}: {exc.strerror or exc}; choose another output path") from exc
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"the {fmt} exporter failed on this model ({type(exc).__name__}: {first_line(exc)})") from exc


def _export_fp32(req, factory, model, src: Source, checks, example, pending, say) -> Dict[str, Any]:
    meta = formats.serving_metadata(src.config, src.step, "none")
    _write(req.fmt, model, pending.tmp, example, meta)
    diff = max_abs_diff(formats.load(req.fmt, pending.tmp, factory), _reference(model), checks)
    shape = f"{len(checks[0])} held-out sequences of {checks[0].shape[1]} tokens and a 1 x {checks[1].shape[1]} prompt"
    say(f"verified with {ENGINES[req.fmt]} on {shape}: max |logit difference| {diff:.2e} (tolerance {req.atol:.0e})")
    if not diff <= req.atol:
        raise ExportError(f"refused: the {req.fmt} artifact differs from the trained model by {diff:.2e} > "
                          f"--atol {req.atol:.0e} (max |logit difference| on held-out text); nothing written")
    return {"format": req.fmt, "max_abs_diff": diff, "step": src.step}


def _export_int8(req, factory, model, src: Source, windows, checks, example, pending, scratch: Path, say
                 ) -> Dict[str, Any]:
    fp32_path = scratch / f"fp32.{req.fmt}"
    _write(req.fmt, model, fp32_path, example, formats.serving_metadata(src.config, src.step, "none"))
    meta = formats.serving_metadata(src.config, src.step, "dynamic-int8")
    if req.fmt == "onnx":
        try:
            formats.quantize_onnx(fp32_path, pending.tmp, meta)
        except Exception as exc:
            raise ExportError(f"ONNX Runtime's quantization failed ({type(exc).__name__}: {first_line(exc)})") from exc
    else:
        _write(req.fmt, formats.quantize_int8(copy.deepcopy(model)), pending.tmp, example, meta)
    fp32, int8 = formats.load(req.fmt, fp32_path, factory), formats.load(req.fmt, pending.tmp, factory)
    figures = {"format": req.fmt, "step": src.step,
               "bytes_fp32": fp32_path.stat().st_size, "bytes_int8": pending.tmp.stat().st_size,
               "val_loss_fp32": mean_loss(_reference(model), windows), "val_loss_int8": mean_loss(int8, windows),
               "max_abs_diff": max_abs_diff(int8, _reference(model), checks)}
    batch = windows[:LATENCY_BATCH, :-1]
    ms = side_by_side_ms({"fp32": fp32, "int8": int8}, batch)
    figures.update(ms_fp32=ms["fp32"], ms_int8=ms["int8"], sequences=len(windows))
    rise = figures["val_loss_int8"] / figures["val_loss_fp32"] - 1
    say(f"int8 (dynamic quantization of the Linear layers) vs fp32, both as {req.fmt} through {ENGINES[req.fmt]}:")
    say(f"  file size     {figures['bytes_fp32']:>11,} B -> {figures['bytes_int8']:>11,} B   "
        f"{figures['bytes_fp32'] / figures['bytes_int8']:.2f}x smaller")
    say(f"  val loss      {figures['val_loss_fp32']:>13.4f} -> {figures['val_loss_int8']:>13.4f}   {rise:+.2%} "
        f"({len(windows)} held-out sequences; limit +{req.max_loss_increase:.0%})")
    say(f"  CPU latency   {ms['fp32']:>10.2f} ms -> {ms['int8']:>10.2f} ms   {ms['fp32'] / ms['int8']:.2f}x "
        f"(batch {batch.shape[0]} x {batch.shape[1]}, median of 20 alternating calls)")
    say(f"  max |logit difference| {figures['max_abs_diff']:.2e} (for information; int8 is judged by the loss)")
    if not rise <= req.max_loss_increase:
        raise ExportError(f"refused: int8 raises the held-out loss by {rise:.2%} > --max-loss-increase "
                          f"{req.max_loss_increase:.0%}; nothing written (ship fp32, or raise the limit)")
    return figures


def _export_weights_only(src: Source, pending: PendingOutput, say) -> Dict[str, Any]:
    """``--model none``: the pt file without the model code; verified by reading it back tensor for tensor."""
    from distrib.export.artifact import load_model_artifact, write_artifact
    write_artifact(pending.tmp, src.state, src.config, src.step)
    back = load_model_artifact(pending.tmp)["model_state"]
    same = back.keys() == src.state.keys() and all(torch.equal(back[k], v) for k, v in src.state.items())
    if not same:
        raise ExportError(f"refused: {pending.out} read back differs from the checkpoint's weights; nothing written")
    say(f"verified with torch.load: {len(back)} tensors equal bit for bit")
    pending.commit()
    say(f"wrote {pending.out} ({pending.out.stat().st_size:,} bytes)")
    return {"format": "pt", "step": src.step, "max_abs_diff": 0.0}
