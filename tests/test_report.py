"""python -m distrib.report: plots and summary from a real run's metrics.jsonl, and bad input."""
import json
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from distrib.report import load_run, main, summarize, summary_text
from tests.helpers import TINY_LM_MODEL, tree_digest

REPO = Path(__file__).resolve().parents[1]
TINY_LM = [*TINY_LM_MODEL, "--warmup", "2", "--log-every", "2", "--eval-every", "10",
           "--checkpoint-every", "10"]


def png_size(path: Path):
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real 2-worker train_lm run through the launcher (20 steps, evaluation and checkpoints)."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    proc = subprocess.run([sys.executable, "-m", "launch", "-np", "2", "examples/train_lm.py", "--steps", "20",
                           "--run-dir", str(run_dir), *TINY_LM], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run_dir


@pytest.mark.timeout(300)
def test_report_of_a_real_run(real_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(real_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    for name in ("loss_lr.png", "throughput.png", "breakdown.png"):
        width, height = png_size(out / name)
        assert width >= 600 and height >= 300, (name, width, height)
        assert f"wrote {out / name}" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_step"] == 20 and summary["logged_steps"] == len(steps) == 10
    assert summary["final_loss"] == pytest.approx(steps[-1]["loss"])
    assert summary["first_loss"] == pytest.approx(steps[0]["loss"])
    assert summary["world_sizes"] == [2] and summary["restarts"] == 0
    assert summary["events"]["eval"] == 2 and summary["events"]["final"] == 1
    assert set(summary["breakdown_ms"]) == {"t_data", "t_compute", "t_allreduce", "t_optimizer", "t_checkpoint",
                                            "t_other"}
    assert summary["breakdown_ms"]["t_compute"] > 0
    assert summary["median_samples_per_s"] == pytest.approx(statistics.median(r["samples_per_s"] for r in steps))
    assert summary["min_loss"] == pytest.approx(min(r["loss"] for r in steps))
    text = (out / "summary.txt").read_text()
    assert text in printed and "steps: 20 (10 logged)" in text and "forward + backward" in text
    assert f"median {summary['median_samples_per_s']:.1f} samples/s" in text
    assert f"-> {steps[-1]['loss']:.4f} (min {summary['min_loss']:.4f})" in text
    assert "world sizes: 2; restarts: 0" in text and "eval x2, final x1" in text


@pytest.mark.timeout(120)
def test_default_output_folder_is_inside_the_run(real_run):
    proc = subprocess.run([sys.executable, "-m", "distrib.report", str(real_run)], cwd=REPO,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert (real_run / "report" / "loss_lr.png").is_file() and (real_run / "report" / "summary.txt").is_file()


def write_metrics(run_dir: Path, lines) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def step(n, t, loss, world=2, restarts=0):
    return {"step": n, "loss": loss, "lr": 0.01, "samples_per_s": 100.0 * world, "world_size": world,
            "time": t, "restarts": restarts, "t_data": 1.0, "t_compute": 6.0, "t_allreduce": 2.0,
            "t_optimizer": 1.0, "t_checkpoint": 0.0, "t_other": 0.0}


def test_restarts_resizes_and_redone_steps(tmp_path):
    """A restart from the checkpoint at step 2 redoes step 3; an elastic resize goes 2 -> 1 worker;
    a preemption at step 5 and a resume on 2 workers."""
    run = tmp_path / "run"
    write_metrics(run, [
        step(1, 100.0, 4.0), step(2, 101.0, 3.5), step(3, 102.0, 9.9),         # step 3 is abandoned
        {"event": "resume", "step": 2, "world_size": 2, "time": 110.0, "restarts": 1},
        step(3, 111.0, 3.0, restarts=1),
        {"event": "resize", "step": 3, "world_size": 1, "time": 120.0, "restarts": 1},
        step(4, 121.0, 2.5, world=1, restarts=1),
        step(5, 122.0, 2.0, world=1, restarts=1),
        {"event": "preempted", "step": 5, "world_size": 1, "time": 123.0, "restarts": 1},
        {"event": "resume", "step": 5, "world_size": 2, "time": 300.0, "restarts": 1},
        step(6, 301.0, 1.5, restarts=1),
        {"step": 7, "loss": 1.0, "time": "noon"},                              # hand-edited: skipped
        '{"step": 7, "loss": 2.',                                              # cut short by a kill
    ])
    log = load_run(run)
    assert [r["loss"] for r in log.final_history()] == [4.0, 3.5, 3.0, 2.5, 2.0, 1.5]
    assert [(m["label"], m["step"]) for m in log.markers] == [
        ("resume @ step 2", 2), ("restart 1", 2), ("resize @ step 3", 3), ("2 -> 1 workers", 3),
        ("preempted @ step 5", 5), ("resume @ step 5", 5), ("1 -> 2 workers", 5)]
    summary = summarize(log)
    assert summary["world_sizes"] == [1, 2] and summary["restarts"] == 1 and summary["skipped_lines"] == 2
    assert summary["min_loss"] == 1.5 and summary["last_step"] == 6 and summary["final_loss"] == 1.5
    assert summary["median_samples_per_s"] == 200.0  # 5 records on 2 workers, 2 on 1
    assert summary["events"] == {"preempted": 1, "resize": 1, "resume": 2}
    assert summary["wall_s"] == 201.0
    assert summary["breakdown_ms"]["t_compute"] == 6.0
    assert main([str(run)]) == 0
    for name in ("loss_lr.png", "throughput.png", "breakdown.png"):
        width, height = png_size(run / "report" / name)
        assert width >= 600 and height >= 300
    text = (run / "report" / "summary.txt").read_text()
    assert "steps: 6 (6 logged)" in text and "loss: 4.0000 -> 1.5000 (min 1.5000)" in text
    assert "world sizes: 1, 2; restarts: 1" in text and "preempted x1, resize x1, resume x2" in text
    assert "skipped 2 unreadable lines" in text


def test_a_run_without_breakdown_or_events_still_gets_its_plots(tmp_path):
    """A script that logs only step and loss (its own MetricsLogger use, or an older run)."""
    run = tmp_path / "run"
    write_metrics(run, [{"step": n, "loss": 5.0 / n} for n in range(1, 6)])
    assert main([str(run)]) == 0
    written = sorted(p.name for p in (run / "report").iterdir())
    assert written == ["loss_lr.png", "summary.json", "summary.txt"]  # no time, no samples/s: no throughput
    text = (run / "report" / "summary.txt").read_text()
    assert "steps: 5 (5 logged)" in text and "median n/a samples/s" in text and "time per step" not in text


@pytest.mark.parametrize("case, expected", [
    ("missing_dir", "is not a directory; pass the --run-dir"),
    ("a_file_not_a_dir", "is not a directory; pass the --run-dir"),
    ("no_metrics", "metrics.jsonl does not exist; pass the --run-dir of a run that logged"),
    ("empty", "has no step records (0 unreadable lines); log steps"),
    ("only_events", "has no step records (0 unreadable lines); log steps"),
    ("garbage", "has no step records (3 unreadable lines); log steps"),
    ("out_not_writable", "cannot create"),
    ("out_blocked", "cannot write the report: Is a directory"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case, expected):
    run = tmp_path / "run"
    args = [str(run)]
    if case == "a_file_not_a_dir":
        run.write_text("not a run")
    elif case != "missing_dir":
        run.mkdir()
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "keep.txt").write_text("precious")
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    if case == "only_events":
        write_metrics(run, [{"event": "resume", "step": 3, "time": 1.0}])
    if case == "garbage":
        write_metrics(run, ["not json", "[1, 2]", {"step": "3", "loss": 1.0}])
    if case == "out_not_writable":
        write_metrics(run, [step(1, 100.0, 4.0)])
        args += ["--out", str(run / "checkpoints" / "keep.txt" / "report")]  # under a regular file
    if case == "out_blocked":  # the folder exists, but a plot cannot be written where it belongs
        write_metrics(run, [step(1, 100.0, 4.0)])
        (run / "out" / "loss_lr.png").mkdir(parents=True)
        args += ["--out", str(run / "out")]
    before = tree_digest(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "distrib.report", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrib.report: error: ") and expected in lines[0], proc.stderr
    assert proc.stdout == ""
    assert tree_digest(tmp_path) == before


def test_every_evaluation_metric_is_reported_not_only_val_loss(tmp_path):
    """distrib.Run logs evaluate()'s metrics as val_<name>: accuracy is drawn and summarised too."""
    run = tmp_path / "run"
    write_metrics(run, [
        step(1, 100.0, 2.3), step(2, 101.0, 2.0),
        {"event": "eval", "step": 2, "val_loss": 2.1, "val_accuracy": 0.25, "time": 101.5},
        step(3, 102.0, 1.5),
        {"event": "final", "step": 3, "val_loss": 1.7, "val_accuracy": 0.5, "time": 103.0},
    ])
    log = load_run(run)
    from distrib.report import eval_names
    assert eval_names(log.events) == ["val_loss", "val_accuracy"]
    summary = summarize(log)
    assert summary["final_val_loss"] == 1.7 and summary["final_eval"] == {"val_loss": 1.7, "val_accuracy": 0.5}
    assert main([str(run)]) == 0
    assert "last evaluation: val_loss 1.7000, val_accuracy 0.5000" in (run / "report" / "summary.txt").read_text()
    assert png_size(run / "report" / "loss_lr.png")[0] >= 600


def test_a_straggler_event_is_in_the_summary_with_rank_host_phase_and_step(tmp_path):
    """The launcher's straggler notice, as rank 0 writes it into metrics.jsonl (the line is a real
    one from tests/scripts/faults.py --fault slow): the summary names the rank, its host, the slow
    phase and the step it was flagged at; a run without one has no straggler line."""
    run = tmp_path / "run"
    write_metrics(run, [
        step(50, 100.0, 2.0),
        {"event": "straggler", "step": 51, "time": 100.5, "rank": 1, "host": "node2", "phase": "compute",
         "phase_ms": 15.649, "peers_phase_ms": 8.174, "ratio": 1.97, "first_step": 1, "flagged_step": 30},
        step(60, 101.0, 1.5),
    ])
    summary = summarize(load_run(run))
    assert summary["stragglers"] == [{"rank": 1, "host": "node2", "phase": "compute", "step": 30, "ratio": 1.97,
                                      "phase_ms": 15.649, "peers_phase_ms": 8.174}]
    assert main([str(run)]) == 0
    text = (run / "report" / "summary.txt").read_text()
    assert ("straggler: rank 1 on node2 flagged at step 30, slowest phase compute (15.6 ms/step against 8.2 ms on "
            "the others; 1.97x its peers' work per step)") in text.splitlines(), text
    assert json.loads((run / "report" / "summary.json").read_text())["stragglers"][0]["host"] == "node2"

    write_metrics(run, [step(50, 100.0, 2.0), step(60, 101.0, 1.5)])
    healthy = summarize(load_run(run))
    assert healthy["stragglers"] == []
    assert not [line for line in summary_text(healthy).splitlines() if line.startswith("straggler")]
