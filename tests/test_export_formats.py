"""python -m distrib.export --format pt|torchscript|onnx [--quantize int8] on a trained LM of the
example's default size, and examples/serve.py: each artifact is loaded back in a fresh process
and compared with the trained model in this one."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from distrib.checkpoint import CheckpointManager
from distrib.export.__main__ import main
from distrib.export import formats
from distrib.export.formats import load_pt, read_metadata
from distrib.export import Origin, record_origin
from distrib.export.model import heldout_windows, load_factory
from distrib.export.pipeline import ExportRequest, export
from tests.checkpoint_fixtures import REPO, SCRIPTS, cpu_ctx

sys.path.insert(0, str(REPO / "examples"))
from lm_model import GPT, CharTokenizer, GPTConfig, load_corpus  # noqa: E402

MODEL_CODE = f"{REPO / 'examples' / 'lm_model.py'}:GPT"
CORPUS = REPO / "examples" / "data" / "corpus.txt"

STEPS = 30
# Modules serve.py must not import: the library, the launcher, Horovod and the training code.
NOT_SERVING = ("distrib", "launch", "horovod", "lm_model", "train_lm", "generate", "examples", "tests")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the subprocesses: on a loaded machine two spinning threads per
    process made the 30 training steps 15x slower. The numbers compared do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread, tmp_path_factory):
    """The example LM at its default size, trained STEPS steps in this process, checkpointed."""
    root = tmp_path_factory.mktemp("export")
    text = load_corpus()
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=tokenizer.vocab))
    block = model.config.block_size
    ids = torch.tensor(tokenizer.encode(text[:int(len(text) * 0.9)]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        starts = torch.randint(0, len(ids) - block - 1, (16,))
        batch = torch.stack([ids[s:s + block + 1] for s in starts])
        model(batch[:, :-1], batch[:, 1:].contiguous()).backward()
        optimizer.step()
        optimizer.zero_grad()
    with CheckpointManager(root / "run", cpu_ctx()) as ckpt:
        ckpt.save(STEPS, {"model": model, "optimizer": optimizer}, model_config=model.config.to_dict())
    record_origin(root / "run", Origin(model=MODEL_CODE, corpus=str(CORPUS), heldout_from=0.9))  # as train_lm does
    windows = heldout_windows(CORPUS, tokenizer.vocab, block, 0.9)
    return root, model.eval(), windows


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def python(*args, cwd=REPO, timeout=180):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_each_format_loads_in_a_fresh_process_with_the_trained_models_outputs(trained, capsys):
    root, model, windows = trained
    out = root / "fp32"
    for fmt in ("pt", "torchscript"):
        code, stdout, err = cli(capsys, root / "run", out / f"model.{fmt}", "--format", fmt)
        assert code == 0, err
        assert f"exporting step {STEPS} of " in stdout and "max |logit difference| 0.00e+00" in stdout, stdout
    # the real command line, in its own process, for the format with its own runtime
    proc = python("-m", "distrib.export", root / "run", out / "model.onnx", "--format", "onnx")
    assert proc.returncode == 0, proc.stderr
    assert "verified with ONNX Runtime" in proc.stdout and "(tolerance 1e-04)" in proc.stdout, proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt", "model.torchscript"]  # no temp files

    ids = windows[3:7, :-1]  # held-out text, a batch other than the one the export checked
    np.save(out / "ids.npy", ids.numpy())
    proc = python(SCRIPTS / "export_reload.py", out / "ids.npy", out / "logits.npz",
                  *(f"{fmt}={out / f'model.{fmt}'}" for fmt in ("pt", "torchscript", "onnx")))
    assert proc.returncode == 0, proc.stderr
    got = np.load(out / "logits.npz")
    with torch.no_grad():
        want = model(ids).numpy()
    assert np.array_equal(got["pt"], want)
    assert np.abs(got["torchscript"] - want).max() <= 1e-5
    assert np.abs(got["onnx"] - want).max() <= 1e-4
    for fmt in ("torchscript", "onnx"):
        meta = json.loads(str(got[f"{fmt}_meta"]))
        assert meta["vocab"] == model.config.vocab and meta["block_size"] == model.config.block_size
        assert meta["step"] == STEPS and meta["quantization"] == "none"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_serve_generates_the_trained_models_text_with_nothing_from_the_repo(trained, capsys, fmt, tmp_path):
    root, model, _ = trained
    artifact = root / "fp32" / f"model.{fmt}"
    if not artifact.exists():  # this test alone (pytest -k serve)
        assert cli(capsys, root / "run", artifact, "--format", fmt)[0] == 0
    # serve.py and the model copied out of the checkout, run by an isolated interpreter (-I: no
    # PYTHONPATH, no script or working dir on sys.path) that then lists what got imported
    shutil.copy(REPO / "examples" / "serve.py", tmp_path / "serve.py")
    shutil.copy(artifact, tmp_path / artifact.name)
    forbidden = NOT_SERVING + (("torch",) if fmt == "onnx" else ())
    check = ("import runpy, sys\nsys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
             f"bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r}]\n"
             "assert not bad, f'serve.py imported {bad}'")
    proc = python("-I", "-c", check, "serve.py", artifact.name, "--prompt", "The ", "--tokens", "40",
                  "--temperature", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tokenizer = CharTokenizer(model.config.vocab)
    want = model.generate(torch.tensor([tokenizer.encode("The ")]), 40, temperature=0)
    assert proc.stdout == tokenizer.decode(want[0].tolist()) + "\n"

    if fmt == "onnx":  # sampling is the same numpy code for both formats; this one starts fast (no torch)
        sampled = [python("-I", "serve.py", artifact.name, "--tokens", "30", "--temperature", "0.8", "--seed", "5",
                          cwd=tmp_path) for _ in range(2)]
        assert sampled[0].returncode == 0 and sampled[0].stdout == sampled[1].stdout
        assert len(sampled[0].stdout) == 1 + 30 + 1  # prompt "\n", 30 characters, print's newline


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt"])
def test_int8_is_smaller_keeps_the_loss_and_is_verified(trained, fmt):
    root, model, windows = trained
    out = root / "int8" / f"model.{fmt}"
    lines = []
    figures = export(ExportRequest(source=root / "run", out=out, fmt=fmt, quantize="int8"), say=lines.append)
    report = "\n".join(lines)
    assert "file size" in report and "val loss" in report and "CPU latency" in report, report
    # the goal for the example LM: >= 2.5x smaller, held-out loss within 2 % of fp32
    assert figures["bytes_fp32"] / figures["bytes_int8"] >= 2.5, report
    assert abs(figures["val_loss_int8"] / figures["val_loss_fp32"] - 1) <= 0.02, report
    assert figures["ms_fp32"] > 0 and figures["ms_int8"] > 0 and figures["sequences"] == len(windows)
    assert out.stat().st_size == figures["bytes_int8"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    # loaded back as a deployment does: quantized (not the fp32 numbers), yet close to them
    got = formats.load(fmt, out, load_factory(MODEL_CODE))(windows[:2, :-1])
    with torch.no_grad():
        want = model(windows[:2, :-1])
    assert not torch.equal(got, want) and (got - want).abs().max().item() < 2.0
    if fmt == "pt":
        quantized = [type(m).__module__ for m in load_pt(out, load_factory(MODEL_CODE)).modules()]
        assert sum(name.startswith("torch.ao.nn.quantized.dynamic") for name in quantized) == 9  # every Linear
    else:
        assert read_metadata(fmt, out)["quantization"] == "dynamic-int8"


def test_a_mismatch_beyond_the_tolerance_is_refused_and_nothing_is_left(trained, capsys):
    root, _, _ = trained
    out = root / "refused" / "deploy" / "model.onnx"  # neither folder exists yet
    code, stdout, err = cli(capsys, root / "run", out, "--format", "onnx", "--atol", "1e-12")
    assert code == 2 and "verified with ONNX Runtime" in stdout
    assert err.count("\n") == 1 and err.startswith("distrib.export: error: refused: the onnx artifact differs "), err
    assert "nothing written" in err and not (root / "refused").exists()  # the folders it made are gone too


def test_serve_refuses_what_it_cannot_serve_in_one_line(trained, tmp_path, capsys):
    import serve
    root, _, _ = trained
    pt = root / "fp32" / "model.pt"
    if not pt.exists():
        assert cli(capsys, root / "run", pt)[0] == 0
    (tmp_path / "plain.onnx").write_bytes(b"not a model")
    cases = {tmp_path / "nope.onnx": "is not a file", pt: "is a torch.save file (--format pt), not TorchScript",
             tmp_path / "plain.onnx": "is not a model exported by python -m distrib.export"}
    for path, why in cases.items():
        capsys.readouterr()
        assert serve.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("serve.py: error: ") and why in err, err


def test_int8_beyond_the_loss_limit_is_refused_and_nothing_is_left(trained, capsys):
    """Int8's known failure: an outlier weight sets the per-tensor scale and the others round to
    ~0. The outlier here multiplies a feature that LayerNorm zeroes, so fp32 does not see it."""
    root, model, _ = trained
    outliers = copy.deepcopy(model)
    with torch.no_grad():
        outliers.ln_f.weight[0] = outliers.ln_f.bias[0] = 0
        outliers.head.weight[:, 0] = 1000 * outliers.head.weight.abs().max()
    with CheckpointManager(root / "outliers", cpu_ctx()) as ckpt:
        ckpt.save(STEPS, {"model": outliers}, model_config=outliers.config.to_dict())
    record_origin(root / "outliers", Origin(model=MODEL_CODE, corpus=str(CORPUS), heldout_from=0.9))
    out = root / "int8-refused" / "model.pt"
    code, stdout, err = cli(capsys, root / "outliers", out, "--quantize", "int8")
    assert "val loss" in stdout and code == 2, stdout + err
    assert err.count("\n") == 1 and err.startswith("distrib.export: error: refused: int8 raises the held-out loss by "), err
    assert "> --max-loss-increase 2%; nothing written" in err and not out.parent.exists()
