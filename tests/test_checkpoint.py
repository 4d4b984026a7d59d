"""CheckpointManager in one process, on real files: commit, validation, fallback, retention,
async snapshots, background failures, config checks, RNG."""
import json
import logging
import random

import numpy as np
import pytest
import torch

from distrib.checkpoint import CheckpointError, CheckpointManager, store
from distrib.checkpoint import state as st
from distrib.rng import rng_state, set_rng_state
from tests.checkpoint_fixtures import cpu_ctx, params, same, slow_writes, tiny_state, train_step
from tests.helpers import tree_digest

CFG = {"n_layer": 2, "n_embd": 8, "vocab": "abc"}


def manager(tmp_path, **kw):
    kw.setdefault("keep", 3)
    return CheckpointManager(tmp_path / "run", cpu_ctx(), **kw)


def ckpt_dirs(tmp_path):
    return sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())


# -- commit and marker -----------------------------------------------------------------------------
@pytest.mark.parametrize("async_save", [True, False])
def test_commit_writes_folder_with_marker_last(tmp_path, async_save):
    state = tiny_state()
    with manager(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(100, state, model_config=CFG)
    assert ckpt_dirs(tmp_path) == ["step-00000100"]
    folder = tmp_path / "run" / "checkpoints" / "step-00000100"
    marker = json.loads((folder / store.MARKER).read_text())
    assert marker["step"] == 100 and marker["world_size"] == 1 and marker["model_config"] == CFG
    assert marker["format"] == store.FORMAT and marker["time"] and marker["unix_time"] > 0
    assert set(marker["files"]) == {store.STATE_FILE, store.RNG_FILE}
    import hashlib
    for name, info in marker["files"].items():
        data = (folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
    # the marker is the newest file of the folder: written after the files it vouches for
    assert all((folder / store.MARKER).stat().st_mtime_ns >= (folder / n).stat().st_mtime_ns for n in marker["files"])


def test_restore_round_trip_every_kind_of_state(tmp_path):
    state = tiny_state()
    saved_params = params(state["model"])
    saved_opt = state["optimizer"].state_dict()
    with manager(tmp_path) as ckpt:
        ckpt.save(7, state, model_config=CFG)
    fresh = tiny_state(seed=1)
    fresh["extra"]["epoch"] = 0
    fresh["scheduler"].step()
    with manager(tmp_path) as ckpt:
        assert ckpt.restore(fresh, model_config=CFG) == 7
    assert same(params(fresh["model"]), saved_params)
    got = fresh["optimizer"].state_dict()
    assert all(torch.equal(got["state"][i]["exp_avg"], saved_opt["state"][i]["exp_avg"]) for i in saved_opt["state"])
    assert fresh["scheduler"].state_dict()["last_epoch"] == 1 and fresh["extra"] == {"epoch": 3}


def test_no_checkpoint_means_fresh_start(tmp_path):
    with manager(tmp_path) as ckpt:
        assert ckpt.restore(tiny_state(), resume="auto") is None


def test_folder_without_marker_and_temp_leftovers_are_never_loaded_and_get_cleaned(tmp_path):
    state = tiny_state()
    with manager(tmp_path) as ckpt:
        ckpt.save(1, state)
    root = tmp_path / "run" / "checkpoints"
    # a crash mid-write leaves a temp folder; a hand-made step folder without marker is not complete
    (root / ".tmp-step-00000002-123-abcd").mkdir()
    (root / ".tmp-step-00000002-123-abcd" / "state.pt").write_bytes(b"partial")
    (root / "step-00000003").mkdir()
    (root / "step-00000003" / "state.pt").write_bytes(b"partial")
    with manager(tmp_path) as ckpt:
        assert ckpt.restore(tiny_state(seed=5)) == 1
        ckpt.save(4, state)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


# -- damaged newest: fallback ----------------------------------------------------------------------
def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


DAMAGE = {
    "flip state bytes": lambda f: _flip(f / store.STATE_FILE),
    "truncate rng file": lambda f: _truncate(f / store.RNG_FILE),
    "delete marker": lambda f: (f / store.MARKER).unlink(),
    "garble marker": lambda f: (f / store.MARKER).write_text("{not json"),
    "delete state file": lambda f: (f / store.STATE_FILE).unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_falls_back_with_one_line_warning(tmp_path, caplog, damage):
    state = tiny_state()
    with manager(tmp_path) as ckpt:
        ckpt.save(10, state)
        good = params(state["model"])
        train_step(state["model"], state["optimizer"])
        ckpt.save(20, state)
    newest = tmp_path / "run" / "checkpoints" / "step-00000020"
    DAMAGE[damage](newest)
    fresh = tiny_state(seed=9)
    with caplog.at_level(logging.WARNING, logger="distrib.checkpoint"), manager(tmp_path) as ckpt:
        assert ckpt.restore(fresh) == 10
    assert same(params(fresh["model"]), good)
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and "\n" not in damaged[0] and str(newest) in damaged[0], damaged


def test_explicit_damaged_path_is_an_error_not_a_fallback(tmp_path):
    with manager(tmp_path) as ckpt:
        ckpt.save(1, tiny_state())
        ckpt.save(2, tiny_state())
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    _flip(folder / store.STATE_FILE)
    with pytest.raises(CheckpointError, match="sha256 of state.pt"), manager(tmp_path) as ckpt:
        ckpt.restore(tiny_state(), resume=str(folder))


def test_resume_from_explicit_folder_and_from_other_run_dir(tmp_path):
    state = tiny_state()
    with manager(tmp_path) as ckpt:
        ckpt.save(5, state)
        ckpt.save(6, state)
    other = CheckpointManager(tmp_path / "other", cpu_ctx())
    assert other.restore(tiny_state(), resume=str(tmp_path / "run")) == 6
    assert other.restore(tiny_state(), resume=str(tmp_path / "run" / "checkpoints" / "step-00000005")) == 5
    with pytest.raises(CheckpointError, match="no such file"):
        other.restore(tiny_state(), resume=str(tmp_path / "nowhere"))
    other.close()


def test_resume_older_or_none_moves_newer_checkpoints_aside(tmp_path):
    state = tiny_state()
    with manager(tmp_path) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, state)
        assert ckpt.restore(tiny_state(), resume=str(tmp_path / "run/checkpoints/step-00000002")) == 2
        assert [n for n in ckpt_dirs(tmp_path) if n.startswith("step-")] == ["step-00000001", "step-00000002"]
        assert ckpt.restore(tiny_state(), resume="none") is None
        assert ckpt.restore(tiny_state(), resume="auto") is None  # a fresh run does not resume old ones
    superseded = [p for p in (tmp_path / "run/checkpoints").iterdir() if p.name.startswith("superseded-")]
    assert sorted(q.name for p in superseded for q in p.iterdir()) == ["step-00000001", "step-00000002",
                                                                         "step-00000003"]


# -- retention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [2, 3])
def test_retention_keeps_newest(tmp_path, keep):
    state = tiny_state()
    with manager(tmp_path, keep=keep) as ckpt:
        for s in range(1, 7):
            ckpt.save(s, state)
    assert ckpt_dirs(tmp_path) == [f"step-{s:08d}" for s in range(7 - keep, 7)]


@pytest.mark.parametrize("keep", [0, 1])
def test_keep_below_two_rejected_with_reason(tmp_path, keep):
    with pytest.raises(ValueError, match="mid-write"):
        manager(tmp_path, keep=keep)


def test_retention_deletes_only_after_new_checkpoint_is_complete(tmp_path, monkeypatch):
    state = tiny_state()
    with manager(tmp_path, keep=2, async_save=False) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)

        def broken(*a, **k):
            raise CheckpointError("cannot write checkpoint to X: simulated")
        monkeypatch.setattr(store, "write_checkpoint", broken)
        with pytest.raises(CheckpointError, match="simulated"):
            ckpt.save(3, state)
    assert ckpt_dirs(tmp_path) == ["step-00000001", "step-00000002"]


# -- asynchronous saves ----------------------------------------------------------------------------
def test_async_save_is_a_snapshot(tmp_path, monkeypatch):
    slow_writes(monkeypatch, 0.2)  # the write is still running when we mutate
    state = tiny_state()
    before = params(state["model"])
    opt_before = {i: s["exp_avg"].clone() for i, s in state["optimizer"].state_dict()["state"].items()}
    ckpt = manager(tmp_path)
    ckpt.save(1, state)
    assert ckpt._writer._thread is not None and ckpt._writer._thread.is_alive()
    with torch.no_grad():
        for p in state["model"].parameters():
            p.add_(1.0)
    train_step(state["model"], state["optimizer"])
    state["extra"]["epoch"] = 99
    ckpt.close()
    fresh = tiny_state(seed=3)
    assert CheckpointManager(tmp_path / "run", cpu_ctx()).restore(fresh) == 1
    assert same(params(fresh["model"]), before)
    got = fresh["optimizer"].state_dict()["state"]
    assert all(torch.equal(got[i]["exp_avg"], opt_before[i]) for i in opt_before)
    assert fresh["extra"]["epoch"] == 3


def test_at_most_one_write_in_flight(tmp_path, monkeypatch):
    slow_writes(monkeypatch, 0.1)
    state = tiny_state()
    with manager(tmp_path) as ckpt:
        ckpt.save(1, state)
        first = ckpt._writer._thread
        ckpt.save(2, state)  # waits for the first
        assert not first.is_alive()
        assert (tmp_path / "run/checkpoints/step-00000001" / store.MARKER).is_file()


@pytest.mark.parametrize("error", [CheckpointError("cannot write checkpoint to X: boom"), RuntimeError("boom")])
def test_background_failure_surfaces_at_next_save(tmp_path, monkeypatch, error):
    state = tiny_state()
    ckpt = manager(tmp_path)
    ckpt.save(1, state)

    def broken(*a, **k):
        raise error
    monkeypatch.setattr(store, "write_checkpoint", broken)
    ckpt.save(2, state)  # returns: the failure happens in the background
    with pytest.raises(CheckpointError, match="boom"):
        ckpt.save(3, state)
    ckpt.close()


def test_background_failure_surfaces_at_close_and_wait(tmp_path, monkeypatch):
    state = tiny_state()
    ckpt = manager(tmp_path)

    def broken(*a, **k):
        raise OSError("boom")  # even an unexpected error type is reported, never lost
    monkeypatch.setattr(store, "write_checkpoint", broken)
    ckpt.save(1, state)
    with pytest.raises(CheckpointError, match="boom"):
        ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.save(2, state)

    ckpt2 = manager(tmp_path)
    ckpt2.save(1, state)
    with pytest.raises(CheckpointError, match="boom"):
        ckpt2.wait()
    ckpt2.wait()  # reported once
    ckpt2.close()


def test_state_entries_must_be_stateful_or_dicts(tmp_path):
    with pytest.raises(TypeError, match="'extra'"), manager(tmp_path) as ckpt:
        ckpt.save(1, {"model": torch.nn.Linear(2, 2), "lr": 0.1})


# -- config and shape checks -----------------------------------------------------------------------
def test_config_mismatch_fails_before_anything_is_loaded(tmp_path):
    with manager(tmp_path) as ckpt:
        ckpt.save(100, tiny_state(), model_config={**CFG, "n_layer": 4})
    fresh = tiny_state(seed=2)
    before = params(fresh["model"])
    with pytest.raises(CheckpointError) as err, manager(tmp_path) as ckpt:
        ckpt.restore(fresh, model_config=CFG)
    msg = str(err.value)
    assert "\n" not in msg
    assert "step-00000100 was saved with model config n_layer=4, this run has n_layer=2" in msg
    assert "--resume none" in msg
    assert same(params(fresh["model"]), before) and fresh["extra"]["epoch"] == 3


def test_shape_mismatch_without_config_fails_before_anything_is_loaded(tmp_path):
    with manager(tmp_path) as ckpt:
        ckpt.save(1, tiny_state(hidden=8))
    fresh = tiny_state(seed=2, hidden=6)
    fresh["extra"]["epoch"] = 0
    before = params(fresh["model"])
    with pytest.raises(CheckpointError, match=r"model.0.weight has shape \(8, 4\) in the checkpoint, \(6, 4\)"), \
            manager(tmp_path) as ckpt:
        ckpt.restore(fresh)
    assert same(params(fresh["model"]), before) and fresh["extra"]["epoch"] == 0


def test_shape_mismatch_of_an_older_checkpoint_leaves_the_newer_ones_in_place(tmp_path):
    """--resume PATH of an older checkpoint would move the newer ones aside: not when it does not fit."""
    with manager(tmp_path) as ckpt:
        for s in (1, 2):
            ckpt.save(s, tiny_state(hidden=8))
    before = tree_digest(tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not fit this run"), manager(tmp_path) as ckpt:
        ckpt.restore(tiny_state(hidden=6), resume=str(tmp_path / "run/checkpoints/step-00000001"))
    assert tree_digest(tmp_path / "run") == before


def test_missing_state_name_is_an_error(tmp_path):
    with manager(tmp_path) as ckpt:
        ckpt.save(1, {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match="no 'optimizer' state"), manager(tmp_path) as ckpt:
        model = torch.nn.Linear(2, 2)
        ckpt.restore({"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=1)})


# -- RNG -------------------------------------------------------------------------------------------
def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_rng_round_trip(tmp_path):
    state = tiny_state()
    with manager(tmp_path) as ckpt:
        ckpt.save(1, state)
    expected = _draws()
    _draws()
    with manager(tmp_path) as ckpt:
        ckpt.restore(state)
    got = _draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_rng_for_new_ranks_is_derived_from_seed_rank_and_step():
    saved = [rng_state(), rng_state()]
    assert st.rng_for_rank(saved, 1, seed=0, step=5) is saved[1]
    assert st.rng_for_rank(saved, 2, seed=0, step=5) is None
    st.seed_rank(0, 2, 5)
    a = _draws()
    st.seed_rank(0, 2, 5)
    b = _draws()
    st.seed_rank(0, 3, 5)
    c = _draws()
    assert a[:2] == b[:2] and torch.equal(a[2], b[2]) and a[:2] != c[:2]
    assert st.derived_seed(0, 2, 5) != st.derived_seed(1, 2, 5)


def test_restore_on_more_ranks_uses_derived_rng(tmp_path):
    """A one-rank checkpoint restored as rank 1 of 2 (collectives replaced: rank 0's choice is
    what a broadcast would deliver)."""
    with manager(tmp_path) as ckpt:
        ckpt.save(4, tiny_state())
    path = str(tmp_path / "run/checkpoints/step-00000004")

    class Rank1Comm:
        def broadcast_object(self, obj, name):
            return {"path": path, "step": 4, "problem": None}

    saved_rng = rng_state()
    ckpt = CheckpointManager(tmp_path / "run", cpu_ctx(rank=1, size=2), seed=7, comm=Rank1Comm())
    assert ckpt.restore(tiny_state()) == 4
    got = _draws()
    st.seed_rank(7, 1, 4)
    assert got[:2] == _draws()[:2]
    set_rng_state(saved_rng)


def test_snapshot_buffers_reused_across_saves_stay_snapshots(tmp_path, monkeypatch):
    slow_writes(monkeypatch, 0.05)
    state = tiny_state()
    ckpt = manager(tmp_path)
    ckpt.save(1, state)
    at_1 = params(state["model"])
    train_step(state["model"], state["optimizer"])
    ckpt.save(2, state)  # copies into the buffers of the first snapshot
    at_2 = params(state["model"])
    train_step(state["model"], state["optimizer"])
    ckpt.close()
    root = tmp_path / "run" / "checkpoints"
    for step, expected in ((2, at_2), (1, at_1)):  # resuming step 1 moves step 2 aside
        fresh = tiny_state(seed=5)
        CheckpointManager(tmp_path / "run", cpu_ctx()).restore(fresh, resume=str(root / f"step-{step:08d}"))
        assert same(params(fresh["model"]), expected)


# -- elastic mode: no collectives, nothing moved; abandoned histories set aside at save ------------
def test_non_collective_restore_loads_newest_and_moves_nothing(tmp_path):
    state = tiny_state()
    with manager(tmp_path) as ckpt:
        ckpt.save(4, state, model_config=CFG)
        ckpt.save(8, state, model_config=CFG)
    fresh = tiny_state(seed=1)
    # rank 1 of 2 with no collective available: it must choose on its own
    ckpt = CheckpointManager(tmp_path / "run", cpu_ctx(rank=1, size=2), keep=3, comm=object())
    assert ckpt.restore(fresh, resume=tmp_path / "run" / "checkpoints" / "step-00000004",
                        model_config=CFG, collective=False) == 4
    assert ckpt_dirs(tmp_path) == ["step-00000004", "step-00000008"]
    assert same(params(fresh["model"]), params(state["model"]))


def test_saving_an_older_step_sets_newer_checkpoints_aside(tmp_path, caplog):
    state = tiny_state()
    with manager(tmp_path) as ckpt:
        ckpt.save(50, state, model_config=CFG)
    with manager(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger="distrib.checkpoint"):
        ckpt.save(10, state, model_config=CFG)  # a run that started over without --resume none
    names = ckpt_dirs(tmp_path)
    assert "step-00000010" in names and "step-00000050" not in names
    (superseded,) = [n for n in names if n.startswith("superseded-")]
    assert (tmp_path / "run" / "checkpoints" / superseded / "step-00000050" / store.MARKER).exists()
    assert "moved newer checkpoints" in caplog.text
