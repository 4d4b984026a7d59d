"""The examples run unchanged under plain ``horovodrun -np 2 python examples/...``, without our
launcher: distrib.init() takes the world from whatever started Horovod."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoint_fixtures import kill_tree
from tests.helpers import REPO, TINY_LM_MODEL

pytestmark = pytest.mark.multiprocess
HOROVODRUN = str(Path(sys.executable).with_name("horovodrun"))
TINY_LM = [*TINY_LM_MODEL, "--warmup", "1", "--log-every", "1", "--checkpoint-every", "2"]


def horovodrun(controller, *args, timeout=240):
    """Plain horovodrun; on a hang every worker is killed too, not only horovodrun."""
    cmd = [HOROVODRUN, f"--{controller}", "-np", "2", sys.executable, *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out: horovodrun and the workers it started
            kill_tree(proc.pid)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_train_mlp_under_plain_horovodrun(controller):
    out = horovodrun(controller, "examples/train_mlp.py")
    losses = [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if " loss " in line]
    assert len(losses) == 6, out  # printed every 50 of 300 steps, by rank 0 only
    assert losses[-1] < losses[0] / 10, out


@pytest.mark.timeout(300)
def test_train_lm_under_plain_horovodrun(tmp_path):
    run_dir = tmp_path / "lm"
    horovodrun("mpi", "examples/train_lm.py", *TINY_LM, "--steps", "6", "--run-dir", run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert {r["world_size"] for r in logged} == {2}
    artifact = torch.load(run_dir / "model.pt", weights_only=True)
    assert artifact["model_config"]["n_embd"] == 16
