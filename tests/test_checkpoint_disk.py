"""Saving on a read-only or full disk: a clear CheckpointError, earlier checkpoints intact.

Real mounts (a read-only bind mount, a 1 MiB tmpfs), so these need root (as CI has): without it
they fail rather than skip, since a skip would leave the full- and read-only-disk paths untested.
"""
import os
import subprocess
from contextlib import contextmanager

import pytest
import torch

from distrib.checkpoint import CheckpointError, CheckpointManager, store
from tests.checkpoint_fixtures import cpu_ctx, params, same, tiny_state



def _mount(*args):
    if os.geteuid() != 0:
        pytest.fail("these tests mount a read-only and a full file system: run them as root")
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"mount {' '.join(args)} failed: {proc.stderr.strip()}")


@contextmanager
def mounted(*args, target):
    _mount(*args, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def _read_only(path):
    _mount("-o", "remount,bind,ro", str(path))


@pytest.mark.parametrize("async_save", [True, False])
def test_read_only_disk(tmp_path, async_save):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = tiny_state()
    with mounted("--bind", str(run), target=run):
        ckpt = CheckpointManager(run, cpu_ctx(), async_save=async_save)
        ckpt.save(1, state)
        ckpt.wait()
        good = params(state["model"])
        _read_only(run)
        with pytest.raises(CheckpointError) as err:
            ckpt.save(2, state)  # the probe catches it before any background work
        msg = str(err.value)
        assert msg.startswith(f"cannot write checkpoint to {run / 'checkpoints'}: Read-only file system;")
        assert "--run-dir" in msg and "\n" not in msg
        store.validate(run / "checkpoints" / "step-00000001")
        fresh = tiny_state(seed=4)
        assert CheckpointManager(run, cpu_ctx()).restore(fresh) == 1  # reading still works
        assert same(params(fresh["model"]), good)
        ckpt._closed = True  # nothing in flight; close() would only re-wait


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk(tmp_path, async_save):
    run = tmp_path / "run"
    run.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", target=run):
        small = tiny_state()
        ckpt = CheckpointManager(run, cpu_ctx(), async_save=async_save)
        ckpt.save(1, small)
        ckpt.save(2, small)
        ckpt.wait()
        big = {"model": torch.nn.Linear(1024, 600)}  # ~2.4 MB: cannot fit in 1 MiB
        expected = "cannot write checkpoint to {}: No space left on device; free space or pass --run-dir on another disk"
        if async_save:
            ckpt.save(3, big)  # fails in the background ...
            with pytest.raises(CheckpointError) as err:
                ckpt.wait()    # ... and is reported here (or at the next save)
        else:
            with pytest.raises(CheckpointError) as err:
                ckpt.save(3, big)
        assert str(err.value) == expected.format(run / "checkpoints")
        root = run / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]  # temp removed
        for name in ("step-00000001", "step-00000002"):
            store.validate(root / name)
        ckpt.save(4, small)  # space was given back: saving works again
        ckpt.close()
        assert (root / "step-00000004" / store.MARKER).is_file()
