"""Host lists for the launcher: pure parsers of ``-H`` and hostfiles, and which hosts are remote.

A host list is a tuple of ``(hostname, slots)`` pairs, in the order given. Everything here except
:func:`local_names` and :func:`check_ssh` is a pure function of its arguments, tested with tables.
Malformed input raises ``ValueError`` with a one-line message naming the value and the fix.
"""
from __future__ import annotations

import re
import shlex
import socket
import subprocess
from typing import Callable, FrozenSet, Optional, Sequence, Tuple

Hosts = Tuple[Tuple[str, int], ...]

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_LOCAL_ALIASES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=5")


def _hostname(name: str, where: str) -> str:
    if not _HOSTNAME.match(name):
        raise ValueError(f"{where}: {name!r} is not a host name; expected a name or address like node1 or 10.0.0.2")
    return name


def _slots(text: str, where: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{where}: slot count {text!r} is not a whole number >= 1; write e.g. node1:4")
    return int(text)


def _no_duplicates(hosts: Hosts, where: str) -> Hosts:
    seen = set()
    for name, _ in hosts:
        if name in seen:
            raise ValueError(f"{where}: host {name!r} is listed twice; list it once with its total slots")
        seen.add(name)
    return hosts


def parse_host_list(text: str) -> Hosts:
    """``-H`` value ``node1:4,node2:4`` -> ``(('node1', 4), ('node2', 4))``; a bare ``node1`` has 1 slot."""
    where = f"-H {text!r}"
    if not text or not text.strip():
        raise ValueError(f"{where} is empty; give hosts like localhost:2 or node1:4,node2:4")
    hosts = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"{where} has an empty entry; separate hosts with single commas: node1:4,node2:4")
        name, sep, slots = item.partition(":")
        hosts.append((_hostname(name, where), _slots(slots, where) if sep else 1))
    return _no_duplicates(tuple(hosts), where)


def parse_hostfile_line(line: str, where: str) -> Optional[Tuple[str, int]]:
    """One hostfile line -> ``(host, slots)``, or None for a blank or comment-only line.

    Accepts Horovod's ``host:slots``, Open MPI's ``host slots=N [max_slots=M]`` and a bare
    ``host`` (1 slot); ``#`` starts a comment anywhere.
    """
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    words = text.split()
    if len(words) == 1:
        name, sep, slots = words[0].partition(":")
        return _hostname(name, where), (_slots(slots, where) if sep else 1)
    name, options = _hostname(words[0], where), {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in ("slots", "max_slots", "max-slots") or key in options:
            raise ValueError(f"{where}: {text!r} is not 'host slots=N' or 'host:N'; e.g. node1 slots=4")
        options[key] = _slots(value, where)
    if "slots" not in options:
        raise ValueError(f"{where}: {text!r} gives no slots=N; e.g. {name} slots=4")
    return name, options["slots"]


def parse_hostfile(text: str, source: str = "hostfile") -> Hosts:
    """A hostfile's contents -> host list; errors name ``source`` and the line number."""
    hosts = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = parse_hostfile_line(line, f"{source} line {number}")
        if entry is not None:
            hosts.append(entry)
    if not hosts:
        raise ValueError(f"hostfile {source} lists no hosts; write one per line, e.g. node1:4 or 'node1 slots=4'")
    return _no_duplicates(tuple(hosts), f"hostfile {source}")


def read_hostfile(path: str) -> Hosts:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"--hostfile {path!r} cannot be read ({exc.strerror}); give an existing file") from None
    return parse_hostfile(text, path)


def total_slots(hosts: Hosts) -> int:
    return sum(slots for _, slots in hosts)


def format_hosts(hosts: Hosts) -> str:
    """``(('a', 2), ('b', 1))`` -> ``'a:2,b:1'`` (the form mpirun -H and horovodrun -H take)."""
    return ",".join(f"{name}:{slots}" for name, slots in hosts)


