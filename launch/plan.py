"""LaunchConfig -> the exact command that starts the workers through Horovod's own launchers.

:func:`build_plan` is a pure function of its arguments (configuration, resolved controller,
names of the launcher's environment variables, root or not, tool paths, this machine's names),
so its output is golden-tested. The impure look-ups it needs live in :func:`find_tools`,
:func:`horovod_built_with_mpi` and :func:`resolve_controller`'s caller.

Each worker runs ``python -m launch.worker script.py args``, the shim that records how it ended.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import os
import ipaddress
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

from launch.cli import LaunchConfig
from launch.hosts import format_hosts, is_local
from launch.status_channel import HEARTBEAT_ENV, RUNTIME_ENV_NAMES


# What mpirun must forward to remote workers (local ones inherit the whole environment anyway).
EXPORT_NAMES = frozenset({"PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED",
                          "OMP_NUM_THREADS", "MKL_NUM_THREADS"})
EXPORT_PREFIXES = ("HOROVOD_", "DISTRIB_", "NCCL_")
# Per-process values a launcher sets for each worker: never copied from ours.
NOT_EXPORTED = frozenset({"HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE",
                          "HOROVOD_CROSS_RANK", "HOROVOD_CROSS_SIZE", "HOROVOD_HOSTNAME",
                          "HOROVOD_GLOO_RENDEZVOUS_ADDR", "HOROVOD_GLOO_RENDEZVOUS_PORT", "HOROVOD_GLOO_IFACE"})
# Open MPI flags horovodrun --mpi uses (runner/mpi_run.py): no InfiniBand verbs BTL, ob1 PML.
# mpi_yield_when_idle: Open MPI otherwise busy-polls in every wait, and Horovod's background
# thread waits in MPI each cycle; with one worker per core that spinning steals the core from
# the worker's own computation (measured here: 2-worker MLP step 63-88 ms -> 52-58 ms).
# odls_base_sigkill_timeout 0: when a rank dies, mpirun otherwise sleeps 1 s after SIGCONT and
# again after SIGTERM before it kills the others, which are stuck in a collective and cannot do
# anything useful; that was 1 s of every 4.4 s restart here. A graceful stop (Ctrl-C, scancel)
# does not depend on it: the supervisor signals the workers itself before mpirun.
# Across hosts on a slow link Open MPI's TCP allreduce stays far from the wire time (2 hosts,
# 16 MiB float32, 1 Gbit/s token bucket, median ms: raw mpi4py 180-256, Gloo 139, wire 134) and no
# flag is added for it: `btl_tcp_links 2` (or `btl_tcp_sndbuf 131072`) brings raw MPI_Allreduce
# to 140, but not once Horovod runs in the process (its background thread's per-cycle
# coordination shares the connections): hvd.allreduce and the training step stayed at medians 175-240
# with or without it, and a run with `btl_tcp_links 4` hung. Tuned allreduce algorithms 1-6,
# socket buffers of 0 or 4 MiB and larger fragments: medians 176-275.
OMPI_MCA = ("-mca", "pml", "ob1", "-mca", "btl", "^openib", "-mca", "mpi_yield_when_idle", "1",
            "-mca", "odls_base_sigkill_timeout", "0")
NO_BINDING = ("--bind-to", "none", "--map-by", "slot")


@dataclass(frozen=True)
class Tools:
    """Where the programs are; a parameter of the plan so that golden tests fix them."""
    python: str
    mpirun: str = "mpirun"
    horovodrun: str = "horovodrun"


@dataclass(frozen=True)
class Plan:
    controller: str
    reason: str
    argv: Tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # fixed variables added for the workers
    engine: str = "horovod"  # or "torch": argv is launch.torch_spawn (launch/torch_plan.py)

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def exported_names(env_names: Iterable[str], ours: Iterable[str] = ()) -> Tuple[str, ...]:
    """Sorted names mpirun forwards with ``-x``: the useful ones present, plus ``ours``."""
    names = {n for n in env_names
             if (n in EXPORT_NAMES or n.startswith(EXPORT_PREFIXES)) and n not in NOT_EXPORTED}
    return tuple(sorted(names | set(ours)))


def runtime_env_names(config: LaunchConfig) -> Tuple[str, ...]:
    """The variables the supervisor sets for each attempt (launch/status_channel.py; the heartbeat
    one only with --hang-timeout)."""
    return RUNTIME_ENV_NAMES + ((HEARTBEAT_ENV,) if config.hang_timeout else ())


def resolve_controller(requested: str, mpi_built: Callable[[], Optional[bool]], mpirun: Optional[str],
                       elastic: bool = False) -> Tuple[str, str]:
    """``auto|mpi|gloo`` -> (controller, why). ``mpi_built`` is only called for ``auto`` (it is slow)."""
    if elastic:
        return "gloo", "elastic mode runs on Horovod's Gloo controller"
    if requested == "gloo":
        return "gloo", "requested with --controller gloo"
    if requested == "mpi":
        if mpirun is None:
            raise ValueError("--controller mpi needs mpirun on PATH; install Open MPI (apt-get install "
                             "openmpi-bin) or use --controller gloo")
        return "mpi", "requested with --controller mpi"
    built = mpi_built()
    if built is None:  # neither controller can work: say so now, not once per worker
        raise ValueError("Horovod with PyTorch support cannot be imported by this Python "
                         f"({sys.executable}); install it into this environment (README: Installing into your own "
                         "environment) or run `make setup` in a checkout; `python -c 'import horovod.torch'` "
                         "shows why")
    if not built:
        return "gloo", "auto: Horovod was built without MPI"
    if mpirun is None:
        return "gloo", "auto: Horovod has MPI but mpirun is not on PATH"
    return "mpi", "auto: Horovod was built with MPI and mpirun is on PATH"


def horovod_built_with_mpi() -> Optional[bool]:
    """``horovod.torch.mpi_built()``; None when Horovod's PyTorch support cannot be loaded.

    Asks the extension library itself (what ``mpi_built()`` does once imported): loading it takes
    0.5 s here, importing horovod.torch 2 s (it imports torch), and the launcher paid that before
    starting any worker, at every launch. Falls back to the import when the library is not where
    a Horovod installation puts it or does not load, so that the import's error decides."""
    built = _mpi_built_from_extension()
    if built is not None:
        return built
    try:
        import horovod.torch as hvd
    except Exception:  # ImportError, or a broken build raising anything on load
        return None
    return bool(hvd.mpi_built())


