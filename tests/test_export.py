"""python -m distrib.export and examples/generate.py, as a user runs them (subprocesses)."""
import contextlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

from distrib.checkpoint import CheckpointManager, sharded, store
from distrib.export import FORMAT, ExportError, Origin, load_model_artifact, record_origin, save_model_artifact
from distrib.export.__main__ import main
from distrib.sharding.optimizer import ZeroShard
from tests.checkpoint_fixtures import REPO, cpu_ctx
from tests.helpers import tree_digest

sys.path.insert(0, str(REPO / "examples"))
from lm_model import GPT, CharTokenizer, GPTConfig, load_corpus  # noqa: E402

TEXT = load_corpus()  # the export verifies on its held-out tail, so the vocab must cover it
MODEL_CODE = f"{REPO / 'examples' / 'lm_model.py'}:GPT"
CORPUS = str(REPO / "examples" / "data" / "corpus.txt")
# what examples/train_lm.py records in its run dir for the export
ORIGIN = Origin(model=MODEL_CODE, corpus=CORPUS, heldout_from=0.9)


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
    record_origin(tmp_path / "run", ORIGIN)
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


def test_export_falls_back_past_damaged_newest_and_exports_a_folder(tmp_path, run_dir, capsys):
    run_path, _ = run_dir
    (run_path / "checkpoints" / "step-00000020" / store.MARKER).unlink()
    assert main([str(run_path), str(tmp_path / "a.pt")]) == 0
    out, err = capsys.readouterr()
    assert "step 10" in out and "skipping damaged" in err
    assert main([str(run_path / "checkpoints" / "step-00000010"), str(tmp_path / "b.pt")]) == 0
    assert load_model_artifact(tmp_path / "b.pt")["step"] == 10


BAD_INPUT = ["missing", "empty dir", "damaged folder", "wrong key", "no model_config", "damaged model_config",
             "model_config not a dict", "mid-write", "unknown format", "unknown quantization", "output is a dir",
             "output under a file", "no held-out text", "model code missing", "model code not recorded",
             "held-out text not recorded"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_export_bad_input_one_line_exit_2_nothing_written(tmp_path, run_dir, case, capsys):
    run_path, _ = run_dir
    folder = run_path / "checkpoints" / "step-00000020"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    src, out, extra = folder, out_dir / "model.onnx", []
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "empty dir":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "damaged folder":
        (folder / store.STATE_FILE).write_bytes(b"garbage")
    elif case == "wrong key":
        extra = ["--key", "net"]
    elif case.endswith("model_config") or case == "model_config not a dict":
        # the marker is not covered by the checksums: a hand-edited or corrupted config gets this far
        marker = json.loads((folder / store.MARKER).read_text())
        marker["model_config"] = {"no model_config": None, "damaged model_config": {**marker["model_config"], "n_head": 3},
                                  "model_config not a dict": "n_layer=1"}[case]
        (folder / store.MARKER).write_text(json.dumps(marker))
    elif case == "mid-write":  # what a save in progress (or killed) looks like: a temporary folder, no marker
        src = folder.with_name(".tmp-step-00000030-1234-abcd")
        shutil.copytree(folder, src)
        (src / store.MARKER).unlink()
    elif case == "unknown format":
        extra = ["--format", "tflite"]
    elif case == "unknown quantization":
        extra = ["--quantize", "int4"]
    elif case == "output is a dir":
        out = out_dir
    elif case == "output under a file":
        (out_dir / "file").write_text("x")
        out = out_dir / "file" / "model.onnx"
    elif case == "no held-out text":
        extra = ["--corpus", tmp_path / "nope.txt"]
    elif case == "model code not recorded":  # a run that recorded no origin, and no --model
        (run_path / "export.json").unlink()
        extra = ["--corpus", CORPUS]
    elif case == "held-out text not recorded":
        record_origin(run_path, Origin(model=MODEL_CODE))
    else:
        extra = ["--model", tmp_path / "nope.py:GPT"]
    before = tree_digest(tmp_path)
    with pytest.raises(SystemExit) if case.startswith("unknown ") else contextlib.nullcontext() as exited:
        code = main([str(src), str(out), *map(str, extra)])
    code = exited.value.code if exited else code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrib.export: error: "), err
    assert tree_digest(tmp_path) == before  # nothing written, no temporary file, no folder
    if case == "model code not recorded":
        assert "does not record the model's code; pass --model FILE.py:NAME" in err
    if case == "held-out text not recorded":
        assert "does not record the text it was trained on; pass --corpus FILE" in err


def test_a_model_file_carries_its_origin_and_the_users_flags_override_it(tmp_path, run_dir, capsys):
    """train_lm's model.pt carries what export needs (no flags); a flag replaces the recorded part."""
    _, model = run_dir
    src = tmp_path / "trained.pt"
    save_model_artifact(src, model.state_dict(), model.config.to_dict(), 20, origin=ORIGIN)
    assert load_model_artifact(src)["origin"] == ORIGIN.to_dict()
    assert main([str(src), str(tmp_path / "model.pt")]) == 0, capsys.readouterr().err
    assert "max |logit difference| 0.00e+00" in capsys.readouterr().out
    # the recorded corpus is replaced by the user's, here one that does not exist
    assert main([str(src), str(tmp_path / "other.pt"), "--corpus", str(tmp_path / "nope.txt")]) == 2
    assert f"held-out text {tmp_path / 'nope.txt'} not found" in capsys.readouterr().err


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


def test_export_of_a_sharded_checkpoint_validates_every_shard(tmp_path, capsys):
    """A checkpoint of a ZeRO run (distrib.wrap(..., shard=...)): rank 0's state.pt holds the
    replicated model and the optimizer's layout, each rank's optimizer pieces are in shard-N.pt,
    all listed in the marker. Written here in one process as CheckpointManager lays it out."""
    model, cfg = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)).backward()
    optimizer.step()
    entries = []
    for rank in range(2):
        mine = torch.optim.AdamW(model.parameters(), lr=0.01)
        mine.load_state_dict(optimizer.state_dict())
        entries.append(ZeroShard(mine, None, rank, 2, name="optimizer", bucket_bytes=4096).state_dict())
    files = {store.STATE_FILE: {"step": 7, "state": sharded.strip({"model": model.state_dict(), "optimizer": entries[0]})},
             store.RNG_FILE: [], **{sharded.shard_file(r): {"optimizer": e["pieces"]} for r, e in enumerate(entries)}}
    folder = store.write_checkpoint(tmp_path / "run" / "checkpoints", 7, files,
                                    {"world_size": 2, "model_config": cfg.to_dict()})
    record_origin(tmp_path / "run", ORIGIN)
    assert sharded.is_sharded(store.load_file(folder, store.STATE_FILE)["state"]["optimizer"])

    assert main([str(tmp_path / "run"), str(tmp_path / "model.pt")]) == 0, capsys.readouterr().err
    art = load_model_artifact(tmp_path / "model.pt")
    assert art["step"] == 7 and all(torch.equal(art["model_state"][k], v) for k, v in model.state_dict().items())

    with open(folder / sharded.shard_file(1), "r+b") as f:  # one flipped byte in rank 1's shard
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert main([str(folder), str(tmp_path / "again.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"sha256 of {sharded.shard_file(1)} does not match" in err, err
    assert not (tmp_path / "again.pt").exists()
