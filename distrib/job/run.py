"""``distrib.Run``: one object for a long training job, so that the user's loop is only the step.

    run = distrib.Run(ctx, "runs/mnist", model=model, optimizer=optimizer, loader=loader,
                      schedule=schedule, checkpoint_every=100, evaluate=test, eval_every=500)
    for step, (x, y) in run.steps(10_000):         # or run.steps(epochs=10)
        loss = F.nll_loss(model(x), y)
        optimizer.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        run.log(loss=loss)

What it does around each step, on every rank:

* before the first step: restores the newest good checkpoint (``resume="auto"``; ``"none"`` or
  a path), prints nothing itself and logs a ``resume`` event;
* after each step: steps the LR schedule, logs the metrics and the time breakdown
  (``RUN_DIR/metrics.jsonl``, the progress line), evaluates every ``eval_every`` steps with the
  user's ``evaluate(ctx) -> dict``, checkpoints every ``checkpoint_every`` steps;
* on SIGUSR2/SIGTERM (Slurm's warning, ``scancel``): at the next step boundary every rank saves a
  checkpoint, waits for it (``close``), rank 0 requeues the Slurm job, and the process exits 0;
* under Horovod Elastic: commits the state every ``commit_every`` steps, and when a worker dies or
  joins it rolls back to the last commit, re-forms the ring, re-shards the loader, rescales the LR
  schedule, points checkpoints and metrics at the new rank 0 and goes on; the loop never sees it;
* at the end of each epoch (the step that took its last batch): the evaluation when
  ``eval_every="epoch"``, then ``on_epoch_end(run)``, then that step's checkpoint, if any;
* at the end: a last checkpoint, a last evaluation (``run.last_eval``), the breakdown table.

The script's own state goes into every checkpoint and elastic commit with everything else:
``Run(state={"best": inf}, rank_state={"hidden": h0}, reshard={"hidden": distrib.split_concat(1)})``
gives ``run.state`` (the same on every rank: rank 0's is saved) and ``run.rank_state`` (each
rank's own: every rank's is saved); read and write them through these dicts. A resume at the
same world size restores both bit-exact; at another world size, or after an elastic resize (which
rolls them back to the last commit with the model), a ``rank_state`` entry is re-sharded by its
``reshard`` function from every old rank's value, or else reset to the value given to ``Run``.
See :mod:`distrib.job.user_state`.

The final evaluation: after the loop, when ``evaluate`` is given and the model of the last step
was not evaluated yet in this process, Run evaluates it. That includes a process that resumed a
run already finished and trained no step: ``evaluate`` may thus run before any loop body of this
process, so it must not use variables the loop body sets (keep them in ``run.state``).
``on_epoch_end`` and the LR schedulers are never called by such a process.

Elastic mode runs :meth:`Run.steps` inside distrib's recovery loop (:func:`distrib.elastic.recovering`,
Horovod's retry loop). A failure inside the loop body is deferred by the communication layer
(the rest of that step's collectives return at once) and raised at the step boundary, where the
loop rolls back. What Horovod Elastic asks of the code inside that loop therefore applies to the
loop body: no state outside the model, optimizer, loader, schedulers, ``run.state`` and
``run.rank_state`` that must roll back.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import torch

from distrib.checkpoint import CheckpointManager
from distrib.watch.metrics import MetricsLogger, mean_over_ranks, metric_value
from distrib.watch.timing import time_optimizer
from distrib.step.optim import DistributedOptimizer
from distrib.job.preemption import PreemptionHandler
from distrib.job.schedule import check_lr_scheduler, is_plateau
from distrib.job.user_state import GatheredRankStates, RankState, Reshard, UserState

Evaluate = Callable[[Any], Dict[str, float]]


class Run:
    """Checkpoints, resume, preemption, elastic recovery, metrics and evaluation around a loop.

    Build it on every rank after ``distrib.init()``, ``distrib.wrap()`` and the loader, then
    iterate :meth:`steps`. Arguments:

    * ``ctx``: from :func:`distrib.init`; ``run_dir``: where checkpoints and ``metrics.jsonl`` go
      (created; it must be on a file system every rank sees);
    * ``model``, ``optimizer`` (from :func:`distrib.wrap`), ``loader`` (a
      :class:`distrib.ShardedLoader`), ``schedule`` (a :class:`distrib.LRSchedule`, optional;
      Run steps it after every step, do not step it yourself);
    * ``resume``: ``"auto"`` (newest good checkpoint, if any), ``"none"`` (start over), or a
      checkpoint path; ``checkpoint_every`` steps between checkpoints (0: only at the end and on
      preemption), ``keep`` checkpoints kept, ``async_save`` (written in the background);
    * ``evaluate(ctx) -> {"loss": ..., ...}``: called on every rank with the current context,
      must return the same averaged metrics everywhere (:func:`distrib.evaluate` does); it is run
      every ``eval_every`` steps (0: only at the end; ``"epoch"``: at the end of each epoch) and
      logged as ``val_<name>``;
    * ``log_every`` steps per ``metrics.jsonl`` line; ``tensorboard``; ``commit_every`` steps
      between elastic commits (work lost when a worker dies);
    * gradient accumulation is the optimizer's: with ``wrap(..., accumulate=k)``, k > 1, each
      step yields a list of ``k`` batches (one per backward);
    * ``model_config``: saved with each checkpoint and checked on resume; ``seed``: derives the
      RNG state of ranks a resumed checkpoint did not have;
    * ``preemption``: handle SIGUSR2/SIGTERM (default True);
    * ``state``, ``rank_state``, ``reshard``: the script's own state (module docstring);
    * ``lr_scheduler``: any torch LR scheduler on the optimizer (instead of ``schedule``),
      checkpointed; Run steps it after every optimizer step (``lr_scheduler_every="step"``) or at
      the end of every epoch (``"epoch"``); a ``ReduceLROnPlateau`` is stepped after each
      evaluation during training with the evaluation's ``monitor`` metric (default ``"loss"``);
    * ``on_epoch_end(run)``: called on every rank after the last step of each epoch (after that
      epoch's evaluation with ``eval_every="epoch"``, before that step's checkpoint, inside the
      elastic retry loop, so collectives are allowed); ``run.epoch`` is the epoch that ended;
    * ``average_logged``: the ``run.log`` values in metrics.jsonl are the mean over the workers
      (gathered once per logged window) instead of rank 0's; ``tokens_per_sample``: adds
      ``tokens_per_s`` (``samples_per_s`` counts dataset items).

    The lower-level pieces stay reachable: ``run.checkpoints`` (:class:`distrib.CheckpointManager`),
    ``run.metrics`` (:class:`distrib.MetricsLogger`), ``run.preemption``
    (:class:`distrib.PreemptionHandler` or None). Raises ``ValueError`` for bad settings and
    :class:`distrib.CheckpointError` when the checkpoint to resume does not fit, on every rank.
    """

    def __init__(self, ctx, run_dir: Union[str, Path], *, model: torch.nn.Module, optimizer, loader,
                 schedule=None, resume: Union[str, Path] = "auto", checkpoint_every: int = 0, keep: int = 3,
                 async_save: bool = True, evaluate: Optional[Evaluate] = None, eval_every: Union[int, str] = 0,
                 log_every: int = 10, tensorboard: bool = False, commit_every: int = 10,
                 model_config: Optional[Dict] = None, seed: int = 0,
                 preemption: bool = True, stream=sys.stderr, state: Optional[Dict[str, Any]] = None,
                 rank_state: Optional[Dict[str, Any]] = None, reshard: Optional[Dict[str, Reshard]] = None,
                 lr_scheduler=None, lr_scheduler_every: str = "step", monitor: str = "loss",
                 on_epoch_end: Optional[Callable[["Run"], None]] = None, average_logged: bool = False,
                 tokens_per_sample: Optional[int] = None):
        _check_interval("checkpoint_every", checkpoint_every, "only at the end")
        if eval_every != "epoch":
            _check_interval("eval_every", eval_every, "only at the end")
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1 step, got {commit_every}")
        check_lr_scheduler(lr_scheduler, lr_scheduler_every, schedule)
        self.run_dir = prepare_run_dir(run_dir)
        self.model, self.optimizer, self.loader, self.schedule = model, optimizer, loader, schedule
        self.checkpoint_every, self.eval_every, self.commit_every = checkpoint_every, eval_every, commit_every
        self.model_config = model_config
        self._evaluate_fn = evaluate
        self.last_eval: Dict[str, float] = {}  # the last evaluation's metrics, on every rank
        self._last_eval_step: Optional[int] = None
        self._logged: Dict[str, Union[float, torch.Tensor]] = {}
        self._total: Optional[int] = None
        self._epochs: Optional[int] = None
        self._trained = False
        self._started = False
        # The script's own state (distrib/job/user_state.py): in every checkpoint and elastic commit.
        self.state, self.rank_state = UserState(state), RankState(rank_state, reshard)
        self._has_state, self._has_rank_state = state is not None, rank_state is not None
        self.lr_scheduler, self.lr_scheduler_every, self.monitor = lr_scheduler, lr_scheduler_every, monitor
        self._on_epoch_end = on_epoch_end
        self._rank_states = GatheredRankStates()  # elastic: every rank's rank_state at the last commit
        self._world_changes = 0  # elastic re-formations seen by this process

        # Under Horovod Elastic no collective may run outside the retry loop (in steps()):
        # every rank restores on its own; the first sync then hands rank 0's state to everyone.
        self.checkpoints = CheckpointManager(self.run_dir, ctx, keep=keep, async_save=async_save, seed=seed)
        start = self.checkpoints.restore(self._saved(), resume=resume, model_config=model_config,
                                         collective=not ctx.elastic, rank_state=self._rank_state_arg()) or 0
        self.metrics = MetricsLogger(self.run_dir, ctx, total_steps=max(start, 1), start_step=start,
                                     log_every=log_every, tensorboard=tensorboard,
                                     global_batch=self._global_batch(), stream=stream,
                                     average=self._average_over_ranks if average_logged else None,
                                     tokens_per_sample=tokens_per_sample)
        self.preemption = PreemptionHandler() if preemption else None
        self._state = _elastic_state(self, ctx, start) if ctx.elastic else _LocalState(ctx, start)
        self._untime_optimizer = time_optimizer(optimizer, self.metrics.phase)  # its wait and step in the breakdown

    # -- what the loop reads ----------------------------------------------------------------
    @property
    def ctx(self):
        """The current :class:`distrib.Context` (a new one after an elastic re-formation)."""
        return self._state.ctx

    @property
    def step(self) -> int:
        """Optimizer steps done (restored from the checkpoint on resume)."""
        return self._state.step

    @property
    def epoch(self) -> int:
        """The loader's epoch (0-based). After the last batch of an epoch it moves on only when
        the next batch is taken, so a run of ``epochs=2`` ends in epoch 1 with no batch left."""
        return self.loader.epoch

    # -- the loop ---------------------------------------------------------------------------
    def steps(self, total: Optional[int] = None, *, epochs: Optional[int] = None) -> Iterator[Tuple[int, Any]]:
        """Yield ``(step, batch)`` until ``total`` optimizer steps (or ``epochs`` epochs) are done.

        ``step`` counts the steps done before this one (0 on a fresh start, the checkpoint's step
        on resume); ``batch`` is this rank's part of the next global batch (a list of
        ``accumulate`` of them when the optimizer accumulates), not yet moved to the device. Everything else
        happens between two items (see the module docstring). Must be iterated on all ranks.
        After a preemption the process exits with code 0 from inside this iterator, so code
        after the loop runs only once training is finished.
        """
        if (total is None) == (epochs is None):
            raise ValueError("give run.steps() either total (optimizer steps) or epochs=, not both and not neither")
        if (total if total is not None else epochs) < 0:
            raise ValueError(f"run.steps() needs a count >= 0, got {total if total is not None else epochs}")
        self._total, self._epochs = total, epochs
        self._update_total()
        if self.ctx.elastic:
            from distrib.elastic import recovering
            yield from recovering(self._state, self._elastic_attempt)
        else:
            self._announce()
            yield from self._train()
        self._close()

    def log(self, **metrics) -> None:
        """Metrics of this step (``loss=loss``: numbers or one-element tensors); averaged over
        the ``log_every`` window in ``metrics.jsonl``. Local: no collective, and no wait for a
        GPU: a tensor is copied and summed on its device, and the window's sums are read once,
        when its line is written. The file holds rank 0's values, or with
        ``Run(average_logged=True)`` the mean over the workers (Run gathers them once per logged
        window, at the step boundary; a name only some ranks log is averaged over those)."""
        for name, value in metrics.items():
            self._logged[name] = metric_value(name, value, copy=True)

    def phase(self, name: str):
        """``with run.phase("data"): ...``: charge part of the step to a phase of the breakdown
        (the rest of the loop body counts as ``compute``; the optimizer's step as ``optimizer``
        and its gradient wait as ``allreduce``)."""
        return self.metrics.phase(name)

    def event(self, name: str, **info) -> None:
        """A line ``{"event": name, "step": run.step, ...}`` in metrics.jsonl (rank 0)."""
        self.metrics.event(name, step=self.step, **info)

    # -- internals --------------------------------------------------------------------------
    def _announce(self) -> None:
        """The first lines of this run in metrics.jsonl, once the world is settled (under Horovod
        Elastic: after the first sync, which also shared the machine's cores among its workers)."""
        if not self._started:
            self._started = True
            self.metrics.event("start", threads=torch.get_num_threads(), step=self.step)
            if self.step:
                self.metrics.event("resume", step=self.step)

    def _train(self) -> Iterator[Tuple[int, Any]]:
        """The steps from the current position to the end, and the last collectives."""
        batches = self._batches()
        while not self._done():
            with self.metrics.phase("data"):
                batch = self._next(batches)
            comm = self.ctx.comm
            deferred = comm.failures_deferred() if self.ctx.elastic else contextlib.nullcontext()
            with self.metrics.phase("compute"), deferred:
                yield self.step, batch
            if comm.broken is not None:
                raise comm.broken  # elastic: the world broke inside the loop body; the recovery loop rolls back
            self._end_step()
        self._finish()

    def _elastic_attempt(self) -> Iterator[Tuple[int, Any]]:
        """One attempt of the recovery loop: from the state it synced (or rolled back) to the end."""
        self._announce()
        self._adopt_rank_states()
        yield from self._train()

    def _batches(self) -> Iterator[Any]:
        # A new iterator after every restore or resize: it starts at the loader's position and
        # takes this rank's share at the current world size.
        return self.loader.forever()

    def _next(self, batches: Iterator[Any]) -> Any:
        accumulate = accumulation(self.optimizer)
        if accumulate == 1:
            return next(batches)
        return [next(batches) for _ in range(accumulate)]

    def _done(self) -> bool:
        if self._epochs is None:
            return self.step >= self._total
        epoch = self.loader.epoch
        return epoch >= self._epochs or (epoch == self._epochs - 1 and self.loader.batches_left == 0)

    def _update_total(self) -> None:
        """The run's length in steps, for the progress display: with ``epochs`` it depends on the
        world size (the global batch), so it is recomputed after every resize."""
        if self._epochs is None:
            total = self._total
        else:
            loader = self.loader
            whole = max(0, self._epochs - loader.epoch - 1) * len(loader)
            total = self.step + (loader.batches_left if loader.epoch < self._epochs else 0) + whole
        self.metrics.set_total(max(total, self.step))

    def _end_step(self) -> None:
        lr = self.schedule.lr if self.schedule is not None else self.optimizer.param_groups[0]["lr"]
        if self.schedule is not None:
            self.schedule.step()
        if self.lr_scheduler_every == "step" and self._steps_lr_scheduler():
            self.lr_scheduler.step()
        self._state.step += 1
        self._trained = True
        step = self.step
        # The ranks' agreement on a signal waits for the slowest rank, as the gradient wait does.
        with self.metrics.phase("allreduce"):
            stopping = self.preemption is not None and self.preemption.should_stop(self.ctx)
        logged, self._logged = self._logged, {}
        self.metrics.step(step, lr=lr, **logged)
        end_of_epoch = self.loader.batches_left == 0
        if self._evaluate_fn is not None and (
                (self.eval_every == "epoch" and end_of_epoch)
                or (self.eval_every not in (0, "epoch") and step % self.eval_every == 0)):
            self._evaluate("eval")
            self._plateau_step()
        if end_of_epoch:
            self._epoch_ended()
        if stopping or (self.checkpoint_every and step % self.checkpoint_every == 0):
            self._save()
        if stopping:
            self._preempted()
        if self.ctx.elastic and step % self.commit_every == 0:
            self._gather_rank_states()
            self._state.commit()  # in-memory snapshot; where workers that came back join

    def _evaluate(self, event: Optional[str]) -> None:
        metrics = self._evaluate_fn(self.ctx)
        self.last_eval = {name: float(value) for name, value in metrics.items()}
        self._last_eval_step = self.step
        if event:
            self.metrics.event(event, step=self.step, **{f"val_{k}": v for k, v in self.last_eval.items()})

    def _save(self) -> None:
        with self.metrics.phase("checkpoint"):
            self.checkpoints.save(self.step, self._saved(), model_config=self.model_config,
                                  rank_state=self._rank_state_arg())

    def _saved(self) -> Dict[str, Any]:
        saved = {"model": self.model, "optimizer": self.optimizer, "loader": self.loader}
        if self.schedule is not None:
            saved["scheduler"] = self.schedule
        saved.update(self._extra_state())
        return saved

    def _extra_state(self) -> Dict[str, Any]:
        """What Run adds to the checkpoint (and to the elastic state) beyond the pieces above;
        only what was given, so that the checkpoints of runs without them keep their layout."""
        extra: Dict[str, Any] = {}
        if self.lr_scheduler is not None:
            extra["lr_scheduler"] = self.lr_scheduler
        if self._has_state:
            extra["user"] = self.state
        return extra

    def _rank_state_arg(self) -> Optional[RankState]:
        return self.rank_state if self._has_rank_state else None

    def _preempted(self) -> None:
        """Checkpoint saved: wait for it, requeue (rank 0, Slurm, after SIGUSR2), exit 0."""
        self.checkpoints.close()  # an asynchronous write must be on disk before Slurm kills the job
        self.metrics.event("preempted", step=self.step, decision=self.preemption.decision)
        self.metrics.close()
        self._untime_optimizer()
        self.preemption.requeue(self.ctx)
        sys.exit(0)

    def _finish(self) -> None:
        """The last collectives: a failure here (elastic) rolls back and trains the rest again."""
        with self.metrics.phase("checkpoint"):
            if self._trained and self.checkpoints.last_step != self.step:
                self.checkpoints.save(self.step, self._saved(), model_config=self.model_config,
                                      rank_state=self._rank_state_arg())
            self.checkpoints.wait()
        if self._evaluate_fn is not None and self._last_eval_step != self.step:
            self._evaluate(None)

    def _close(self) -> None:
        self.checkpoints.close()  # its write is already on disk (wait above): no new save may follow
        self.metrics.event("final", step=self.step, **{f"val_{k}": v for k, v in self.last_eval.items()})
        self.metrics.close()
        if self.preemption is not None:
            self.preemption.close()
        self._untime_optimizer()

    def _adopt_world(self, state) -> None:
        """After an elastic re-formation (on every worker): rank 0 may be another process now."""
        self._world_changes += 1
        self.checkpoints.adopt_world(state.ctx)
        self.metrics.adopt_world(state.ctx, step=state.step, global_batch=self._global_batch())
        self.metrics.event("resize", step=state.step, threads=torch.get_num_threads())
        if self._total is not None or self._epochs is not None:
            self._update_total()

    def _global_batch(self) -> int:
        return self.loader.global_batch * accumulation(self.optimizer)

    # -- the script's own state, schedulers, epochs, averaged logs (Run(state=..., ...)) ------
    def _plateau_step(self) -> None:
        """A ``ReduceLROnPlateau`` is stepped after each evaluation during training, with the
        evaluation's ``monitor`` metric (not after the final one: no step follows it)."""
        if is_plateau(self.lr_scheduler):
            if self.monitor not in self.last_eval:
                raise ValueError(f"ReduceLROnPlateau monitors {self.monitor!r}, but evaluate() returned "
                                 f"{sorted(self.last_eval)}; pass Run(monitor=<one of them>)")
            self.lr_scheduler.step(self.last_eval[self.monitor])

    def _steps_lr_scheduler(self) -> bool:
        return self.lr_scheduler is not None and not is_plateau(self.lr_scheduler)  # that one: after evaluations

    def _epoch_ended(self) -> None:
        if self.lr_scheduler_every == "epoch" and self._steps_lr_scheduler():
            self.lr_scheduler.step()
        if self._on_epoch_end is not None:
            self._on_epoch_end(self)

    def _average_over_ranks(self, means: Dict[str, float]) -> Dict[str, float]:
        if self.ctx.size == 1:
            return means
        return mean_over_ranks(self.ctx.comm.allgather_object(means, name="distrib.job.run.logged_metrics"))

    def _gather_rank_states(self) -> None:
        """Elastic, before each commit: every rank's rank_state to every rank (a collective
        between two steps), committed with the rest, so that after a resize the survivors can
        re-shard the state of the workers that died."""
        if self._has_rank_state:
            mine = self.rank_state.state_dict()
            self._rank_states.states = self.ctx.comm.allgather_object(mine, name="distrib.job.run.rank_state")
            self._rank_states.size = self.ctx.size

    def _adopt_rank_states(self) -> None:
        """Elastic, after a re-formation and its sync: this rank's part of the last commit's
        rank states (its own at the same world size, re-sharded or reset at another)."""
        if not self._has_rank_state:
            return
        if self._world_changes != self._rank_states.adopted_after:
            self._rank_states.adopted_after = self._world_changes
            self.rank_state.load_all(self._rank_states.states, self.ctx.rank, self.ctx.size)
        if self._rank_states.states is None:
            # The start (or a restart before the first commit): every rank's state as the first
            # commit's, so that a resize before the first commit re-shards it too.
            self._gather_rank_states()
            self._state.save()


def prepare_run_dir(run_dir: Union[str, Path]) -> Path:
    """Create ``run_dir`` now, so that a path that cannot be written fails in one clear line
    before any training (every rank checks: it must be on a file system all ranks see)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--run-dir {run_dir} is not a writable directory ({exc.strerror or exc}); "
                         "choose another --run-dir") from None
    return run_dir


def accumulation(optimizer) -> int:
    """Micro-batches per step: the wrapped optimizer's ``accumulate`` (1 for a plain torch one)."""
    return optimizer.accumulate if isinstance(optimizer, DistributedOptimizer) else 1


def _check_interval(name: str, value, zero: str) -> None:
    # A negative interval would silently mean "every step" (step % -1 == 0).
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (0: {zero}), got {value!r}")


class _LocalState:
    """What the loop needs of :class:`distrib.ElasticState` when not elastic."""

    def __init__(self, ctx, step: int):
        self.ctx, self.step = ctx, step


def _elastic_state(run: Run, ctx, step: int):
    from distrib.elastic import ElasticState  # imports Horovod's elastic module: only in elastic mode
    extra = run._extra_state()
    if run._has_rank_state:
        extra["rank_states"] = run._rank_states
    state = ElasticState(ctx, model=run.model, optimizer=run.optimizer, loader=run.loader,
                         schedule=run.schedule, step=step, extra=extra)
    state.on_world_change(run._adopt_world)
    return state