def _mpi_built_from_extension() -> Optional[bool]:
    try:
        spec = importlib.util.find_spec("horovod")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "torch")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = os.path.join(folder, "mpi_lib_v2" + suffix)
        if os.path.isfile(library):
            try:
                return bool(ctypes.CDLL(library).horovod_mpi_built())
            except (OSError, AttributeError):  # unloadable (e.g. built for another torch): let the import say why
                return None
    return None


def find_tools(python: str = sys.executable) -> Tools:
    """mpirun from PATH; horovodrun next to ``python`` (the same installation), else from PATH."""
    beside = os.path.join(os.path.dirname(python), "horovodrun")
    horovodrun = beside if os.access(beside, os.X_OK) else (shutil.which("horovodrun") or "horovodrun")
    return Tools(python=python, mpirun=shutil.which("mpirun") or "mpirun", horovodrun=horovodrun)


def discovery_script_text(hosts) -> str:
    """A host discovery script for Horovod Elastic that lists a static set of hosts."""
    return "#!/bin/sh\n# generated by distrib-launch: the hosts of -H/--hostfile\n" + "".join(
        f"echo {name}:{slots}\n" for name, slots in hosts)


def network_interface(config: LaunchConfig, local: FrozenSet[str],
                      detected: Optional[Tuple[Optional[str], str]] = None) -> Tuple[Optional[str], str]:
    """(interface for Gloo, why). Elastic Gloo hangs silently on a multi-interface host when it
    picks an interface the peers cannot reach (seen here with eth0 beside lo). ``detected`` is
    :func:`shared_interface`'s answer for remote hosts."""
    if config.network_interface:
        return config.network_interface, "given with --network-interface"
    if all(is_local(name, local) for name, _ in config.hosts):
        return "lo", "every host is this machine"
    if detected is not None and detected[0]:
        return detected
    return None, (detected[1] if detected else "horovodrun picks the interfaces common to all hosts")


def shared_interface(host_addresses: Mapping[str, Optional[str]],
                     interfaces: Mapping[str, Sequence[Tuple[str, str]]]) -> Tuple[Optional[str], str]:
    """The interface of this host whose subnet holds the address of every remote host (never a
    loopback one), and why; pure. ``host_addresses``: remote host -> IPv4 address (None: does not
    resolve); ``interfaces``: this host's interface -> (address, netmask) pairs. Horovod takes one
    interface name for every host, so the hosts are assumed to name that network alike (they do
    on a cluster installed from one image)."""
    unresolved = sorted(h for h, a in host_addresses.items() if not a)
    if unresolved or not host_addresses:
        return None, f"{', '.join(unresolved) or 'no remote host'} does not resolve: horovodrun picks the interfaces"
    candidates = []
    for name in sorted(interfaces):
        networks = [ipaddress.ip_network(f"{a}/{m}", strict=False) for a, m in interfaces[name] if m]
        if any(n.is_loopback for n in networks):
            continue
        if all(any(ipaddress.ip_address(addr) in n for n in networks) for addr in host_addresses.values()):
            candidates.append(name)
    hosts = ", ".join(sorted(host_addresses))
    if not candidates:
        return None, f"no interface of this host is on the subnet of {hosts}: horovodrun picks the interfaces"
    return candidates[0], f"this host's interface on the subnet of {hosts}"


