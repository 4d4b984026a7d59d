"""distrib's communication layer (distrib/comm/): the only code that talks to an engine.

In one process: the rules every engine inherits (a heartbeat before each collective, the
broken-world latch, the engine choice, Adasum only on Horovod), and that no other module of
the library imports Horovod or torch.distributed. With 2 real workers on each engine (Horovod
through our launcher, torch.distributed under torchrun): every collective against the numbers
computed by hand (tests/scripts/comm_check.py).
"""
import json
import re
from pathlib import Path

import pytest
import torch

import distrib
from distrib.comm import LocalComm, choose_engine
from distrib.comm import base as comm_base
from distrib.comm import priority
from tests.helpers import REPO, SCRIPTS, run_launch, run_torchrun

COLLECTIVES = {
    "allreduce": lambda c: c.allreduce(torch.ones(2), name="t.a"),
    "allreduce_async_": lambda c: c.allreduce_async_(torch.ones(2), name="t.b").wait(),
    "reducescatter_into_async": lambda c: c.reducescatter_into_async(torch.ones(2), torch.empty(2), name="t.c").wait(),
    "allgather_into_async": lambda c: c.allgather_into_async(torch.ones(2), torch.empty(2), name="t.d").wait(),
    "broadcast_async_": lambda c: c.broadcast_async_(torch.ones(2), name="t.e").wait(),
    "broadcast_object": lambda c: c.broadcast_object(1, name="t.f"),
    "allgather_object": lambda c: c.allgather_object(1, name="t.g"),
    "barrier": lambda c: c.barrier(name="t.h"),
}


@pytest.mark.parametrize("collective", list(COLLECTIVES))
def test_every_collective_beats_the_heartbeat_first(monkeypatch, collective):
    beats = []
    monkeypatch.setattr(comm_base, "beat", lambda *call: beats.append(call))
    COLLECTIVES[collective](LocalComm())
    assert len(beats) == 1 and beats[0][0].endswith(":t." + "abcdefgh"[list(COLLECTIVES).index(collective)])
    tensor_call = collective not in ("broadcast_object", "allgather_object", "barrier")
    assert beats[0][1:] == (([2], "float32") if tensor_call else ())  # the shape and dtype the launcher compares


class PeerGone(Exception):
    pass


class FlakyComm(LocalComm):
    """The one-process engine whose next allreduce fails as a dead peer would."""
    failures = (PeerGone,)

    def __init__(self):
        super().__init__()
        self.engine_calls = 0

    def _allreduce(self, tensor, name, op):
        self.engine_calls += 1
        if self.engine_calls == 1:
            raise PeerGone("connection closed by peer")
        return tensor.clone()


def test_after_a_peer_failure_every_collective_raises_it_without_touching_the_engine():
    comm = FlakyComm()
    with pytest.raises(PeerGone):
        comm.allreduce(torch.ones(1), name="first")
    for collective in COLLECTIVES.values():
        with pytest.raises(PeerGone, match="connection closed"):
            collective(comm)
    assert comm.engine_calls == 1 and isinstance(comm.broken, PeerGone)
    comm.clear_broken()  # the world re-formed (elastic)
    assert torch.equal(comm.allreduce(torch.ones(1), name="again"), torch.ones(1))


def test_inside_failures_deferred_a_peer_failure_closes_the_latch_and_collectives_return_their_input():
    """What lets distrib.Run finish a broken step's loop body (elastic) without wrapping the
    user's objects: nothing raises inside the block, the latch holds the error for the boundary."""
    comm = FlakyComm()
    sent = torch.ones(2)
    with comm.failures_deferred():
        assert comm.allreduce(sent, name="first") is sent  # the engine failed: the input comes back
        assert comm.allreduce_async_(sent, name="later").wait() is sent
        out = torch.empty(1)
        assert comm.allgather_into_async(torch.ones(1), out, name="g").wait() is out
        assert comm.broadcast_object({"a": 1}, name="o") == {"a": 1}
        for collective in COLLECTIVES.values():
            collective(comm)  # none raises, none reaches the engine
    assert comm.engine_calls == 1 and isinstance(comm.broken, PeerGone)
    with pytest.raises(PeerGone, match="connection closed"):  # after the block: raised again
        comm.barrier(name="at the boundary")


