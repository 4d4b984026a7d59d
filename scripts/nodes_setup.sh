#!/usr/bin/env bash
# Idempotent: installs what the multi-host test cluster needs (tests/nodes.py): Debian's
# openssh-server (an sshd per namespace host; the machine's own ssh service is not started or
# configured: each node's sshd runs with a config of the test's own), iproute2 (ip, tc) and
# util-linux (unshare, nsenter). A second run checks the commands and returns at once.
set -euo pipefail

say() { echo "[nodes_setup] $*"; }

have_all() {
    [ -x /usr/sbin/sshd ] || return 1
    for c in ssh ssh-keygen ip tc unshare nsenter; do
        command -v "$c" >/dev/null 2>&1 || return 1
    done
}

if have_all; then
    say "openssh-server, iproute2 and util-linux already installed"
    exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
say "installing Debian's openssh-server iproute2 util-linux"
$SUDO apt-get update -q
# The tests never use the package's own sshd or its /etc/ssh config: each node runs one with a
# config of the test cluster's own. (Without systemd, as in containers and CI, the package starts
# no service; verified here: no sshd running after the install.)
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends openssh-server iproute2 util-linux
have_all || { echo "[nodes_setup] error: packages installed but a command is missing (sshd, ssh, ip, tc, unshare, nsenter)" >&2; exit 1; }
say "ready"