def local_interfaces() -> Dict[str, List[Tuple[str, str]]]:
    """This host's interfaces that are up -> their IPv4 (address, netmask) pairs."""
    import psutil  # only on this path: the launcher's start stays light
    stats = psutil.net_if_stats()
    return {name: [(a.address, a.netmask) for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items() if name not in stats or stats[name].isup}


def resolve_addresses(names: Iterable[str]) -> Dict[str, Optional[str]]:
    found = {}
    for name in names:
        try:
            found[name] = socket.gethostbyname(name)
        except OSError:
            found[name] = None
    return found


def build_plan(config: LaunchConfig, controller: str, reason: str, *, env_names: Iterable[str],
               is_root: bool, tools: Tools, local: FrozenSet[str], discovery_script: Optional[str] = None,
               detected_interface: Optional[Tuple[Optional[str], str]] = None) -> Plan:
    """The exact argv for ``controller`` (``mpi`` or ``gloo``); pure. Elastic runs need the path of
    the host discovery script (the user's, or one the caller wrote from :func:`discovery_script_text`)."""
    env = {"HOROVOD_TIMELINE": config.timeline} if config.timeline else {}
    # "--" before the script's own flags: horovodrun's argparse resolves abbreviations over the
    # whole command line, so a script flag such as --log ("ambiguous option: --log could match
    # --log-level, ...") would stop the job before it starts. The shim drops the "--".
    worker = (tools.python, "-m", "launch.worker", config.script, "--", *config.script_args)
    hosts = format_hosts(config.hosts)
    if config.elastic:
        if controller != "gloo" or not discovery_script:
            raise AssertionError("elastic plans need the gloo controller and a discovery script")
        interface, _ = network_interface(config, local, detected_interface)
        argv = (tools.horovodrun, "--gloo", "-np", str(config.np), "--min-np", str(config.min_np),
                "--max-np", str(config.max_np), "--host-discovery-script", discovery_script,
                *(("--network-interface", interface) if interface else ()),
                *(("--blacklist-cooldown-range", *map(str, config.blacklist_cooldown))
                  if config.blacklist_cooldown else ()),
                *(("--reset-limit", str(config.reset_limit)) if config.reset_limit else ()),
                *(("--verbose",) if config.verbose else ()), *worker)
    elif controller == "mpi":
        exports = []
        for name in exported_names(env_names, [*env, *runtime_env_names(config)]):
            exports += ["-x", name]
        argv = (tools.mpirun, *(("--allow-run-as-root",) if is_root else ()), "--oversubscribe",
                "-np", str(config.np), "-H", hosts, *NO_BINDING, *OMPI_MCA, *exports, *worker)
    elif controller == "gloo":
        all_local = all(is_local(name, local) for name, _ in config.hosts)
        argv = (tools.horovodrun, "--gloo", "-np", str(config.np), "-H", hosts,
                *(("--network-interface", "lo") if all_local else ()),
                *(("--verbose",) if config.verbose else ()), *worker)
    else:
        raise AssertionError(f"unresolved controller {controller!r}")
    return Plan(controller=controller, reason=reason, argv=argv, env=env)


def describe(config: LaunchConfig, plan: Plan, local: FrozenSet[str],
             detected_interface: Optional[Tuple[Optional[str], str]] = None) -> str:
    """The resolved plan, as printed once at start."""
    where = ", ".join(f"{name}:{slots}{'' if is_local(name, local) else ' (remote)'}"
                      for name, slots in config.hosts)
    if plan.engine == "torch":
        lines = [f"engine: torch ({plan.reason}); MASTER_PORT: free on rank 0's host, new at each attempt"]
    else:
        lines = [f"controller: {plan.controller} ({plan.reason})"]
    lines.append(f"hosts: {where}; np: {config.np}")
    if config.elastic:
        interface, why = network_interface(config, local, detected_interface)
        lines.append(f"elastic: {config.min_np}..{config.max_np} workers, hosts from "
                     f"{config.discovery_script or 'a discovery script generated from the hosts'}; "
                     f"network interface: {interface or 'auto'} ({why})")
    if config.max_restarts or config.hang_timeout:
        hang = f"{config.hang_timeout:g} s" if config.hang_timeout else "off"
        lines.append(f"max restarts: {config.max_restarts}; hang timeout: {hang}")
    if config.timeline:
        lines.append(f"timeline: {config.timeline}")
    lines.append(f"command: {plan.command}")
    return "".join(f"distrib-launch: {line}\n" for line in lines)
