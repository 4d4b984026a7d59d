"""Read a SLURM job's environment: pure parsers and one table of variable names.

Everything here is a pure function of strings or of an environment mapping, so it is tested
with tables of cases. Malformed values raise ``ValueError`` with a one-line message naming the
variable, the value and what was expected.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import List, Mapping, Optional, Tuple

# Field of SlurmJobEnvironment -> the SLURM variable it comes from (submitit's table style).
_ENV = {
    "job_id": "SLURM_JOB_ID",
    "job_name": "SLURM_JOB_NAME",
    "global_rank": "SLURM_PROCID",
    "local_rank": "SLURM_LOCALID",
    "num_tasks": "SLURM_NTASKS",
    "node_rank": "SLURM_NODEID",
    "num_nodes": "SLURM_JOB_NUM_NODES",
    "nodelist": "SLURM_JOB_NODELIST",
    "tasks_per_node": "SLURM_TASKS_PER_NODE",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT",
}
_INT_FIELDS = {"global_rank", "local_rank", "num_tasks", "node_rank", "num_nodes", "restart_count"}
_BRACKET_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")
_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def in_slurm_job(env: Optional[Mapping[str, str]] = None) -> bool:
    """True inside a SLURM allocation (batch script, salloc shell or job step)."""
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID"))


def _split_top_level(text: str, what: str) -> List[str]:
    """Split on commas outside brackets; reject unbalanced or nested brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{what} {text!r}: nested '[' at position {i}; brackets hold ranges like node[01-04,07]")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{what} {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"{what} {text!r}: '[' is never closed")
    parts.append(text[start:])
    return parts


def _expand_bracket(body: str, text: str) -> List[str]:
    out: List[str] = []
    for item in body.split(","):
        m = _BRACKET_ITEM.match(item.strip())
        if not m:
            raise ValueError(f"nodelist {text!r}: bad range {item!r} in [{body}]; expected N or N-M, e.g. [01-04,07]")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"nodelist {text!r}: range {item!r} runs backwards; write it as {hi}-{lo}")
        width = len(lo)  # SLURM pads to the width of the lower bound: [08-10] -> 08 09 10
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(text: str) -> List[str]:
    """``gpu[01-02,07],cpu-2`` -> ``['gpu01', 'gpu02', 'gpu07', 'cpu-2']`` (order kept).

    Handles zero padding, suffixes (``node[1-3]-ib``), several bracket groups in one name
    (``r[1-2]n[1-2]``, expanded like SLURM: first group outermost) and duplicates are kept out.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"nodelist {text!r} is empty; expected host names like node[01-04,07]")
    hosts: List[str] = []
    for part in _split_top_level(text.strip(), "nodelist"):
        part = part.strip()
        if not part:
            raise ValueError(f"nodelist {text!r} has an empty entry (two commas in a row or a trailing comma)")
        pieces = re.split(r"(\[[^\]]*\])", part)
        names = [""]
        for piece in pieces:
            if piece.startswith("["):
                choices = _expand_bracket(piece[1:-1], text)
            else:
                if re.search(r"[\s\[\]]", piece):
                    raise ValueError(f"nodelist {text!r}: invalid characters in {piece!r}")
                choices = [piece]
            names = [n + c for n in names for c in choices]
        for name in names:
            if name not in hosts:
                hosts.append(name)
    return hosts


def expand_tasks_per_node(text: str) -> List[int]:
    """``2(x3),1`` -> ``[2, 2, 2, 1]`` (the format of ``SLURM_TASKS_PER_NODE``)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"tasks per node {text!r} is empty; expected a form like 2(x3),1")
    counts: List[int] = []
    for item in text.strip().split(","):
        m = _TASKS_ITEM.match(item.strip())
        if not m:
            raise ValueError(f"tasks per node {text!r}: bad entry {item!r}; expected N or N(xM), e.g. 2(x3),1")
        repeat = int(m.group(2)) if m.group(2) is not None else 1
        if repeat < 1:
            raise ValueError(f"tasks per node {text!r}: repeat count in {item!r} must be >= 1")
        counts.extend([int(m.group(1))] * repeat)
    return counts


