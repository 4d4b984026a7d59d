"""The mistakes users make, as a table: each is a real `python -m launch ... examples/train_lm.py`
run that must end with one line naming the problem and the fix, a non-zero exit code, no
traceback, and the existing run directory (with its checkpoints) byte for byte as it was."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_LM_MODEL, tree_digest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "examples" / "train_lm.py")
TINY_LM = [*TINY_LM_MODEL, "--warmup", "1", "--log-every", "1", "--checkpoint-every", "2"]

# Stand-ins for broken Horovod installations (a second real Horovod build is 5 minutes):
# put first on PYTHONPATH, they shadow the real package in the launcher and in the workers.
HOROVOD_WITHOUT_PYTORCH = 'raise ImportError("horovod.torch: Horovod was built without PyTorch support")\n'
HOROVOD_WITHOUT_MPI = "def mpi_built():\n    return False\n\n\ndef is_initialized():\n    return False\n"



@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """A finished 4-step run with two checkpoints: what a mistake must never damage."""
    run_dir = tmp_path_factory.mktemp("bad_input") / "run"
    proc = subprocess.run([sys.executable, "-m", "launch", "-np", "2", SCRIPT, "--steps", "4", "--run-dir",
                           str(run_dir), *TINY_LM], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run_dir / "checkpoints").glob("step-*"))) == 2
    return run_dir


def fake_horovod(tmp_path: Path, torch_module: str) -> dict:
    pkg = tmp_path / "shim" / "horovod"
    (pkg / "torch").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "torch" / "__init__.py").write_text(torch_module)
    return {"PYTHONPATH": f"{tmp_path / 'shim'}:{REPO}"}


# (id, launcher args, script args, extra env maker, exit code, words the error line must contain)
CASES = [
    ("np_zero", ["-np", "0"], [], None, 2, ["-np 0", "give -np 1 or more"]),
    ("np_negative", ["-np", "-3"], [], None, 2, ["-np -3", "give -np 1 or more"]),
    ("np_not_a_number", ["-np", "two"], [], None, 2, ["-np", "invalid int value: 'two'", "give a whole number"]),
    ("np_more_than_slots", ["-np", "5", "-H", "localhost:2"], [], None, 2, ["more than the 2 slots", "lower -np"]),
    ("hostfile_malformed", ["--hostfile", "{tmp}/hosts.txt"], [], None, 2, ["line 1", "write e.g. node1:4"]),
    ("hostfile_missing", ["--hostfile", "{tmp}/nohosts.txt"], [], None, 2, ["cannot be read", "existing file"]),
    ("host_unreachable", ["-np", "2", "-H", "nosuchhost.invalid:1,localhost:1"], [], None, 2,
     ["cannot reach host 'nosuchhost.invalid'", "remove nosuchhost.invalid"]),
    ("script_missing", ["-np", "2"], None, None, 2, ["script", "not found", "path of the training script"]),
    ("horovod_without_pytorch", ["-np", "2"], [], HOROVOD_WITHOUT_PYTORCH, 2,
     ["Horovod with PyTorch support cannot be imported", "make setup"]),
    ("horovod_without_mpi", ["-np", "2", "--controller", "mpi"], [], HOROVOD_WITHOUT_MPI, 2,
     ["Horovod was built without MPI", "--controller gloo"]),
    ("elastic_without_bounds", ["-np", "2", "--elastic"], [], None, 2, ["--elastic needs --min-np and --max-np"]),
    ("elastic_on_mpi", ["-np", "2", "--elastic", "--min-np", "1", "--max-np", "2", "--controller", "mpi"], [], None,
     2, ["--elastic needs Horovod's Gloo controller", "drop --controller mpi"]),
    ("timeline_folder_missing", ["-np", "2", "--timeline", "{tmp}/no/such/tl.json"], [], None, 2,
     ["--timeline", "does not exist", "create it"]),
    ("unknown_launcher_choice", ["-np", "2", "--controller", "nccl"], [], None, 2,
     ["invalid choice: 'nccl'", "--help"]),
    ("run_dir_not_writable", ["-np", "2"], ["--run-dir", "{tmp}/a_file/run"], None, 2,
     ["is not a writable directory", "choose another --run-dir"]),
    ("checkpoint_of_another_model", ["-np", "2"], ["--run-dir", "{run}", "--n-embd", "32"], None, 2,
     ["saved with model config n_embd=16, this run has n_embd=32", "--resume none"]),
    ("resume_path_missing", ["-np", "2"], ["--run-dir", "{run}", "--resume", "{tmp}/nowhere"], None, 2,
     ["no such file or directory", "pass a checkpoint folder"]),
    ("keep_one_checkpoint", ["-np", "2"], ["--run-dir", "{run}", "--keep", "1"], None, 2,
     ["--keep 1 is too few", "at least 2"]),
    ("heads_do_not_divide_width", ["-np", "2"], ["--run-dir", "{run}", "--n-head", "3"], None, 2,
     ["n_embd=16 is not divisible by n_head=3"]),
    ("zero_heads", ["-np", "2"], ["--run-dir", "{run}", "--n-head", "0"], None, 2, ["--n-head must be >= 1"]),
    ("negative_checkpoint_interval", ["-np", "2"], ["--run-dir", "{run}", "--checkpoint-every", "-1"], None, 2,
     ["--checkpoint-every must be >= 0", "0: only at the end"]),
    ("script_flag_not_a_number", ["-np", "2"], ["--run-dir", "{run}", "--steps", "many"], None, 2,
     ["argument --steps: invalid int value: 'many'", "--help"]),
    ("corpus_missing", ["-np", "2"], ["--run-dir", "{run}", "--corpus", "{tmp}/nocorpus.txt"], None, 2,
     ["nocorpus.txt is missing", "pass --corpus FILE"]),
    ("global_batch_larger_than_data", ["-np", "2"], ["--run-dir", "{run}", "--batch-size", "100000"], None, 2,
     ["fewer than one global batch (100000 x 2 workers)", "lower --batch-size"]),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case, launch_args, script_args, horovod_shim, code, words", CASES,
                         ids=[c[0] for c in CASES])
def test_mistake_gives_one_line_and_damages_nothing(existing_run, tmp_path, case, launch_args, script_args,
                                                    horovod_shim, code, words):
    (tmp_path / "hosts.txt").write_text("node1:many\n")
    (tmp_path / "a_file").write_text("a file, not a folder")
    fill = {"tmp": str(tmp_path), "run": str(existing_run)}
    before = tree_digest(existing_run)
    env = dict(os.environ)
    if horovod_shim:
        env.update(fake_horovod(tmp_path, horovod_shim))
    script = [str(tmp_path / "missing.py")] if script_args is None else \
        [SCRIPT, *TINY_LM, "--steps", "6", "--run-dir", str(tmp_path / "fresh"),
         *[a.format(**fill) for a in script_args]]  # a later --run-dir wins
    cmd = [sys.executable, "-m", "launch", *[a.format(**fill) for a in launch_args], *script]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=200, env=env)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "usage:" not in proc.stderr, proc.stderr[-3000:]  # one line, not argparse's usage block
    last = proc.stderr.strip().splitlines()[-1].strip()
    assert "error:" in last and all(w in last for w in words), f"last line: {last!r}\n{proc.stderr[-2000:]}"
    assert tree_digest(existing_run) == before, "the existing run directory was changed"
    assert not (tmp_path / "fresh").exists(), "a run directory was created for a run that cannot start"
