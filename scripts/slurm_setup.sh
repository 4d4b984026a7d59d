#!/usr/bin/env bash
# Idempotent: installs Debian's slurm-wlm and munge (a one-node test cluster; see
# tests/slurm_cluster.py, which writes its own slurm.conf and starts the daemons).
# A second run checks the commands and returns in well under a second.
set -euo pipefail

say() { echo "[slurm_setup] $*"; }

have_all() {
    for c in slurmctld slurmd sbatch srun sinfo scontrol scancel sacct munged mungekey; do
        command -v "$c" >/dev/null 2>&1 || return 1
    done
}

if have_all; then
    say "slurm and munge already installed: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo "?")"
else
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    say "installing Debian's slurm-wlm munge"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q slurm-wlm munge
    have_all || { echo "[slurm_setup] error: slurm-wlm/munge installed but a command is missing" >&2; exit 1; }
    say "installed: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo "?")"
fi

# munge needs a key readable only by the munge user; the package usually creates one.
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
say "ready"