def parse_gpu_count(text: str, variable: str = "SLURM_GPUS_PER_NODE") -> int:
    """``4``, ``gpu:4``, ``a100:4``, ``gpu:a100:4`` or ``a100:2,v100:2`` -> number of GPUs."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{variable}={text!r} is empty; expected a GPU count like 4, gpu:4 or a100:4")
    total = 0
    for item in text.strip().split(","):
        item = item.split("(", 1)[0]  # gres strings may carry "(IDX:0-3)"
        count = item.strip().rsplit(":", 1)[-1]
        if not count.isdigit():
            raise ValueError(f"{variable}={text!r}: {item!r} does not end in a count; expected 4, gpu:4 or a100:4")
        total += int(count)
    return total


def gpus_per_node(env: Optional[Mapping[str, str]] = None) -> int:
    """GPUs this node has in the allocation: ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE``, else 0."""
    env = os.environ if env is None else env
    for variable in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(variable):
            return parse_gpu_count(env[variable], variable)
    return 0


@dataclass(frozen=True)
class SlurmJobEnvironment:
    """What SLURM says about this job (and, inside a job step, this task).

    Built by :meth:`from_env` through the ``_ENV`` table. Task fields (ranks) are those of the
    batch script (0) outside ``srun``.
    """
    job_id: str
    job_name: Optional[str] = None
    global_rank: int = 0
    local_rank: int = 0
    num_tasks: Optional[int] = None
    node_rank: int = 0
    num_nodes: Optional[int] = None
    nodes: Tuple[str, ...] = ()
    tasks_per_node: Tuple[int, ...] = ()
    array_job_id: Optional[str] = None
    array_task_id: Optional[str] = None
    restart_count: int = 0
    gpus_on_node: int = 0

    def __post_init__(self) -> None:
        if self.nodes and self.tasks_per_node and len(self.nodes) != len(self.tasks_per_node):
            raise ValueError(f"SLURM_JOB_NODELIST names {len(self.nodes)} nodes but SLURM_TASKS_PER_NODE "
                             f"describes {len(self.tasks_per_node)}; both must come from the same job")
        if self.num_tasks is not None and not 0 <= self.global_rank < self.num_tasks:
            raise ValueError(f"SLURM_PROCID={self.global_rank} is outside SLURM_NTASKS={self.num_tasks}")

    @property
    def requeue_id(self) -> str:
        """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for array tasks, else the job id."""
        if self.array_job_id and self.array_task_id:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "SlurmJobEnvironment":
        env = os.environ if env is None else env
        if not in_slurm_job(env):
            raise ValueError("SLURM_JOB_ID is not set: not inside a SLURM job (run under sbatch, salloc or srun)")
        values = {}
        for name, variable in _ENV.items():
            raw = env.get(variable)
            if raw is None or raw == "":
                continue
            if name in _INT_FIELDS:
                if not raw.strip().isdigit():
                    raise ValueError(f"{variable}={raw!r} is not a non-negative integer")
                values[name] = int(raw)
            else:
                values[name] = raw
        nodelist = values.pop("nodelist", None) or env.get("SLURM_NODELIST")
        if nodelist:
            values["nodes"] = tuple(expand_nodelist(nodelist))
        if "tasks_per_node" in values:
            values["tasks_per_node"] = tuple(expand_tasks_per_node(values["tasks_per_node"]))
        values["gpus_on_node"] = gpus_per_node(env)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def allocation_nodes(env: Optional[Mapping[str, str]] = None) -> Tuple[str, ...]:
    """The nodes of the Slurm allocation we run in; () outside one."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return tuple(expand_nodelist(nodelist)) if in_slurm_job(env) and nodelist else ()


def hosts_from_slurm(env: Optional[Mapping[str, str]] = None) -> List[Tuple[str, int]]:
    """``[(host, slots), ...]`` for the launcher inside an allocation (no -np/-H given).

    Slots per node: the tasks SLURM allotted to it when that is more than one
    (``--ntasks-per-node=4``: one worker per task); otherwise its GPUs (``--gpus-per-node=4``
    with one task per node: the launcher starts one worker per GPU); otherwise 1.
    """
    env = os.environ if env is None else env
    job = SlurmJobEnvironment.from_env(env)
    if not job.nodes:
        raise ValueError("SLURM_JOB_NODELIST is not set: cannot tell which nodes the job has")
    if job.tasks_per_node:
        tasks = list(job.tasks_per_node)
    elif env.get("SLURM_NTASKS_PER_NODE"):
        raw = env["SLURM_NTASKS_PER_NODE"]
        per = expand_tasks_per_node(raw)
        tasks = per * len(job.nodes) if len(per) == 1 else per
        if len(tasks) != len(job.nodes):
            raise ValueError(f"SLURM_NTASKS_PER_NODE={raw!r} does not match the {len(job.nodes)} nodes of the job")
    else:
        tasks = [1] * len(job.nodes)
    return [(host, n if n > 1 else max(1, n, job.gpus_on_node)) for host, n in zip(job.nodes, tasks)]


# torchrun's variable -> where an srun task finds it; the step's own variables first (a step may
# use part of the allocation), then the job's.
_TORCH_FROM_SLURM = {
    "RANK": ("SLURM_PROCID",),
    "WORLD_SIZE": ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
    "LOCAL_RANK": ("SLURM_LOCALID",),
}


def _first(env: Mapping[str, str], names: Tuple[str, ...]) -> Tuple[str, str]:
    for name in names:
        if env.get(name):
            return name, env[name]
    raise ValueError(f"{' or '.join(names)} is not set: not inside an srun task; start the workers with "
                     "srun (see slurm/*.sbatch) or with python -m launch --engine torch")


def torch_env_from_slurm(env: Mapping[str, str]) -> dict:
    """An srun task's place as torch.distributed's variables (what torchrun would set), and
    ``DISTRIB_ENGINE=torch``. Rank 0 is the first task of the first node of the step (srun's block
    distribution), so ``MASTER_ADDR`` is that node; ``MASTER_PORT`` must already be set, the same
    in every task (the batch script picks one free on that node, where it runs)."""
    out = {}
    for variable, names in _TORCH_FROM_SLURM.items():
        name, raw = _first(env, names)
        if not raw.strip().isdigit():
            raise ValueError(f"{name}={raw!r} is not a non-negative integer")
        out[variable] = str(int(raw))
    name, nodelist = _first(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    nodes = expand_nodelist(nodelist)
    per_node_name, per_node = _first(env, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    counts = expand_tasks_per_node(per_node)
    node_name, node = _first(env, ("SLURM_NODEID",))
    if not node.isdigit() or int(node) >= len(counts) or len(counts) != len(nodes):
        raise ValueError(f"{node_name}={node!r}, {per_node_name}={per_node!r} and {name}={nodelist!r} do not "
                         "describe the same nodes; they must come from the same srun step")
    port = env.get("MASTER_PORT", "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"MASTER_PORT={port!r} is not a port: export MASTER_PORT=\"$(python -m launch.srun_task "
                         "--free-port)\" in the batch script before srun (slurm/*.sbatch do)")
    out.update(LOCAL_WORLD_SIZE=str(counts[int(node)]), MASTER_ADDR=nodes[0], MASTER_PORT=port,
               DISTRIB_ENGINE="torch")
    return out
