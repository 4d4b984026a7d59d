"""launch/slurm.py (the sbatch generator) and the checked-in slurm/*.sbatch scripts."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.slurm import RUN_BODY, main, valid_time

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"

# golden file -> the command line that produced it (regenerate: python -m launch.slurm ARGS > FILE)
CASES = {
    "slurm_multi_gpu.sbatch": ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8", "--time", "04:00:00",
                               "--partition", "gpu", "--", "examples/train_lm.py", "--steps", "5000",
                               "--run-dir", "runs/my lm"],
    "slurm_single_gpu.sbatch": ["--gpus-per-node", "4", "--time", "02:00:00", "--", "examples/train_lm.py",
                                "--steps", "5000"],
    "slurm_cpu_no_requeue.sbatch": ["--tasks-per-node", "2", "--time", "1-00:30:00", "--job-name", "cpu-test",
                                    "--no-requeue", "--", "examples/train_mlp.py"],
    "slurm_torch_multi_gpu.sbatch": ["--engine", "torch", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task",
                                     "8", "--time", "04:00:00", "--", "examples/train_lm.py", "--steps", "5000"],
}


@pytest.mark.parametrize("golden", sorted(CASES))
def test_generator_matches_golden_line_by_line(golden, capsys):
    assert main(CASES[golden]) == 0
    got = capsys.readouterr().out.splitlines()
    want = (GOLDEN / golden).read_text().splitlines()
    for number, (g, w) in enumerate(zip(got, want), 1):
        assert g == w, f"{golden}:{number} differs"
    assert len(got) == len(want), f"{golden}: {len(got)} lines generated, {len(want)} expected"


@pytest.mark.parametrize("golden", ["slurm_multi_gpu.sbatch", "slurm_torch_multi_gpu.sbatch"])
def test_generated_script_is_valid_bash(golden, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text((GOLDEN / golden).read_text())
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--time", "01:00:00", "--", "x.py"], "--nodes 0 must be >= 1"),
    (["--time", "1:00", "--", "x.py"], "is not HH:MM:SS"),
    (["--time", "01:61:00", "--", "x.py"], "is not HH:MM:SS"),
    (["--time", "00:00:00", "--", "x.py"], "is zero"),
    (["--time", "01:00:00"], "no training script"),
    (["--time", "01:00:00", "--gpus-per-node", "-1", "--", "x.py"], "--gpus-per-node -1"),
    (["--time", "01:00:00", "--cpus-per-task", "0", "--", "x.py"], "--cpus-per-task 0"),
    (["--time", "01:00:00", "--job-name", "a b", "--", "x.py"], "--job-name"),
    (["--nodes", "two", "--time", "01:00:00", "--", "x.py"], "invalid int value"),
    (["--engine", "nccl", "--time", "01:00:00", "--", "x.py"], "invalid choice: 'nccl'"),
])
def test_generator_rejects_bad_input_with_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()  # one line: no usage block, no traceback
    assert message in line and line.startswith("python -m launch.slurm: error: "), proc.stderr


@pytest.mark.parametrize("text", ["00:00:01", "4:00:00", "72:00:00", "2-00:00:00", "1-23:59:59"])
def test_valid_times(text):
    assert valid_time(text) == text


@pytest.mark.parametrize("script", sorted((REPO / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_checked_in_scripts(script):
    """Same directives and the same run body as the generator (only the command differs)."""
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for directive in ("--signal=USR2@90", "--open-mode=append", "--requeue", "--output=%x-%j.out"):
        assert re.search(rf"^#SBATCH {re.escape(directive)}$", text, re.M), f"{script.name} lacks {directive}"
    body = [line for line in RUN_BODY.splitlines() if line and "%(srun)s" not in line]
    lines = text.splitlines()
    positions = [lines.index(line) for line in body]  # ValueError names a missing line
    assert positions == sorted(positions)
    # ENGINE picks the generator's srun line for Horovod or for torch (srun_lines)
    for line in ("    horovod) RUN=(srun --mpi=pmix --kill-on-bad-exit=1 python) ;;",
                 '    torch) export MASTER_PORT="$(python -m launch.srun_task --free-port)"',
                 "           RUN=(srun --mpi=none --kill-on-bad-exit=1 python -m launch.srun_task) ;;",
                 '"${RUN[@]}" "${SCRIPT}" --run-dir "${RUN_DIR}" --resume auto --checkpoint-every '
                 '"${CHECKPOINT_EVERY}" "$@" &'):
        assert line in lines, f"{script.name} lacks {line!r}"
