"""From a trained run to a deployable model, verified against the trained weights.

    python -m distrib.export RUN_DIR_OR_CHECKPOINT OUT --format pt|torchscript|onnx [--quantize int8]

``pt`` is the self-contained ``distrib-model-v1`` file (weights + model config, loadable with
plain torch; train_lm writes the same as RUN_DIR/model.pt), ``torchscript`` loads with
``torch.jit.load`` alone, ``onnx`` with ONNX Runtime alone; both carry the tokenizer's vocab in
their metadata (``examples/serve.py`` needs nothing else). Each export is loaded back and compared
with the trained model on held-out text before it is renamed into place.

Modules: :mod:`~distrib.export.artifact` (the pt file, atomic output), :mod:`~distrib.export.source`
(checkpoint / run dir / model file), :mod:`~distrib.export.origin` (what the run records for the
export: the model's code and the held-out text), :mod:`~distrib.export.model` (model code and held-out text),
:mod:`~distrib.export.formats` (writers and loaders), :mod:`~distrib.export.verify` (the
measurements), :mod:`~distrib.export.pipeline` (one export), ``__main__`` (the command line).
"""
from distrib.export.artifact import FORMAT, INT8_FORMAT, ExportError, load_model_artifact, save_model_artifact
from distrib.export.origin import Origin, read_record, record as record_origin
from distrib.export.source import find_checkpoint, read_source

__all__ = ["FORMAT", "INT8_FORMAT", "ExportError", "load_model_artifact", "save_model_artifact", "find_checkpoint",
           "read_source", "Origin", "record_origin", "read_record"]