def is_local(name: str, local: FrozenSet[str]) -> bool:
    """True for loopback names and addresses and for the names in ``local`` (this machine's)."""
    lowered = name.lower()
    return lowered in _LOCAL_ALIASES or lowered.startswith("127.") or lowered in local


def remote_hosts(hosts: Hosts, local: FrozenSet[str]) -> Tuple[str, ...]:
    """The hosts that need ssh: those that are not this machine."""
    return tuple(name for name, _ in hosts if not is_local(name, local))


def hosts_needing_ssh(hosts: Hosts, local: FrozenSet[str], controller: str, in_slurm: bool,
                      slurm_nodes: FrozenSet[str] = frozenset()) -> Tuple[str, ...]:
    """The remote hosts the workers are started on over ssh. Inside a Slurm allocation mpirun
    starts its daemons on the other nodes through srun (Open MPI's Slurm launcher), and
    ``--engine torch`` (controller ``torch``) starts its workers on the allocation's nodes
    (``slurm_nodes``) as srun steps, so clusters without ssh between nodes work; horovodrun
    (Gloo) always uses ssh."""
    if controller == "mpi" and in_slurm:
        return ()
    if controller == "torch" and in_slurm:
        return tuple(name for name in remote_hosts(hosts, local) if name not in slurm_nodes)
    return remote_hosts(hosts, local)


def local_names() -> FrozenSet[str]:
    """This machine's names, lower-cased: hostname, fully qualified name, and their addresses."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        try:
            names.update(socket.gethostbyname_ex(name)[2])
        except OSError:
            pass
    return frozenset(n.lower() for n in names if n)


class HostProblem(str):
    """A reason that is the whole error already: ssh works, but the host lacks what the workers need."""


# Exit codes of the remote check (ssh itself exits 255 when it cannot connect).
NO_PYTHON, NO_FOLDER = 3, 4


def check_ssh(host: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
              python: Optional[str] = None, cwd: Optional[str] = None) -> Optional[str]:
    """Return None when ssh reaches ``host`` without a password (and, when given, finds ``python``
    and the folder ``cwd`` there: workers start as that Python, in that folder), else a one-line reason."""
    remote = ["true"]
    if python is not None and cwd is not None:
        remote = [f"test -x {shlex.quote(python)} || exit {NO_PYTHON}; test -d {shlex.quote(cwd)} || exit {NO_FOLDER}"]
    try:
        proc = run(["ssh", *SSH_OPTIONS, host, *remote], stdin=subprocess.DEVNULL, capture_output=True,
                   text=True, timeout=30)
    except FileNotFoundError:
        return "no ssh client on this machine (install openssh-client)"
    except subprocess.TimeoutExpired:
        return "ssh did not answer within 30 s"
    if proc.returncode == 0:
        return None
    if proc.returncode == NO_PYTHON and python is not None:
        return HostProblem(f"host {host!r} has no {python} (the Python the workers run): install the same "
                           f"environment at the same path on every host, or remove {host} from -H/--hostfile")
    if proc.returncode == NO_FOLDER and cwd is not None:
        return HostProblem(f"host {host!r} has no folder {cwd} (the workers start there): put the code at the "
                           f"same path on every host (a shared file system), or remove {host} from -H/--hostfile")
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"ssh exited with code {proc.returncode}"


def unreachable_host_error(hosts: Sequence[str], check: Callable[[str], Optional[str]] = check_ssh
                           ) -> Optional[str]:
    """The first remote host that ssh cannot reach, as a one-line error with the fix; None if all answer."""
    for host in hosts:
        reason = check(host)
        if isinstance(reason, HostProblem):
            return str(reason)
        if reason is not None:
            return (f"cannot reach host {host!r} over ssh ({reason}); make 'ssh {host} true' work without a "
                    f"password (ssh-copy-id {host}) or remove {host} from -H/--hostfile")
    return None
