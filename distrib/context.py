"""``init()``: start the collective engine once and describe this worker's place in the job.

The returned :class:`Context` is frozen and passed explicitly to everything that needs to know
the rank, sizes or device; nothing in distrib keeps a module-level copy of it.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Optional, Sequence

import torch

from distrib import crash_record
from distrib.comm import Comm, DistribSetupError, LocalComm, choose_engine, start

__all__ = ["Context", "DistribSetupError", "init", "select_device", "threads_per_worker", "share_cores",
           "machine_id", "import_horovod"]


@dataclass(frozen=True)
class Context:
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    device: torch.device
    controller: str  # how the workers found each other: Horovod's "mpi"/"gloo", torch's backend
    elastic: bool = False
    # The collectives of this world (distrib.comm): everything that communicates is handed it.
    # A Context built by hand (tests, one process) gets the one-process engine.
    comm: Comm = field(default_factory=LocalComm, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a world of size {self.size}")
        if not 0 <= self.local_rank < self.local_size:
            raise ValueError(f"local rank {self.local_rank} is outside local size {self.local_size}")

    @property
    def is_main(self) -> bool:
        """True on the one rank (0) that prints, logs and writes replicated files."""
        return self.rank == 0

    @property
    def engine(self) -> str:
        """``"horovod"``, ``"torch"`` or ``"local"`` (one process, no engine)."""
        return self.comm.engine

    def reformed(self) -> "Context":
        """This worker's context in the re-formed world (elastic): the same comm object (what
        the wrapped optimizer and the loop hold), its new ranks and sizes, the same device."""
        comm = self.comm
        return dataclasses.replace(self, rank=comm.rank, size=comm.size, local_rank=comm.local_rank,
                                   local_size=comm.local_size, cross_rank=comm.cross_rank,
                                   cross_size=comm.cross_size)


def select_device(local_rank: int, cuda_device_count: int,
                  env: Optional[Mapping[str, str]] = None, local_size: Optional[int] = None) -> torch.device:
    """The device this worker should use: ``cuda:<local_rank>`` on a GPU node, else CPU.

    Pure function (the device count is passed in) so that the GPU logic is tested on CPU
    machines. When a scheduler already restricted each process to one GPU through
    ``CUDA_VISIBLE_DEVICES`` (one id), every worker sees that GPU as ``cuda:0``.
    Raises :class:`DistribSetupError` when the node has more workers than visible GPUs; with
    ``local_size`` (the workers on this node) every rank raises it, not only those left without a GPU.
    """
    env = os.environ if env is None else env
    if cuda_device_count <= 0:
        return torch.device("cpu")
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1 or cuda_device_count == 1:
        return torch.device("cuda", 0)
    workers = max(local_rank + 1, local_size or 0)
    if workers > cuda_device_count:
        who = (f"local rank {local_rank} has no GPU" if local_rank >= cuda_device_count
               else f"{workers} workers on this node, more than its GPUs")
        if visible:
            shown = f"CUDA sees {cuda_device_count} GPUs (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r})"
            fix = " or list one GPU per worker in CUDA_VISIBLE_DEVICES"
        else:
            shown, fix = f"this node shows {cuda_device_count} GPUs", ""
        raise DistribSetupError(
            f"{who}: {shown}; start at most {cuda_device_count} workers per node "
            f"(-H host:{cuda_device_count}, or --ntasks-per-node={cuda_device_count} under Slurm){fix}")
    return torch.device("cuda", local_rank)


SHARE_GPU_ENV = "DISTRIB_SHARE_GPU"  # =1: the user asks for several workers on one GPU


class GpuIdentity(NamedTuple):
    """One worker's GPU as every rank can compare it: the UUID is unique across machines."""
    uuid: str
    name: str    # "NVIDIA H200"
    device: str  # "cuda:0" as this worker numbers it
    host: str


