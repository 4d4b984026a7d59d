"""benchmarks/soak/accounting.py: which step records the final state kept, from step logs written
the way benchmarks/soak/worker.py writes them (a world that rolls back, one rank killed mid-step)."""
from distrib.data import epoch_order

from benchmarks.soak import accounting

N, SEED = 24, 3  # a data set of 24 samples, 2 ranks x 2 samples a step: 6 steps an epoch


def write_log(folder, host_pid, lines):
    (folder / f"steps.{host_pid}.log").write_text("".join(line + "\n" for line in lines))


def step_lines(step, rank, size, t, samples, ended=True):
    lines = [f"B {t:.6f} {step} 0 {rank} {size} {','.join(map(str, samples))}"]
    return lines + ([f"E {t + 0.05:.6f} {step} {rank} {size}"] if ended else [])


def test_a_rollback_undoes_the_steps_after_the_commit_and_keeps_the_rest(tmp_path):
    """Ranks 0 and 1 train steps 0-3 (their B lines a few ms apart, as real ones are); rank 1 is
    killed inside step 3; rank 0 rolls back to the commit at step 2 and trains steps 2-5 alone.
    Kept: steps 0-1 of both ranks and rank 0's redo; every sample once, the epoch a prefix."""
    order = epoch_order(N, SEED, 0)
    chunk = lambda step, rank, size: order[step * 2 * size + rank * 2: step * 2 * size + rank * 2 + 2]  # noqa: E731
    survivor, victim = [], []
    for s in range(4):
        survivor += step_lines(s, 0, 2, 10.0 + s, chunk(s, 0, 2))
        victim += step_lines(s, 1, 2, 10.003 + s, chunk(s, 1, 2), ended=s < 3)
    consumed = 2 * 2 * 2  # the commit at step 2: four samples a step so far
    for s in range(2, 6):
        at = consumed + (s - 2) * 2
        survivor += [f"B {20.0 + s:.6f} {s} 0 0 1 {','.join(map(str, order[at:at + 2]))}",
                     f"E {20.05 + s:.6f} {s} 0 1"]
    write_log(tmp_path, "node1.100", survivor)
    write_log(tmp_path, "node2.200", victim)
    history = accounting.kept(accounting.read_records(tmp_path))
    assert [(r.step, r.rank, r.size) for r in history] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2),
                                                           (2, 0, 1), (3, 0, 1), (4, 0, 1), (5, 0, 1)]
    assert accounting.steps_done_by(history, float("inf")) == 6
    assert accounting.kill_to_next_step(history, 13.01) == (22.05 - 13.01)  # the redo of step 2, not step 3
    samples = accounting.sample_accounting(history, N, SEED)
    assert samples["ok"] and samples["twice"] == 0 and samples["samples"] == 16
    assert samples["epochs"][0]["missing"] == 0 and samples["epochs"][0]["out_of_order"] == 0


def test_a_sample_trained_twice_and_a_gap_are_reported(tmp_path):
    """A history that trains step 1's samples again at step 2, and skips what step 2 should have
    trained: the accounting is not ok, with both counted."""
    order = epoch_order(N, SEED, 0)
    lines = []
    for s, at in ((0, 0), (1, 2), (2, 2), (3, 6)):
        lines += step_lines(s, 0, 1, 10.0 + s, order[at:at + 2])
    write_log(tmp_path, "node1.100", lines)
    samples = accounting.sample_accounting(accounting.kept(accounting.read_records(tmp_path)), N, SEED)
    assert not samples["ok"] and samples["twice"] == 2
    assert samples["epochs"][0]["out_of_order"] == 2 and samples["epochs"][0]["missing"] == 2


def test_a_rejoin_stall_is_split_by_the_joining_workers_start_up_times(tmp_path):
    """Two ranks train until 10.0, a third process starts at 11.0 (its P lines), the world of 3
    ends its first step at 19.0: the stall 10.0 -> 19.0 is spawn, imports, join, setup, first
    step, in that order and summing to it; the step logs' P lines change no step record."""
    from benchmarks.soak import report
    old = step_lines(0, 0, 2, 9.0, [0, 1]) + step_lines(1, 0, 2, 9.95, [4, 5])
    write_log(tmp_path, "node1.100", old)
    write_log(tmp_path, "node3.300", ["P 11.000000 started", "P 13.000000 imported", "P 13.500000 joined",
                                      "P 16.000000 ready"] + step_lines(2, 2, 3, 18.95, [8, 9]))
    write_log(tmp_path, "node2.200", ["P 1.000000 started", "P 2.000000 imported", "P 2.500000 joined",
                                      "P 3.000000 ready"])  # an earlier start: not this rejoin's
    phases = accounting.read_phases(tmp_path)
    assert phases["node3.300"] == {"started": 11.0, "imported": 13.0, "joined": 13.5, "ready": 16.0}
    assert [(r.proc, r.step) for r in accounting.read_records(tmp_path)] == [
        ("node1.100", 0), ("node1.100", 1), ("node3.300", 2)]
    parts = report.rejoin_parts(phases, 10.0, 19.0)
    assert parts == {"spawn": 1.0, "imports": 2.0, "join": 0.5, "setup": 2.5, "first_step": 3.0}
    assert report.rejoin_parts(phases, 20.0, 25.0) == {}  # nobody started inside that pause


def test_a_soak_that_measures_one_row_keeps_the_others_with_their_dates(tmp_path):
    """The elastic 60 s row measured again replaces its old self in place; the rows it did not
    measure stay, each with the date of the run that measured it (an old file's meta date)."""
    import json
    from benchmarks.soak.__main__ import merged, previous_rows

    def row(mode, every, minutes, steps, **kw):
        return dict(mode=mode, kill_every_s=every, seconds=60 * minutes, steps=steps, **kw)

    out = tmp_path / "results-soak.json"
    out.write_text(json.dumps({"meta": {"date": "2026-12-04T10:00:00+00:00"},
                               "rows": [row("elastic", 60.0, 10, 1), row("elastic", 15.0, 2, 2),
                                        row("restart", 60.0, 10, 3)]}))
    rows = merged(previous_rows(out), [row("elastic", 60.0, 10, 9, date="2026-12-05"),
                                       row("restart", 15.0, 2, 4, date="2026-12-05")])
    assert [(r["mode"], r["kill_every_s"], r["steps"], r["date"][:10]) for r in rows] == [
        ("elastic", 60.0, 9, "2026-12-05"), ("elastic", 15.0, 2, "2026-12-04"), ("restart", 60.0, 3, "2026-12-04"),
        ("restart", 15.0, 4, "2026-12-05")]
    assert previous_rows(tmp_path / "none.json") == []
