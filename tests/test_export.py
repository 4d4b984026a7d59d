"""python -m distrib.export and examples/generate.py, as a user runs them (subprocesses)."""
import subprocess
import sys

import pytest
import torch

from distrib.checkpoint import CheckpointManager, store
from distrib.export import FORMAT, ExportError, load_model_artifact, save_model_artifact
from tests.checkpoint_fixtures import REPO, cpu_ctx

sys.path.insert(0, str(REPO / "examples"))
from lm_model import GPT, CharTokenizer, GPTConfig, load_corpus  # noqa: E402

TEXT = load_corpus()  # the export verifies on its held-out tail, so the vocab must cover it


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab=CharTokenizer.from_text(TEXT).vocab, block_size=16, n_layer=1, n_head=2, n_embd=16)
    return GPT(cfg), cfg


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture
def run_dir(tmp_path):
    model, cfg = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters())
    with CheckpointManager(tmp_path / "run", cpu_ctx()) as ckpt:
        ckpt.save(10, {"model": model, "optimizer": optimizer}, model_config=cfg.to_dict())
        with torch.no_grad():
            model.head.weight.mul_(2)
        ckpt.save(20, {"model": model, "optimizer": optimizer}, model_config=cfg.to_dict())
    return tmp_path / "run", model


def test_export_run_dir_picks_newest_valid_and_generate_runs_without_horovod(tmp_path, run_dir):
    run_path, model = run_dir
    out = tmp_path / "model.pt"
    proc = run("-m", "distrib.export", run_path, out)
    assert proc.returncode == 0, proc.stderr
    assert "step 20" in proc.stdout
    art = load_model_artifact(out)
    assert art["format"] == FORMAT and art["step"] == 20 and set(art) == {"model_state", "model_config", "format", "step"}
    assert all(torch.equal(art["model_state"][k], v) for k, v in model.state_dict().items())
    # plain torch can read it, with the safe loader
    assert torch.load(out, weights_only=True)["model_config"]["n_layer"] == 1

    args = [REPO / "examples" / "generate.py", out, "--prompt", "the ", "--tokens", "30", "--seed", "3",
            "--temperature", "0.8"]
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("the ") and len(first.stdout.rstrip("\n")) == 34
    check = run("-c", "import runpy, sys; sys.argv = sys.argv[1:]\n"
                "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "assert not [m for m in sys.modules if m.startswith(('horovod', 'distrib', 'launch'))], 'imported'",
                *args)
    assert check.returncode == 0, check.stderr


def test_export_falls_back_past_damaged_newest_and_exports_a_folder(tmp_path, run_dir):
    run_path, _ = run_dir
    (run_path / "checkpoints" / "step-00000020" / store.MARKER).unlink()
    proc = run("-m", "distrib.export", run_path, tmp_path / "a.pt")
    assert proc.returncode == 0 and "step 10" in proc.stdout and "skipping damaged" in proc.stderr
    proc = run("-m", "distrib.export", run_path / "checkpoints" / "step-00000010", tmp_path / "b.pt")
    assert proc.returncode == 0 and load_model_artifact(tmp_path / "b.pt")["step"] == 10


@pytest.mark.parametrize("case", ["missing", "empty dir", "damaged folder", "wrong key"])
def test_export_bad_input_one_line_exit_2(tmp_path, run_dir, case):
    run_path, _ = run_dir
    folder = run_path / "checkpoints" / "step-00000020"
    extra = []
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "empty dir":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "damaged folder":
        (folder / store.STATE_FILE).write_bytes(b"garbage")
        src = folder
    else:
        src, extra = folder, ["--key", "net"]
    proc = run("-m", "distrib.export", src, tmp_path / "out.pt", *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrib.export: error: "), proc.stderr
    assert not (tmp_path / "out.pt").exists()


def test_export_needs_model_config(tmp_path):
    model, _ = tiny_gpt()
    with CheckpointManager(tmp_path / "run", cpu_ctx()) as ckpt:
        ckpt.save(1, {"model": model})
    proc = run("-m", "distrib.export", tmp_path / "run", tmp_path / "out.pt")
    assert proc.returncode == 2 and "without model_config" in proc.stderr


def test_generate_rejects_a_checkpoint_folder_and_unknown_characters(tmp_path, run_dir):
    run_path, model = run_dir
    gen = REPO / "examples" / "generate.py"
    proc = run(gen, run_path / "checkpoints" / "step-00000020")
    assert proc.returncode == 2 and proc.stderr.startswith("generate.py: error:") and "distrib.export" in proc.stderr
    save_model_artifact(tmp_path / "m.pt", model.state_dict(), model.config.to_dict(), 20)
    proc = run(gen, tmp_path / "m.pt", "--prompt", "\u00a7")
    assert proc.returncode == 2 and "not in the model's vocabulary" in proc.stderr


def test_generate_rejects_weights_that_do_not_fit_their_config(tmp_path):
    model, cfg = tiny_gpt()
    bigger = {**cfg.to_dict(), "n_embd": 32}
    save_model_artifact(tmp_path / "m.pt", model.state_dict(), bigger, 5)
    proc = run(REPO / "examples" / "generate.py", tmp_path / "m.pt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "do not fit its model config" in proc.stderr, proc.stderr


def test_artifact_round_trip_and_format_check(tmp_path):
    model, cfg = tiny_gpt()
    path = save_model_artifact(tmp_path / "sub" / "m.pt", model.state_dict(), cfg.to_dict(), 5)
    art = load_model_artifact(path)
    clone = GPT(GPTConfig.from_dict(art["model_config"]))
    clone.load_state_dict(art["model_state"])
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), model.state_dict().values()))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.pt"]  # no temporary file left
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ExportError, match="not a distrib-model-v1"):
        load_model_artifact(tmp_path / "other.pt")


def test_export_module_loads_without_horovod():
    proc = run("-c", "import sys\nfrom distrib.export import load_model_artifact, save_model_artifact\n"
                     "assert 'horovod' not in sys.modules and 'horovod.torch' not in sys.modules")
    assert proc.returncode == 0, proc.stderr