def test_other_errors_leave_the_world_usable():
    class Buggy(LocalComm):
        failures = (PeerGone,)

        def _allgather_object(self, obj, name):
            raise TypeError("cannot pickle")
    comm = Buggy()
    with pytest.raises(TypeError):
        comm.allgather_object(object(), name="x")
    assert comm.broken is None and comm.broadcast_object(3, name="y") == 3


TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("engine, env, chosen", [
    (None, {}, "horovod"),                                  # the default, as before
    (None, TORCHRUN, "torch"),                              # a script started by torchrun
    (None, {**TORCHRUN, "DISTRIB_ENGINE": "horovod"}, "horovod"),
    (None, {"DISTRIB_ENGINE": "torch"}, "torch"),           # python -m launch --engine torch
    ("horovod", {"DISTRIB_ENGINE": "torch", **TORCHRUN}, "horovod"),  # init(engine=...) wins
    ("torch", {}, "torch"),
])
def test_engine_choice(engine, env, chosen):
    assert choose_engine(engine, env) == chosen


@pytest.mark.parametrize("engine, env, words", [
    ("mpi", {}, "engine='mpi' is not one of horovod, torch"),
    (None, {"DISTRIB_ENGINE": "nccl"}, "DISTRIB_ENGINE='nccl' is not one of horovod, torch"),
])
def test_unknown_engine_is_one_clear_line(engine, env, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        choose_engine(engine, env)


def test_adasum_needs_horovod():
    class NoAdasum(LocalComm):
        engine, supports_adasum = "torch", False
    ctx = distrib.Context(0, 1, 0, 1, 0, 1, torch.device("cpu"), "gloo", comm=NoAdasum())
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="op='adasum' needs the Horovod engine .*use op='average'"):
        distrib.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx, op="adasum")


ENGINE_IMPORT = re.compile(r"^\s*(import horovod|from horovod|import torch\.distributed|from torch\.distributed|"
                           r"from torch import distributed)", re.M)


def test_only_the_communication_layer_imports_an_engine():
    offenders = [str(path.relative_to(REPO)) for path in sorted((REPO / "distrib").rglob("*.py"))
                 if "comm" not in path.relative_to(REPO / "distrib").parts
                 and ENGINE_IMPORT.search(path.read_text())]
    assert offenders == []


@pytest.mark.parametrize("env, cuda, nice", [({}, False, 19), ({}, True, 0), ({"DISTRIB_COMM_NICE": "0"}, False, 0),
                                             ({"DISTRIB_COMM_NICE": " 7 "}, True, 7)])
def test_engine_threads_nice_value(env, cuda, nice):
    assert priority.engine_nice(env, cuda=cuda) == nice


@pytest.mark.parametrize("raw", ["-1", "20", "low"])
def test_engine_threads_nice_value_out_of_range_is_one_clear_line(raw):
    with pytest.raises(ValueError, match=r"DISTRIB_COMM_NICE=.* is not a nice value from 0 to 19; set e\.g\."):
        priority.engine_nice({"DISTRIB_COMM_NICE": raw}, cuda=False)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_every_collective_on_two_workers_gives_the_numbers_computed_by_hand(engine, tmp_path):
    out = tmp_path / "comm.json"
    if engine == "torch":
        run_torchrun(2, SCRIPTS / "comm_check.py", ["--out", out])
    else:
        run_launch(["-np", "2", "--controller", "gloo"], SCRIPTS / "comm_check.py", ["--out", out])
    results = json.loads(Path(out).read_text())
    assert results["engine"] == engine and results["size"] == 2
    if engine == "horovod":  # rank 1 marked the world broken: rank 0's collective failed instead of waiting
        assert results["peer_failure"].startswith("HorovodInternalError"), results["peer_failure"]
    for rank, checks in enumerate(results["ranks"]):
        assert checks.pop("adasum") is (engine == "horovod")
        assert [name for name, ok in checks.items() if not ok] == [], f"rank {rank}"
