"""Everything a user does, run on this machine's GPUs, with a one-page verdict (``make gpu-check``).

scripts/gpu_check.sh builds Horovod with NCCL first when it is missing, then runs this. Each
check is a real run through the project's launcher, with a timeout:

- the step under ``torch.cuda.set_sync_debug_mode("error")`` (tests/scripts/step_syncs.py): no
  synchronising CUDA call in backward + step in fp32/bf16, fp16 no more than plain torch's
  GradScaler loop, for shard None/"optimizer"/"gradients";
- ``examples/train_lm.py`` in bf16, fp16 and ``--shard gradients``, each evaluating mid-run and at
  the end; a run killed (SIGKILL to the launcher's whole process group) after its first checkpoint
  and resumed from it;
- export of the GPU-trained model (pt, and ONNX where onnxruntime is installed), verified by the
  export itself against the trained weights;
- the README's API snippets (the sections tests/test_run.py runs), in one process on the GPU;
- two workers on one GPU refused before the first collective (where Horovod has NCCL);
- the step-time table at world size 1 (scripts/gpu_check_bench.py), and with 2+ GPUs 2 workers.

``--cpu`` runs the same checks on the CPU with a tiny model (the ones that need a GPU are listed
as skipped), so the script itself is exercised on machines without one. Results:
``runs/gpu-check/summary.md`` and the JSON files beside it. Exit code 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = ["--batch-size", "4", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16"]
TINY_BENCH = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
              "--rounds", "2", "--steps", "2", "--warmup", "1"]


class CheckFailed(Exception):
    """A check's verdict: the message says what was wrong."""


class Checks:
    def __init__(self, out: Path, cpu: bool, gpus: int):
        self.out, self.cpu, self.gpus = out, cpu, gpus
        self.rows: List[dict] = []
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}  # distrib, launch, benchmarks
        self.current, self.commands = "", 0  # the check running, and the commands run (to name their logs)

    def run(self, name: str, fn: Callable[[], str], skip: Optional[str] = None) -> None:
        start = time.monotonic()
        if skip:
            self.rows.append({"check": name, "result": "skipped", "seconds": 0.0, "detail": skip})
            print(f"[gpu-check] {name}: skipped ({skip})", flush=True)
            return
        print(f"[gpu-check] {name} ...", flush=True)
        self.current = name
        try:
            detail, result = fn(), "ok"
        except (CheckFailed, subprocess.TimeoutExpired) as exc:
            detail, result = str(exc).strip(), "FAILED"
        seconds = time.monotonic() - start
        self.rows.append({"check": name, "result": result, "seconds": round(seconds, 1), "detail": detail})
        print(f"[gpu-check] {name}: {result} in {seconds:.0f} s: {detail}", flush=True)

    def launch(self, np: int, script: str, args: Sequence[str], timeout: float, env: Optional[dict] = None,
               expect_ok: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "launch", "-np", str(np), script, *map(str, args)]
        return self.command(cmd, timeout, env, expect_ok)

    def command(self, cmd: Sequence[str], timeout: float, env: Optional[dict] = None, expect_ok: bool = True,
                cwd: Path = ROOT) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        self.commands += 1
        log = self.out / "logs" / f"{self.commands:02d}-{self.current}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
        if expect_ok and proc.returncode != 0:
            raise CheckFailed(f"exit {proc.returncode}: {_last_lines(proc.stderr or proc.stdout)} (log: {log})")
        return proc


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-n:])


# -- the checks ---------------------------------------------------------------------------------------
def check_sync(c: Checks) -> str:
    out = c.out / "step_syncs.json"
    np = 2 if c.cpu or c.gpus >= 2 else 1
    args = ["--out", out, "--device", "cpu" if c.cpu else "cuda"] + ([] if c.cpu else ["--optimizer", "adamw"])
    c.launch(np, "tests/scripts/step_syncs.py", args, timeout=240)
    problems, cases = [], 0
    for rank, result in enumerate(json.loads(out.read_text())):
        for name, got in result["cases"].items():
            if not name.startswith("distrib-") or "unused" in name:
                continue
            cases += 1
            precision = name.split("-")[1]
            plain = result["cases"][f"plain-{precision}"]
            if c.cpu:  # counted by the dispatch-mode proxy, as tests/test_step_syncs.py does
                if got["per_step"] != plain["per_step"]:
                    problems.append(f"rank {rank} {name}: {got['per_step']} vs plain {plain['per_step']}: "
                                    f"{got['calls']}")
            elif got["cuda_error"]:
                problems.append(f"rank {rank} {name}: {got['cuda_error']}")
            elif (plain["cuda_error"] is None
                  and max(got["cuda_syncs"], default=0) > max(plain["cuda_syncs"], default=0)):
                problems.append(f"rank {rank} {name}: {got['cuda_syncs']} synchronising calls per step, plain "
                                f"torch {plain['cuda_syncs']}")
    if problems:
        raise CheckFailed("; ".join(problems))
    mode = "dispatch-mode count" if c.cpu else 'set_sync_debug_mode("error"), fp16 "warn"'
    return f"{cases} cases on {np} worker(s), {mode}: no host wait in backward+step beyond plain torch's"