def gpu_identity(device: torch.device) -> Optional[GpuIdentity]:
    """This worker's GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return GpuIdentity(str(props.uuid), props.name, str(device), socket.gethostname())


def gpu_sharing_problem(gpus: Sequence[Optional[GpuIdentity]], *, nccl: bool,
                        env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """One line refusing workers that share a physical GPU, or None. ``gpus[r]`` is rank r's GPU.

    NCCL refuses two ranks on one GPU ("Duplicate GPU detected") at the first collective, far
    from the cause; a node that shows each worker the same single GPU (one GPU and ``-np 2``, or
    ``CUDA_VISIBLE_DEVICES`` set to the same id for every worker) ends there. Without NCCL
    (Horovod built without GPU operations: tensors travel through host memory) sharing works,
    and ``DISTRIB_SHARE_GPU=1`` says the user wants it anyway. Pure: same answer on every rank.
    """
    env = os.environ if env is None else env
    if not nccl or env.get(SHARE_GPU_ENV) == "1":
        return None
    first_user = {}
    for rank, gpu in enumerate(gpus):
        if gpu is None:
            continue
        if gpu.uuid not in first_user:
            first_user[gpu.uuid] = rank
            continue
        sharing = [r for r, g in enumerate(gpus) if g is not None and g.uuid == gpu.uuid]
        gpus_there = len({g.uuid for g in gpus if g is not None and g.host == gpu.host})
        return (f"ranks {', '.join(map(str, sharing))} would share one GPU ({gpu.name} {gpu.uuid}, {gpu.device} "
                f"on {gpu.host}) and NCCL refuses two ranks on one GPU; start one worker per GPU ({gpu.host} "
                f"shows the workers {gpus_there}: -H {gpu.host}:{gpus_there}, or --ntasks-per-node={gpus_there} "
                f"under Slurm), or set {SHARE_GPU_ENV}=1 to share it with a Horovod built without GPU "
                "operations (make setup without HOROVOD_GPU_OPERATIONS)")
    return None


def threads_per_worker(cpu_count: int, local_size: int, env: Optional[Mapping[str, str]] = None) -> int:
    """Intra-op threads for one worker: the node's cores shared among its workers.

    Without this every worker starts one thread per core and N workers fight over the same
    cores. An explicit ``OMP_NUM_THREADS`` wins.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    return max(1, cpu_count // max(1, local_size))


BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def machine_id() -> str:
    """The physical machine (kernel) this process runs on: its boot id. Network namespaces and
    containers of one machine share it, and its cores, though their host names differ (Horovod's
    local size only counts workers under the same host name). The host name without /proc."""
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def share_cores(comm: Comm, *, collective: bool) -> int:
    """Set this worker's torch threads to its share of its machine's cores; return the count.

    The workers of this machine are those with the same :func:`machine_id`, found with an
    allgather when the job spans several host names and ``collective`` is True (then it must be
    called on all ranks); otherwise the engine's local size. Horovod Elastic allows collectives only
    inside its retry loop, so ``init()`` passes ``collective=False`` there and
    :class:`distrib.Run` calls this after each state sync.
    """
    workers = comm.local_size
    if collective and comm.cross_size > 1:
        ids = comm.allgather_object(machine_id(), name="distrib.context.machine_id")
        workers = ids.count(ids[comm.rank])
    threads = threads_per_worker(os.cpu_count() or 1, workers)
    torch.set_num_threads(threads)
    return threads


def import_horovod():
    """``horovod.torch``, or :class:`DistribSetupError` saying how to install it (kept for scripts
    that call Horovod themselves; distrib's own collectives go through ``ctx.comm``)."""
    from distrib.comm.horovod import import_horovod as _import
    return _import()


# Set for a worker started by mpirun (Open MPI), horovodrun --gloo, or Horovod Elastic: they
# give it its rank, and the SLURM_STEP_* variables it inherits describe their helpers, not it.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_RANK", "HOROVOD_GLOO_RENDEZVOUS_ADDR")
# Set by srun's MPI plugins (--mpi=pmix, --mpi=pmi2): how the tasks of a step find each other.
SRUN_MPI_PLUGIN_VARIABLES = ("PMIX_RANK", "PMI_RANK", "PMI_FD")
SRUN_FIX = ("run srun --mpi=pmix (see srun --mpi=list) or start the workers with python -m launch "
            "inside the allocation")


def srun_step_tasks(env: Mapping[str, str]) -> int:
    """How many tasks the ``srun`` step that started this process has; 0 when no srun started it
    as one of its tasks (a batch script, a launcher's worker)."""
    if any(name in env for name in LAUNCHER_VARIABLES) or "SLURM_PROCID" not in env:
        return 0
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    return int(tasks) if tasks.isdigit() else 0


def srun_problem_before_init(env: Mapping[str, str]) -> Optional[str]:
    """A multi-task srun step without an MPI plugin: Open MPI would abort each task with a page of
    text, and a Horovod without MPI would train each task alone. Say it in one line instead."""
    tasks = srun_step_tasks(env)
    if tasks > 1 and not any(name in env for name in SRUN_MPI_PLUGIN_VARIABLES):
        return f"srun started {tasks} tasks without an MPI plugin, so they cannot join each other; {SRUN_FIX}"
    return None


def srun_problem_after_init(env: Mapping[str, str], horovod_size: int) -> Optional[str]:
    """The tasks of the srun step did not form one Horovod world (N trainings of size 1, say,
    all writing to the same run directory). ``env`` is the environment from before ``hvd.init()``."""
    tasks = srun_step_tasks(env)
    if tasks > 1 and tasks != horovod_size:
        return f"srun started {tasks} tasks but Horovod sees a world of {horovod_size}; {SRUN_FIX}"
    return None


def init(seed: Optional[int] = None, engine: Optional[str] = None) -> Context:
    """Start the collective engine (idempotent) and return this worker's :class:`Context`.

    ``engine``: ``"horovod"`` (the default) or ``"torch"`` (``torch.distributed``: Gloo on CPU,
    NCCL on GPU); without it ``DISTRIB_ENGINE`` decides, else torch when the script runs under
    torchrun. Must be called on all processes, before any collective. On GPU nodes it pins
    ``cuda:<local_rank>``; on CPU it sets the number of torch threads so that the workers of
    one node share its cores. ``seed``, when given, seeds python, numpy and torch on each rank
    with its own stream (:func:`rank_seed`): dropout masks and data augmentation differ across
    ranks, as they differ across the samples of one big batch, and every run with the same
    seed and world size draws the same. Rank 0 uses ``seed`` itself, so it builds the model
    the single-process script builds; ``wrap()`` then broadcasts rank 0's parameters.
    """
    engine = choose_engine(engine)
    elastic = os.environ.get("HOROVOD_ELASTIC") == "1"
    if elastic and engine != "horovod":
        raise DistribSetupError("elastic mode runs on Horovod Elastic only; with the torch engine restart "
                                "failed jobs with python -m launch --max-restarts N instead of --elastic")
    env_before_init = dict(os.environ)  # MPI's init adds OMPI_* variables of its own
    if engine == "horovod":
        problem = srun_problem_before_init(env_before_init)
        if problem:
            raise DistribSetupError(problem)
    comm, started = start(engine)
    if started:
        problem = (srun_problem_after_init(env_before_init, comm.size) if engine == "horovod"
                   else None) or torchrun_problem(env_before_init, comm)
        if problem:
            raise DistribSetupError(problem)
        initial_rank = comm.rank

        def current_rank() -> int:  # Horovod Elastic renumbers ranks; a shut-down engine may not answer
            try:
                return comm.rank
            except Exception:  # noqa: BLE001
                return initial_rank
        crash_record.install(current_rank)
    device = select_device(comm.local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                           local_size=comm.local_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Before the first NCCL collective (wrap's broadcast): one allgather of every rank's GPU UUID,
    # only where the engine runs on NCCL (the same answer on every rank, so all of them take part).
    # Horovod Elastic allows no collective outside its retry loop: not checked there.
    if comm.uses_nccl and comm.size > 1 and not elastic:
        gpus = comm.allgather_object(gpu_identity(device), name="distrib.context.gpus")
        problem = gpu_sharing_problem(gpus, nccl=True)
        if problem:
            raise DistribSetupError(problem)
    if device.type != "cuda":
        share_cores(comm, collective=not elastic)
    if seed is not None:
        from distrib.rng import rank_seed, seed_everything
        seed_everything(rank_seed(seed, comm.rank))
    return Context(
        rank=comm.rank, size=comm.size,
        local_rank=comm.local_rank, local_size=comm.local_size,
        cross_rank=comm.cross_rank, cross_size=comm.cross_size,
        device=device, controller=comm.controller, elastic=elastic, comm=comm,
    )


def torchrun_problem(env: Mapping[str, str], comm: Comm) -> Optional[str]:
    """torchrun (or another torch launcher) started WORLD_SIZE workers but the engine sees another
    world: each worker would train alone (Horovod forced under torchrun, say)."""
    raw = env.get("WORLD_SIZE", "")
    if raw.isdigit() and int(raw) > 1 and int(raw) != comm.size and not any(n in env for n in LAUNCHER_VARIABLES):
        return (f"the launcher started {raw} workers (WORLD_SIZE={raw}) but the {comm.engine} engine sees a world "
                f"of {comm.size}; use the torch engine under torchrun (unset DISTRIB_ENGINE or set it to torch)")
    return None
