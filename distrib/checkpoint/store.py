"""The on-disk format of checkpoints: atomic commit, completion marker, validation, retention.

Plain files and torch only (no Horovod, no ranks): ``python -m distrib.export`` and the
tests use it directly. Layout::

    RUN_DIR/checkpoints/
        step-00000100/            a committed checkpoint
            state.pt              replicated state (model, optimizer, scheduler, loader, extra)
            rng.pt                list of every rank's RNG states, index = rank
            COMPLETE.json         the marker, written last: sha256 of each file, step, world size,
                                  model_config, time
        .tmp-step-00000120-...    a write in progress, or left over by a crash: never loaded
        superseded-<time>/        checkpoints newer than the one a run resumed from

A folder is loadable only when its marker parses and every file it lists has the recorded
size and sha256: a crash can leave a temporary folder, never a half-written ``step-*``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

FORMAT = "distrib-checkpoint-v1"
MARKER = "COMPLETE.json"
STATE_FILE = "state.pt"
RNG_FILE = "rng.pt"
LOCAL_FILE = "local.pt"  # per-rank state beside the RNG (PowerSGD error feedback), when some entry has any
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the one-line message names the folder and the fix."""


class DamagedCheckpoint(CheckpointError):
    """A folder that fails validation; ``reason`` says what is wrong without the folder name."""

    def __init__(self, path, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = Path(path), reason


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def io_error_message(where, exc: OSError) -> str:
    """One line for an OSError while writing under ``where``, with the fix for its cause."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space or pass --run-dir on another disk"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make it writable or pass --run-dir on another disk"
    else:
        fix = "check the disk or pass --run-dir on another disk"
    return f"cannot write checkpoint to {where}: {reason}; {fix}"


# -- writing -------------------------------------------------------------------------------------
class _HashingFile:
    """A write-only file that hashes what passes through, so no second read is needed.

    ``torch.save`` on a full disk turns the OSError into a generic RuntimeError; the
    original error is kept in ``error`` so that the caller can report ENOSPC as such.
    """

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as exc:
            self.error = exc
            raise
        self.sha.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        pass

    def close(self, sync: bool = True) -> None:
        try:
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _save_file(path: Path, obj: Any) -> Dict[str, Any]:
    f = _HashingFile(path)
    try:
        torch.save(obj, f)
    except OSError:
        f.close(sync=False)
        raise
    except Exception:
        f.close(sync=False)
        if f.error is not None:
            raise f.error
        raise
    f.close()
    return {"sha256": f.sha.hexdigest(), "bytes": f.size}


def _write_small(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the file fsyncs do not cover it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _slow(seconds: float) -> None:
    # Test hook (DISTRIB_TEST_SLOW_WRITE_S): widens the window in which a kill lands mid-write.
    if seconds > 0:
        time.sleep(seconds)


def write_checkpoint(root: Path, step: int, files: Dict[str, Any], meta: Dict[str, Any],
                     slow_s: float = 0.0, adopt: Optional[Callable[[Path], Dict[str, Any]]] = None) -> Path:
    """Write ``files`` (name -> object for ``torch.save``) as ``root/step-<step>`` atomically.
    ``adopt(tmp)`` moves files written elsewhere (other ranks' shards) into the temporary folder
    and returns their ``{"sha256", "bytes"}`` for the marker.

    Temporary folder, fsync of every file, marker last, fsync, ``os.replace``, fsync of
    ``root``. An existing folder of the same step (a re-run of that step) is replaced.
    Raises :class:`CheckpointError` on I/O errors, after removing the temporary folder.
    """
    root = Path(root)
    tmp = root / f"{TMP_PREFIX}{step_dirname(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    aside = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        sums = adopt(tmp) if adopt is not None else {}
        _slow(slow_s)  # before the first file too: training goes on while the snapshot waits to be written
        for name, obj in files.items():
            sums[name] = _save_file(tmp / name, obj)
            _slow(slow_s)
        now = time.time()
        marker = {"format": FORMAT, "step": step, **meta, "files": sums, "unix_time": now,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))}
        _write_small(tmp / MARKER, json.dumps(marker, indent=1, sort_keys=True).encode())
        fsync_dir(tmp)
        final = root / step_dirname(step)
        if final.exists():
            aside = root / f"{TMP_PREFIX}replaced-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(io_error_message(root, exc)) from exc
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


# -- reading and validating ----------------------------------------------------------------------
def read_marker(path: Path) -> Dict[str, Any]:
    """The parsed marker of checkpoint folder ``path``; :class:`CheckpointError` says why not."""
    marker_path = Path(path) / MARKER
    if not marker_path.is_file():
        raise DamagedCheckpoint(path, f"no completion marker {MARKER}")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DamagedCheckpoint(path, f"unreadable marker: {exc}") from exc
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise DamagedCheckpoint(path, f"its marker is not {FORMAT}")
    return marker


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def validate(path: Path, checksums: bool = True) -> Dict[str, Any]:
    """Check marker, sizes and (by default) sha256 of every file; return the marker."""
    path = Path(path)
    marker = read_marker(path)
    for name, info in marker["files"].items():
        f = path / name
        if not f.is_file():
            raise DamagedCheckpoint(path, f"{name}, listed in its marker, is missing")
        if f.stat().st_size != info.get("bytes"):
            raise DamagedCheckpoint(path, f"{name} has {f.stat().st_size} bytes, its marker says {info.get('bytes')}")
        if checksums and _sha256(f) != info.get("sha256"):
            raise DamagedCheckpoint(path, f"sha256 of {name} does not match its marker")
    return marker


def step_of(path: Path) -> Optional[int]:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """``(step, folder)`` of every ``step-*`` folder under ``root``, oldest first (unvalidated)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found)


def newest_valid(root: Path, on_damaged: Optional[Callable[[Path, str], None]] = None
                 ) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The newest folder under ``root`` that validates, and its marker; ``(None, None)`` if none.

    Each damaged folder met on the way is reported to ``on_damaged(folder, reason)``.
    """
    for _, path in reversed(list_checkpoints(root)):
        try:
            return path, validate(path)
        except DamagedCheckpoint as exc:
            if on_damaged is not None:
                on_damaged(path, exc.reason)
    return None, None


def load_file(path: Path, name: str) -> Any:
    """``torch.load`` one file of a checkpoint (our own pickles, hence ``weights_only=False``)."""
    return torch.load(Path(path) / name, map_location="cpu", weights_only=False)


# -- housekeeping (rank 0, with no write in flight) ----------------------------------------------
def _remove_dir(path: Path) -> None:
    # Rename first: a crash during rmtree then leaves a .tmp- folder, not a half-deleted step-*.
    doomed = path.with_name(f"{TMP_PREFIX}deleting-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(root: Path) -> List[Path]:
    """Delete temporary folders left by crashed writes. Only safe with no write in flight."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return gone


def apply_retention(root: Path, keep: int) -> List[Path]:
    """Keep the newest ``keep`` folders that have a marker; delete every older ``step-*`` folder."""
    entries = list_checkpoints(root)
    complete = [step for step, p in entries if (p / MARKER).is_file()]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    doomed = [p for step, p in entries if step < oldest_kept]
    for p in doomed:
        _remove_dir(p)
    return doomed


def supersede(root: Path, after_step: int) -> Optional[Path]:
    """Move ``step-*`` folders newer than ``after_step`` into ``root/superseded-<time>/``.

    A run that resumes from step S (or starts over) continues a different history: its
    later checkpoints must not be mixed with those of the abandoned one, which would win
    the next ``--resume auto``. They are moved, not deleted, so nothing is lost.
    """
    newer = [p for step, p in list_checkpoints(root) if step > after_step]
    if not newer:
        return None
    dest = Path(root) / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    dest.mkdir()
    for p in newer:
        os.replace(p, dest / p.name)
    fsync_dir(Path(root))
    return dest