def train_args(c: Checks, run_dir: Path, *extra: str) -> List[str]:
    size = TINY_LM if c.cpu else []
    return ["--run-dir", run_dir, "--resume", "none", "--eval-every", "20", "--checkpoint-every", "20",
            "--steps", "40", "--sample-tokens", "20", *size, *extra]


def check_train(c: Checks, label: str, *extra: str) -> str:
    np = 2 if (c.cpu or c.gpus >= 2) and "--shard" in extra else 1
    proc = c.launch(np, "examples/train_lm.py", train_args(c, c.out / f"lm-{label}", *extra), timeout=240)
    loss = re.search(r"validation loss ([\d.]+)", proc.stdout)
    evals = len(re.findall(r"val_loss", (c.out / f"lm-{label}" / "metrics.jsonl").read_text()))
    if not loss or evals < 2:
        raise CheckFailed(f"no validation loss in the output, or {evals} evaluations logged (want 2)")
    return f"{np} worker(s), 40 steps, validation loss {loss.group(1)} ({evals} evaluations)"


def check_kill_resume(c: Checks) -> str:
    run_dir = c.out / "lm-kill"
    total = "60" if c.cpu else "400"  # long enough to be killed mid-run, short enough to finish after
    steps = ["--steps", total, "--checkpoint-every", "20", "--eval-every", "0", "--sample-tokens", "0"]
    args = ["--run-dir", run_dir, *steps, *(TINY_LM if c.cpu else [])]
    cmd = [sys.executable, "-m", "launch", "-np", "1", "examples/train_lm.py", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while not list(run_dir.glob("checkpoints/step-*/COMPLETE.json")):
            if proc.poll() is not None:
                raise CheckFailed(f"the run ended (exit {proc.returncode}) before its first checkpoint")
            if time.monotonic() > deadline:
                raise CheckFailed("no checkpoint within 180 s")
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, mid-run
        proc.wait()
    killed_at = sorted(run_dir.glob("checkpoints/step-*/COMPLETE.json"))[-1].parent.name
    resumed = c.command(cmd, timeout=240)
    started = re.search(rf"steps (\d+)->{total}", resumed.stdout)
    if not started or int(started.group(1)) == 0 or "validation loss" not in resumed.stdout:
        raise CheckFailed(f"the rerun did not resume from a checkpoint: {_last_lines(resumed.stdout)}")
    return f"killed with {killed_at} on disk; resumed at step {started.group(1)} and finished step {total}"


def check_export(c: Checks) -> str:
    source = c.out / "lm-bf16"
    done = []
    formats = [("model.pt", "pt")]
    if _importable("onnxruntime") and _importable("onnxscript"):
        formats.append(("model.onnx", "onnx"))
    for name, fmt in formats:
        proc = c.command([sys.executable, "-m", "distrib.export", source, c.out / "export" / name, "--format", fmt],
                         timeout=180)
        diff = re.search(r"max \|logit difference\| (\S+)", proc.stdout)
        done.append(f"{fmt} (max |logit difference| {diff.group(1) if diff else '?'})")
    return "of the bf16 run trained above: " + ", ".join(done)


README_RUNNER = """
import json, sys, traceback
for i, code in enumerate(json.load(open(sys.argv[1]))):
    try:
        exec(compile(code, f"README snippet {i}", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README snippet {i} failed:\\n{code}")
import torch, distrib
print("ran", i + 1, "device", distrib.init().device)
"""


def check_readme(c: Checks) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A long job in a handful of lines"):text.index("\n## Launching")]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S)
              if "launch --elastic" not in b.splitlines()[0]]  # as tests/test_run.py picks them
    work = c.out / "readme"
    work.mkdir(parents=True, exist_ok=True)
    (work / "snippets.json").write_text(json.dumps(blocks))
    (work / "runner.py").write_text(README_RUNNER)
    proc = c.command([sys.executable, "runner.py", "snippets.json"], timeout=240, cwd=work)
    ran = re.search(r"ran (\d+) device (\S+)", proc.stdout)
    if not ran or (not c.cpu and not ran.group(2).startswith("cuda")):
        raise CheckFailed(f"the snippets did not run on the GPU: {_last_lines(proc.stdout)}")
    return f"{ran.group(1)} snippets ran in one process on {ran.group(2)}"


