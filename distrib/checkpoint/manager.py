"""``CheckpointManager``: save and resume a data-parallel run, on all ranks together.

Rank 0 writes the replicated state and every rank's RNG states (gathered to it); rank 0
chooses the checkpoint to resume from and broadcasts its choice, so all ranks load the same
one. Errors are shared the same way: every rank raises the same :class:`CheckpointError`
at the same call, instead of rank 0 failing while the others wait in the next collective.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from distrib.checkpoint import sharded
from distrib.checkpoint import state as st
from distrib.checkpoint import store
from distrib.checkpoint.background import BackgroundWrite
from distrib.checkpoint.store import CheckpointError
from distrib.rng import rng_state, set_rng_state

log = logging.getLogger("distrib.checkpoint")

RANK_STATE_FILE = "rank_state.pt"  # every rank's own values (distrib.user_state.RankState), in rank order


class CheckpointManager:
    """Crash-safe checkpoints of one run under ``RUN_DIR/checkpoints``.

    ``keep`` committed checkpoints are kept (at least 2). With ``async_save`` (the default)
    :meth:`save` blocks only while it copies the state to CPU memory; a background thread
    writes it, one write at a time (rank 0 keeps one CPU copy of the state between saves and
    reuses it as the next snapshot's memory). ``seed`` derives the RNG state of ranks that did not
    exist in the saved run (resume on more workers). ``comm`` replaces the collectives
    (tests); by default ``ctx.comm``, the engine's.

    ``save``, ``restore``, ``wait`` and ``close`` must be called on all ranks.
    """

    def __init__(self, run_dir: Union[str, Path], ctx, keep: int = 3, async_save: bool = True, *,
                 seed: int = 0, comm=None):
        if keep < 2:
            raise ValueError(
                f"keep={keep} is too small: keep at least 2 checkpoints, because the newest may be "
                "mid-write (or cut short by a crash) and resuming then needs the previous one")
        self.run_dir = Path(run_dir)
        self.root = store.checkpoints_dir(run_dir)
        self.ctx, self.keep, self.async_save, self.seed = ctx, keep, async_save, seed
        self._own_comm = comm  # given by the caller: kept across adopt_world()
        self._comm = comm if comm is not None else ctx.comm
        self._writer = BackgroundWrite("checkpoint-writer")  # rank 0: state.pt, rng.pt, the marker
        self._closed = False
        self._staging: Any = None  # rank 0, async: the last CPU snapshot, reused as buffers
        self._shards = sharded.ShardWriter()  # every rank: its part of sharded optimizer state
        self.last_saved: Optional[Path] = None
        self.last_step: Optional[int] = None  # step of the last save() call, on every rank

    def adopt_world(self, ctx) -> None:
        """Adopt a new world (Horovod Elastic re-formed it): rank 0 may now be another worker.
        Call on every rank, at a step boundary, after any write of the old world was joined."""
        self._writer.wait()  # its failure, if any, is raised by the next save() or wait()
        self.ctx = ctx
        self._comm = self._own_comm if self._own_comm is not None else ctx.comm

    @property
    def _main(self) -> bool:
        return self.ctx.rank == 0

    # -- saving ---------------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any], model_config: Optional[Dict] = None, *,
             rank_state=None) -> None:
        """Checkpoint ``state`` as of ``step``. Must be called on all ranks, at a step boundary.

        ``rank_state`` (a :class:`distrib.user_state.RankState`, optional): this rank's own
        values; every rank's are gathered with the RNG states and written to ``rank_state.pt``.

        Blocks until the previous asynchronous write is done, gathers every rank's RNG state
        to rank 0, then (async) copies the state to CPU memory and returns while a thread
        writes it, or (sync) writes it and returns once it is committed. Raises
        :class:`CheckpointError` on every rank when this write (sync) or the previous one
        (async) failed, e.g. on a full or read-only disk; committed checkpoints stay intact.
        """
        if self._closed:
            raise CheckpointError("save() after close(): this CheckpointManager is closed")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        st.check_state_types(state)
        self.last_step = step
        meta = {"step": step, "world_size": self.ctx.size, "model_config": _json_config(model_config)}
        problem = None
        shards = sharded.staging_dir(self.root, step) if sharded.sharded_names(state) else None
        if self._main:
            problem = self._join_writer()
            if problem is None:
                problem = self._prepare_root(step, shards)
        problem = problem or self._shards.join()  # every rank: its previous shard write
        # Collective: every rank's RNG states to rank 0, and every rank's verdict on the previous
        # write to every rank, so that all ranks raise together or none does.
        # (Per-rank state rides along: PowerSGD's error feedback, as large as the compressed
        # gradients, and the training loop's rank state; gathered on every rank.)
        note = {"rng": rng_state(), "problem": problem, "local": st.local_states(state)}
        if rank_state is not None:
            note["rank_state"] = st.cpu_snapshot(rank_state.state_dict())
        gathered = self._comm.allgather_object(note, name="distrib.checkpoint.save")
        failed = next((g["problem"] for g in gathered if g["problem"]), None)
        if failed:
            raise CheckpointError(failed)
        if shards is not None:  # rank 0 made the staging folder before the allgather
            self._shards.start(state, shards, self.ctx.rank, self.async_save)
        adopt = sharded.adopt(shards, self.ctx.size) if shards is not None else None
        files = None
        if self._main:
            collected = sharded.strip(st.collect(state))
            if self.async_save:
                # The previous snapshot is free (its write was joined above): reuse its memory.
                collected = self._staging = st.cpu_snapshot(collected, reuse=self._staging)
            files = {store.STATE_FILE: {"step": step, "state": collected},
                     store.RNG_FILE: [g["rng"] for g in gathered]}
            if any(g["local"] for g in gathered):
                files[store.LOCAL_FILE] = [g["local"] for g in gathered]
            if rank_state is not None:
                files[RANK_STATE_FILE] = [g["rank_state"] for g in gathered]
        if self._main:
            self._writer.run(self._write, step, files, meta, adopt, asynchronous=self.async_save)
        if self.async_save:
            return
        problem = self._writer.join() if self._main else None
        self._shards.join()  # (a failed shard is in rank 0's verdict: it read every rank's note)  # (a failed shard is in rank 0's verdict: it read every rank's note)
        # Collective: the sync write's outcome, so that every rank returns or raises together.
        problem = self._comm.broadcast_object(problem, name="distrib.checkpoint.saved")
        if problem:
            raise CheckpointError(problem)

    def _prepare_root(self, step: int, shards: Optional[Path] = None) -> Optional[str]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            store.remove_leftovers(self.root)
            if shards is not None:
                shards.mkdir()
            # Checkpoints newer than this one belong to an abandoned history (a run started
            # over without moving them, e.g. under Horovod Elastic): set them aside so that
            # they cannot win the next --resume auto.
            moved = store.supersede(self.root, step)
            if moved:
                log.warning("checkpoint at step %d: moved newer checkpoints of an earlier run to %s", step, moved)
            # A probe file: fails now, with the real reason (read-only, no permission), rather
            # than in the background thread one save later.
            probe = self.root / f"{store.TMP_PREFIX}probe-{os.getpid()}"
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as exc:
            return store.io_error_message(self.root, exc)
        return None

    def _write(self, step: int, files: Dict[str, Any], meta: Dict[str, Any], adopt=None) -> Optional[str]:
        try:
            self.last_saved = store.write_checkpoint(self.root, step, files, meta, adopt=adopt)
            store.apply_retention(self.root, self.keep)
        except CheckpointError as exc:
            return str(exc)
        except BaseException as exc:  # noqa: BLE001 - a background failure must never be lost
            return f"checkpoint {self.root / store.step_dirname(step)} failed: {type(exc).__name__}: {exc}"
        return None

    def _join_writer(self) -> Optional[str]:
        return self._writer.join()

    def wait(self) -> None:
        """Block until the asynchronous write (if any) is committed. Must be called on all
        ranks; raises :class:`CheckpointError` on every rank if that write failed."""
        problem = self._join_writer() if self._main else None
        self._shards.join()  # (a failed shard is in rank 0's verdict)
        # Collective: share rank 0's outcome so no rank exits believing the save succeeded.
        problem = self._comm.broadcast_object(problem, name="distrib.checkpoint.wait")
        if problem:
            raise CheckpointError(problem)

    def close(self) -> None:
        """:meth:`wait`, then refuse further saves. Must be called on all ranks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._staging = None
        self.wait()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.wait()  # let the write finish; the original exception wins

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, state: Mapping[str, Any], resume: Union[str, Path] = "auto",
                model_config: Optional[Dict] = None, *, collective: bool = True,
                rank_state=None) -> Optional[int]:
        """Load the checkpoint chosen by ``resume`` into ``state``; return its step, or None.

        ``resume``: ``"auto"`` (newest valid checkpoint of this run, None if there is none),
        ``"none"`` (start over: existing checkpoints move to ``superseded-*``), or a path
        (a ``step-*`` folder, or a run dir / checkpoints dir whose newest valid one is taken).
        Must be called on all ranks. Rank 0 validates markers and checksums, falls back past
        damaged folders with a one-line warning, and broadcasts its choice. Raises
        :class:`CheckpointError` on every rank, before anything is loaded, when the
        checkpoint's model config or tensor shapes do not match this run. Every rank gets its
        own saved RNG state back; ranks the saved run did not have get one derived from
        ``seed``, rank and step. The run dir must be visible to every rank (shared file system).

        ``collective=False`` (Horovod Elastic, where no collective may run outside the elastic
        loop): every rank chooses and loads on its own, and nothing on disk is moved; the
        elastic state's first sync then makes every rank equal to rank 0.

        ``rank_state`` (a :class:`distrib.user_state.RankState`): gets this rank's saved values
        back at the same world size, re-sharded or reset at another (its ``load_all``); a
        checkpoint saved without rank state resets it.
        """
        st.check_state_types(state)
        config = _json_config(model_config)
        choice = None
        if self._main or not collective:
            problem = self._join_writer()
            choice = {"path": None, "step": None, "problem": problem}
            if problem is None:
                try:
                    choice.update(self._choose(resume, config, move_newer=collective))
                except CheckpointError as exc:
                    choice["problem"] = str(exc)
        if collective:
            # Collective: rank 0's choice, so that every rank loads the same checkpoint.
            choice = self._comm.broadcast_object(choice, name="distrib.checkpoint.restore")
        if choice["problem"]:
            raise CheckpointError(choice["problem"])
        if choice["path"] is None:
            return None
        path, step = Path(choice["path"]), choice["step"]
        try:
            payload = store.load_file(path, store.STATE_FILE)
            rngs = store.load_file(path, store.RNG_FILE)
            local = store.load_file(path, store.LOCAL_FILE) if (path / store.LOCAL_FILE).exists() else None
            ranks = (store.load_file(path, RANK_STATE_FILE) if rank_state is not None
                     and (path / RANK_STATE_FILE).exists() else None)
            # sharded optimizer state: re-cut for this rank's elements (or consolidated when unsharded)
            payload["state"] = sharded.resolve(state, payload["state"], path)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
        why = st.incompatibility(state, payload["state"])
        if why:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {why}; "
                                  "use --resume none or a matching config")
        st.apply(state, payload["state"])
        st.apply_local(state, local, self.ctx.rank, self.ctx.size)
        if rank_state is not None:
            reset = rank_state.load_all(ranks, self.ctx.rank, self.ctx.size)
            if reset and self._main:
                saved_by = f"{len(ranks)} workers" if ranks else "a run without rank state"
                log.info("resuming from %s (saved by %s, now %d workers): rank state %s reset to its "
                         "initial value", path, saved_by, self.ctx.size, reset)
        if self._main and collective:
            # Only now that the checkpoint is known to fit: a mismatch must leave the run dir as it was.
            self._supersede_newer(path, step, resume)
        mine = st.rng_for_rank(rngs, self.ctx.rank, self.seed, step)
        if mine is not None:
            set_rng_state(mine)
        else:
            st.seed_rank(self.seed, self.ctx.rank, step)
        return step

    def _choose(self, resume: Union[str, Path], config: Optional[Dict], move_newer: bool = True) -> Dict[str, Any]:
        """Rank 0: which checkpoint to load, as ``{"path", "step"}``; raises CheckpointError.
        ``move_newer``: with ``resume="none"``, move the earlier checkpoints aside (only one rank may)."""
        if resume is None or str(resume) == "none":
            moved = store.supersede(self.root, -1) if move_newer else None
            if moved:
                log.warning("starting over (--resume none): moved the earlier checkpoints of %s to %s",
                            self.root, moved)
            return {"path": None, "step": None}
        if str(resume) == "auto":
            path, marker = store.newest_valid(self.root, _warn_damaged)
            if path is None:
                return {"path": None, "step": None}
        else:
            path, marker = _explicit(Path(resume))
        mismatch = st.config_mismatch(marker.get("model_config"), config)
        if mismatch:
            raise CheckpointError(f"checkpoint {path} was saved with {mismatch}; "
                                  "use --resume none or a matching config")
        return {"path": str(path), "step": int(marker["step"])}

    def _supersede_newer(self, path: Path, step: int, resume: Union[str, Path]) -> None:
        """Rank 0, after loading ``path``: move the checkpoints newer than it aside, so that the
        run's next saves cannot be mistaken for (or lose to) an abandoned future."""
        moved = store.supersede(self.root, step)
        if moved:
            # After a fallback these are the damaged folders, already warned about.
            log.log(logging.INFO if str(resume) == "auto" else logging.WARNING,
                    "resuming from %s: moved the newer checkpoints of %s to %s", path, self.root, moved)


def _warn_damaged(path: Path, reason: str) -> None:
    log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, reason)


def _explicit(path: Path):
    """The checkpoint named by ``--resume PATH``: a checkpoint folder (no fallback: the user
    asked for it), or a run dir / checkpoints dir (its newest valid checkpoint)."""
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such file or directory; pass a checkpoint "
                              "folder, a run dir, auto or none")
    if (path / store.MARKER).exists() or store.step_of(path) is not None:
        return path, store.validate(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found, marker = store.newest_valid(root, _warn_damaged)
    if found is None:
        raise CheckpointError(f"--resume {path}: no valid checkpoint in {root}")
    return found, marker


def _json_config(config: Optional[Dict]) -> Optional[Dict]:
    """``model_config`` as it reads back from the JSON marker (tuples become lists, ...)."""
    if config is None:
        return None
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model_config must be a JSON-serializable dict ({exc}); "
                        "pass e.g. GPTConfig.to_dict()") from exc
