"""distrib/comm/ring_sockets.py: the connections a world's start opened, cut when it breaks, and
nothing else (real sockets of this process, real /proc tables)."""
import os
import socket

import pytest

from distrib.comm.ring_sockets import RingSockets, established_connections, socket_descriptors, status_channel_port
from launch.status_channel import ADDRESS_ENV

GUARD_S = 60  # a recv that never returns fails the test instead of hanging it (not a measured time)


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def connect(server):
    return socket.create_connection(server.getsockname()[:2])


def test_sever_ends_the_connections_opened_during_start_and_leaves_the_others(listener):
    """A peer blocked in a receive on a connection opened during start() gets end-of-file at once
    (what a Gloo peer of a worker that saw the failure gets instead of waiting out its timeout);
    a connection that existed before keeps working both ways."""
    older = connect(listener)
    older_peer, _ = listener.accept()
    opened = []
    ring = RingSockets.opened_during(lambda: opened.append(connect(listener)))
    ring_peer, _ = listener.accept()  # the far end: accepted after start(), as a peer process holds it
    assert set(ring.sockets) == {opened[0].fileno()}
    assert ring.sever() == 1
    ring_peer.settimeout(GUARD_S)
    assert ring_peer.recv(1) == b""  # end-of-file, not data and not the guard's timeout
    older.sendall(b"x")
    older_peer.settimeout(GUARD_S)
    assert older_peer.recv(1) == b"x"
    older_peer.sendall(b"y")
    older.settimeout(GUARD_S)
    assert older.recv(1) == b"y"
    for s in (older, older_peer, opened[0], ring_peer):
        s.close()


def test_a_descriptor_number_reused_by_another_socket_is_not_touched(listener):
    """The remembered connection was closed and its number now names a new connection: sever()
    finds the inode changed and leaves it alone."""
    opened = []
    ring = RingSockets.opened_during(lambda: opened.append(connect(listener)))
    first_peer, _ = listener.accept()
    number = opened[0].fileno()
    opened[0].close()
    newer = connect(listener)
    newer_peer, _ = listener.accept()
    if newer.fileno() != number:  # the kernel hands out the lowest free number, usually the old one
        os.dup2(newer.fileno(), number)
        newer.close()
        newer = socket.socket(fileno=number)
    assert ring.sever() == 0
    newer.sendall(b"z")
    newer_peer.settimeout(GUARD_S)
    assert newer_peer.recv(1) == b"z"
    for s in (newer, newer_peer, first_peer):
        s.close()


def test_the_status_channel_and_listening_sockets_are_not_part_of_the_ring(listener):
    """distrib's own connection to the launcher (its port excluded) and a socket that only listens
    (established connections only) are never cut, even when start() opened them."""
    with socket.create_server(("127.0.0.1", 0)) as channel_server:
        opened = []

        def start():
            opened.append(connect(channel_server))
            opened.append(socket.create_server(("127.0.0.1", 0)))
            opened.append(connect(listener))

        ring = RingSockets.opened_during(start, exclude_port=channel_server.getsockname()[1])
        assert set(ring.sockets) == {opened[2].fileno()}
        for s in [*opened, channel_server.accept()[0], listener.accept()[0]]:
            s.close()


def test_proc_tables_and_the_status_channel_port():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = connect(server)
        peer, _ = server.accept()
        inode = socket_descriptors()[client.fileno()]
        assert established_connections()[inode] == server.getsockname()[1]  # its remote port
        client.close()
        peer.close()
    assert status_channel_port({ADDRESS_ENV: "198.18.0.1,127.0.0.1:40123"}) == 40123
    assert status_channel_port({}) is None


def test_watch_peers_has_the_kernel_drop_a_silent_peer_of_the_ring_only(listener):
    """The ring's connections get keepalive probes and a bound on unacknowledged data (a lost host
    then fails them in LOST_HOST_S instead of the Gloo timeout); other connections keep the defaults."""
    older = connect(listener)
    opened = []
    ring = RingSockets.opened_during(lambda: opened.append(connect(listener)))
    assert ring.watch_peers(lost_after_s=5.0) == 1
    assert opened[0].getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert opened[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 5000
    assert opened[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
    assert older.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    assert older.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
    for s in [older, *opened, listener.accept()[0], listener.accept()[0]]:
        s.close()
