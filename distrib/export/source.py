"""What to export: the trained weights and model config of a checkpoint, a run dir or a model file.

Reads files only (no Horovod, no ranks). A checkpoint is used only when it validates (marker,
sizes, sha256 of every file, the optimizer shards of a sharded run included): a folder still being
written, or cut short by a crash, is refused by name. Under ZeRO stages 1 and 2 the model itself
is replicated and saved whole in ``state.pt``; an entry that is sharded is consolidated first.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from distrib.checkpoint import sharded, store
from distrib.export.artifact import ExportError, load_model_artifact
from distrib.export.origin import Origin, read_record


@dataclass(frozen=True)
class Source:
    state: Dict[str, Any]         # the model's state dict (fp32 tensors on CPU)
    config: Dict[str, Any]        # the model config it was trained with
    step: Optional[int]
    origin: Path                  # the checkpoint folder or model file it came from
    recorded: Origin = Origin()   # the model's code and held-out text, as the training run recorded them


def find_checkpoint(src) -> Path:
    """``src`` itself when it is a checkpoint folder, else the newest valid checkpoint of the run
    dir (or checkpoints dir) ``src``; damaged ones are skipped with a warning on stderr."""
    src = Path(src)
    if not src.is_dir():
        raise ExportError(f"{src} is not a directory; pass a checkpoint folder (.../step-00000100) or a run dir")
    if src.name.startswith(store.TMP_PREFIX) and not (src / store.MARKER).exists():
        raise ExportError(f"{src} is a checkpoint still being written (or cut short by a crash): it has no "
                          f"{store.MARKER}; pass the run dir to export its newest complete checkpoint")
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


def read_source(src, key: str = "model") -> Source:
    """The model of a ``distrib-model-v1`` file, or of the checkpoint :func:`find_checkpoint` picks."""
    src = Path(src)
    if src.is_file():
        artifact = load_model_artifact(src)
        recorded = Origin.from_dict(artifact["origin"], f"the origin in {src}") if "origin" in artifact else Origin()
        return Source(artifact["model_state"], _config(artifact.get("model_config"), src), artifact.get("step"), src,
                      recorded)
    folder = find_checkpoint(src)
    marker = store.read_marker(folder)
    saved = store.load_file(folder, store.STATE_FILE)["state"]
    if key not in saved:
        raise ExportError(f"checkpoint {folder} has no {key!r} state (it has {', '.join(sorted(saved))}); "
                          "pass --key NAME")
    entry = saved[key]
    if sharded.is_sharded(entry):  # a sharded run's model is replicated; any sharded entry is consolidated
        entry = sharded.consolidate_entry(entry, folder, key)
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    return Source(entry, _config(marker.get("model_config"), folder), marker.get("step"), folder, read_record(run_dir))


def _config(config, where: Path) -> Dict[str, Any]:
    if not config:
        raise ExportError(f"{where} was saved without model_config; pass model_config= to CheckpointManager.save "
                          "(the export needs it to rebuild the model)")
    if not isinstance(config, dict):
        raise ExportError(f"{where} has a damaged model_config (a {type(config).__name__}, not a dict); "
                          "export an earlier checkpoint")
    return config
