"""``python -m launch`` / ``distrib-launch``: start N workers and supervise them.

arguments -> :class:`launch.cli.LaunchConfig` -> :func:`launch.plan.build_plan` (Horovod) or
:func:`launch.torch_plan.build_torch_plan` (``--engine torch``): the exact command ->
:func:`launch.supervise.supervise`. See ``python -m launch --help``.
"""
from __future__ import annotations

import functools
import os
import shutil
import socket
import sys
import tempfile
from typing import List, Optional

from launch.cli import config_from_args, fail
from launch.hosts import check_ssh, hosts_needing_ssh, local_names, remote_hosts, unreachable_host_error
from launch.plan import (build_plan, describe, discovery_script_text, find_tools, horovod_built_with_mpi,
                         local_interfaces, resolve_addresses, resolve_controller, shared_interface)
from launch.slurm_env import allocation_nodes, in_slurm_job
from launch.supervise import supervise
from launch.torch_plan import build_torch_plan


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the supervisor took over signals: nothing runs yet
        sys.stderr.write("distrib-launch: interrupted before any worker started\n")
        return 130


def _main(argv: Optional[List[str]]) -> int:
    config = config_from_args(sys.argv[1:] if argv is None else argv)
    local = local_names()
    if config.engine == "torch":  # no Horovod involved: not even its import
        try:
            slurm_nodes = frozenset(allocation_nodes())
        except ValueError as exc:
            fail(str(exc))
        plan = build_torch_plan(config, tools=find_tools(), local=local, this_host=socket.gethostname(),
                                slurm_nodes=slurm_nodes)
        return _run(config, plan, local, slurm_nodes=slurm_nodes)
    try:
        controller, reason = resolve_controller(config.controller, horovod_built_with_mpi, shutil.which("mpirun"),
                                                elastic=config.elastic)
    except ValueError as exc:
        fail(str(exc))
    with tempfile.TemporaryDirectory(prefix="distrib-elastic-") as scratch:
        discovery = config.discovery_script or (_write_discovery_script(scratch, config) if config.elastic else None)
        detected = _detect_interface(config, local)
        plan = build_plan(config, controller, reason, env_names=os.environ, is_root=os.geteuid() == 0,
                          tools=find_tools(), local=local, discovery_script=discovery, detected_interface=detected)
        return _run(config, plan, local, detected)


def _run(config, plan, local, detected=None, slurm_nodes=frozenset()) -> int:
    """Print the resolved plan; unless --dry-run, check the hosts over ssh and supervise it."""
    sys.stderr.write(describe(config, plan, local, detected))
    sys.stderr.flush()
    if config.dry_run:
        print(plan.command)
        return 0
    tools = find_tools()
    check = functools.partial(check_ssh, python=tools.python, cwd=os.getcwd())
    error = unreachable_host_error(hosts_needing_ssh(config.hosts, local, plan.controller, in_slurm_job(),
                                                     slurm_nodes), check)
    if error:
        fail(error)
    return supervise(plan, config)


def _detect_interface(config, local):
    """Elastic across hosts: the interface they share (Horovod Elastic hangs on one they cannot reach)."""
    remote = remote_hosts(config.hosts, local)
    if not config.elastic or config.network_interface or not remote:
        return None
    return shared_interface(resolve_addresses(remote), local_interfaces())


def _write_discovery_script(folder: str, config) -> str:
    path = os.path.join(folder, "discover_hosts.sh")
    with open(path, "w", encoding="utf-8") as f:
        f.write(discovery_script_text(config.hosts))
    os.chmod(path, 0o755)
    return path


if __name__ == "__main__":
    sys.exit(main())