def check_gpu_sharing(c: Checks) -> str:
    proc = c.launch(2, "examples/train_mlp.py", [], timeout=120, env={"CUDA_VISIBLE_DEVICES": "0"}, expect_ok=False)
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "would share one GPU" in line]
    if proc.returncode == 0 or not said:
        raise CheckFailed(f"2 workers on GPU 0 were not refused (exit {proc.returncode}): {_last_lines(proc.stderr)}")
    return f"exit {proc.returncode}: {said[0].strip()[:160]}..."


def check_bench(c: Checks, np: int) -> str:
    out = c.out / f"bench-{np}.json"
    extra = TINY_BENCH + ["--cpu"] if c.cpu else []
    variants = [] if np == 1 else ["--variants", "distrib,distrib-gradients,horovod,ddp"]
    proc = c.launch(np, "scripts/gpu_check_bench.py", ["--out", out, *extra, *variants], timeout=300)
    table = proc.stdout[proc.stdout.index("world size"):] if "world size" in proc.stdout else proc.stdout
    (c.out / f"bench-{np}.md").write_text(table)
    result = json.loads(out.read_text())
    return "; ".join(f"{n} {result['ms_per_step'][n]['median']:.1f} ms ({result['vs_baseline'][n]['median']:.2f}x "
                     f"{result['baseline']})" for n in result["ms_per_step"])


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def environment(cpu: bool) -> dict:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": 0, "nccl": False, "names": []}
    if torch.cuda.is_available():
        info["gpus"] = torch.cuda.device_count()
        info["names"] = sorted({torch.cuda.get_device_name(i) for i in range(info["gpus"])})
    try:
        import horovod.torch as hvd
        info["horovod"] = __import__("horovod").__version__
        info["nccl"] = bool(hvd.nccl_built())
    except ImportError as exc:
        raise SystemExit(f"gpu-check: Horovod with PyTorch is not importable ({exc}); run scripts/gpu_check.sh, "
                         "which builds it") from exc
    if not cpu and info["gpus"] == 0:
        raise SystemExit("gpu-check: torch sees no GPU here (torch.cuda.is_available() is False); "
                         "use --cpu for a dry run on the CPU")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU with a tiny model")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    p.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    args = p.parse_args(argv)
    info = environment(args.cpu)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Checks(args.out, args.cpu, info["gpus"])
    where = "CPU (dry run)" if args.cpu else f"{info['gpus']} x {', '.join(info['names'])}"
    print(f"[gpu-check] torch {info['torch']} (CUDA {info['cuda']}), Horovod {info.get('horovod')} "
          f"{'with' if info['nccl'] else 'without'} NCCL, on {where}", flush=True)
    no_gpu = "needs a GPU" if args.cpu else None
    checks = [
        ("sync", lambda: check_sync(c), None),
        ("train-bf16", lambda: check_train(c, "bf16", "--precision", "bf16"), None),
        ("train-fp16", lambda: check_train(c, "fp16", "--precision", "fp16"), None),
        ("train-shard-gradients", lambda: check_train(c, "shard", "--precision", "bf16", "--shard", "gradients"), None),
        ("kill-resume", lambda: check_kill_resume(c), None),
        ("export", lambda: check_export(c), None),
        ("readme", lambda: check_readme(c), None),
        ("gpu-sharing", lambda: check_gpu_sharing(c),
         no_gpu or (None if info["nccl"] else "Horovod without NCCL: workers may share a GPU")),
        ("bench-1", lambda: check_bench(c, 1), None),
        ("bench-2", lambda: check_bench(c, 2), None if args.cpu or info["gpus"] >= 2 else "needs 2 GPUs"),
    ]
    only = set(filter(None, args.only.split(",")))
    start = time.monotonic()
    for name, fn, skip in checks:
        if not only or name in only:
            c.run(name, fn, skip)
    total = time.monotonic() - start
    lines = [f"# gpu-check: {where}", "",
             f"torch {info['torch']} (CUDA {info['cuda']}), Horovod {info.get('horovod')} "
             f"{'with' if info['nccl'] else 'without'} NCCL; {total:.0f} s", "",
             "| check | result | s | detail |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['result']} | {r['seconds']} | {r['detail'].replace('|', '/')} |" for r in c.rows]
    for np in (1, 2):
        table = args.out / f"bench-{np}.md"
        if table.exists() and any(r["check"] == f"bench-{np}" and r["result"] == "ok" for r in c.rows):
            lines += ["", table.read_text().strip()]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps({"environment": info, "seconds": total, "checks": c.rows},
                                                      indent=1))
    print("\n".join(lines), flush=True)
    failed = [r["check"] for r in c.rows if r["result"] == "FAILED"]
    if failed:
        print(f"[gpu-check] FAILED: {', '.join(failed)} (logs in {args.out / 'logs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
