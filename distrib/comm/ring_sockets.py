"""The TCP connections a Gloo world opened for this process, cut the moment the world breaks.

Why: when a worker dies, the kernel resets its connections, so the survivors whose link to it
was in use learn at once ("Connection reset by peer"). A survivor blocked in a receive from
*another survivor* learns nothing that way, and Horovod 0.28.1 never closes the Gloo
connections of a broken world: its contexts outlive ``hvd.shutdown()`` and ``hvd.init()`` (the
old devices' threads keep running, their sockets stay open). That survivor waits out
``HOROVOD_GLOO_TIMEOUT_SECONDS`` ("Timed out waiting 15000ms for recv operation to complete")
while the others, already in the next rendezvous, wait for it: one kill cost the whole job the
Gloo timeout. A worker that learns the world is broken therefore shuts its side of every such
connection down (:meth:`RingSockets.sever`): a peer blocked on it gets end-of-file at once
("Connection closed by peer"), fails the same way, and its own shutdown passes the news on.

A host that is lost outright (power, link) resets nothing: its peers' connections to it just go
silent, and a receive from it waits out the Gloo timeout. :meth:`RingSockets.watch_peers` has the
kernel give up on such a connection after ``LOST_HOST_S`` of silence instead (TCP keepalive
probes, and ``TCP_USER_TIMEOUT`` for data sent but not acknowledged); the receive then fails, and
the worker cuts the rest as above. Safe for a healthy job: probes and acknowledgements are
answered by the peer host's kernel whatever its process does (busy, blocked in I/O, waiting for
a slow rank), so only a host that answers nothing for that long, i.e. one that is gone or cut
off, is dropped. A rank stopped outright (SIGSTOP) while data waits for it may be dropped too;
it is a hang either way.

Which sockets: the TCP connections established while ``hvd.init()`` ran (:meth:`RingSockets.
opened_during`), less the status channel's (distrib's heartbeat, which has its own lifetime).
Each is remembered by descriptor *and* inode, and severed only through a duplicate whose inode
still matches, so a descriptor number the process has since reused for something else is never
touched. ``shutdown()``, not ``close()``: the descriptor stays Gloo's to close.
"""
from __future__ import annotations

import os
import socket
from typing import Callable, Dict, FrozenSet, Iterable, Mapping, Optional, TypeVar

from launch.status_channel import ADDRESS_ENV, parse_address

T = TypeVar("T")
TCP_TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")
# Seconds of silence after which a peer host counts as lost (see the module docstring): well above
# TCP's retransmission of a lost packet (200 ms, doubling), far below the Gloo timeout (15-30 s).
LOST_HOST_S = 5.0
ESTABLISHED = "01"  # the state column of /proc/net/tcp


def socket_descriptors(fd_dir: str = "/proc/self/fd") -> Dict[int, int]:
    """This process's open sockets: descriptor -> inode."""
    found = {}
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            found[int(name)] = int(target[len("socket:["):-1])
    return found


def established_connections(tables: Iterable[str] = TCP_TABLES) -> Dict[int, int]:
    """Established TCP connections of this network namespace: inode -> remote port."""
    found = {}
    for table in tables:
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == ESTABLISHED and cols[9] != "0":
                found[int(cols[9])] = int(cols[2].rsplit(":", 1)[1], 16)
    return found


def status_channel_port(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    env = os.environ if env is None else env
    try:
        return parse_address(env.get(ADDRESS_ENV, ""))[1]
    except ValueError:
        return None


class RingSockets:
    """The connections one world's ``hvd.init()`` opened: descriptor -> inode."""

    def __init__(self, sockets: Optional[Mapping[int, int]] = None):
        self.sockets: Dict[int, int] = dict(sockets or {})

    @classmethod
    def opened_during(cls, start: Callable[[], T], *, exclude_port: Optional[int] = None) -> "RingSockets":
        """Run ``start()`` (``hvd.init``) and keep the TCP connections that appeared meanwhile
        and are established when it returns, less those to ``exclude_port``."""
        before: FrozenSet[int] = frozenset(socket_descriptors().values())
        start()
        connections = established_connections()
        return cls({fd: inode for fd, inode in socket_descriptors().items()
                    if inode not in before and inode in connections and connections[inode] != exclude_port})

    def watch_peers(self, lost_after_s: float = LOST_HOST_S) -> int:
        """Have the kernel end every remembered connection whose peer host stays silent for
        ``lost_after_s`` (module docstring); returns how many it applied to. Never raises."""
        options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux: probe after 1 s idle, every second
            options += [(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1), (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
                        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, int(lost_after_s)))]
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # also bounds unacknowledged data and the probes
            options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(lost_after_s * 1000)))
        return sum(_with_socket(fd, inode, lambda sock: [sock.setsockopt(*o) for o in options])
                   for fd, inode in self.sockets.items())

    def sever(self) -> int:
        """Shut down every remembered connection that is still the same socket; returns how many.
        Idempotent, never raises (it runs while a failure is being handled)."""
        return sum(_with_socket(fd, inode, lambda sock: sock.shutdown(socket.SHUT_RDWR))
                   for fd, inode in self.sockets.items())


def _with_socket(fd: int, inode: int, action: Callable[[socket.socket], object]) -> bool:
    """``action(socket)`` on the socket behind ``fd`` if it is still the one of ``inode``."""
    try:
        dup = os.dup(fd)  # a number of our own: ``fd`` cannot be reused while we look
    except OSError:  # closed meanwhile (Gloo closes a pair that failed)
        return False
    try:
        if os.fstat(dup).st_ino != inode:  # the number now names another file
            return False
        with socket.socket(fileno=os.dup(dup)) as sock:  # closing it closes that duplicate only
            action(sock)
        return True
    except OSError:  # not connected any more (or the option is not offered here)
        return False
    finally:
        os.close(dup)
