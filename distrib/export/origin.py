"""What an export needs besides the weights and the config: the model's code and the held-out text.

A checkpoint holds a state dict and a config dict, not the code that builds the model, and not
which text the run held out. The training script knows both and records them once:
:func:`record` writes ``RUN_DIR/export.json`` (every checkpoint of the run shares it), and
:func:`distrib.export.save_model_artifact` takes the same :class:`Origin` into a model file.
``python -m distrib.export`` reads it from there; ``--model``, ``--corpus`` and
``--heldout-from`` name or override each part, and a part known from neither is asked for by name.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from distrib.export.artifact import ExportError

RECORD = "export.json"  # in the run dir, beside checkpoints/


@dataclass(frozen=True)
class Origin:
    model: Optional[str] = None    # the model's code: FILE.py:NAME or package.module:NAME
    corpus: Optional[str] = None   # the text the model was trained on
    heldout_from: float = 0.0      # where its held-out part starts, as a fraction of the text (0: all of it)

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_from < 1.0:
            raise ExportError(f"heldout_from must be in [0, 1), the fraction of the text where the held-out "
                              f"part starts, got {self.heldout_from}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Origin":
        if not isinstance(data, Mapping):
            raise ExportError(f"{where} is damaged (not a dict); pass --model and --corpus")
        try:
            return cls(model=data.get("model"), corpus=data.get("corpus"),
                       heldout_from=float(data.get("heldout_from", 0.0)))
        except (TypeError, ValueError) as exc:
            raise ExportError(f"{where} is damaged ({exc}); pass --model and --corpus") from exc

    def overridden(self, model: Optional[str], corpus: Optional[str], heldout_from: Optional[float]) -> "Origin":
        """This origin with the parts the user named replacing the recorded ones."""
        return Origin(model=model if model is not None else self.model,
                      corpus=corpus if corpus is not None else self.corpus,
                      heldout_from=heldout_from if heldout_from is not None else self.heldout_from)


def record(run_dir, origin: Origin) -> Path:
    """Write ``origin`` as ``RUN_DIR/export.json`` (atomically). Call it on one rank (rank 0)."""
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD}.tmp")
    tmp.write_text(json.dumps(origin.to_dict(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_record(run_dir) -> Origin:
    """The origin recorded in ``run_dir``, or an empty one (nothing known) when there is none."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return Origin()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is damaged ({exc}); delete it and pass --model and --corpus") from exc
    return Origin.from_dict(data, str(path))
