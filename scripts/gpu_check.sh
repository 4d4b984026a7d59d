#!/usr/bin/env bash
# make gpu-check: on a machine with NVIDIA GPUs (no network needed), build Horovod with NCCL against
# this machine's torch when it is missing, then run every check of scripts/gpu_check.py on the GPUs.
#
# Python: DISTRIB_PYTHON, else .venv/bin/python when its torch sees a GPU, else python3 on PATH.
# The build is scripts/bootstrap.sh with DISTRIB_SETUP=horovod (only Horovod, into that
# environment), HOROVOD_GPU_OPERATIONS=NCCL and Gloo as the controller (the proven recipe: no MPI
# headers needed). Without network it needs HOROVOD_SDIST=<horovod-0.28.1.tar.gz> and cffi's
# wheels in PIP_FIND_LINKS=<folder> (with PIP_NO_INDEX=1);
#     scripts/gpu_check.sh --fetch DIR     (on a machine with network) downloads the three into DIR;
#     HOROVOD_SDIST=DIR/horovod-0.28.1.tar.gz PIP_FIND_LINKS=DIR PIP_NO_INDEX=1 make gpu-check
# Other arguments go to gpu_check.py (--cpu: a dry run on the CPU, no build; --only sync,bench-1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOROVOD_VERSION="0.28.1"
fail() { echo "gpu-check: error: $*" >&2; exit 1; }

if [ "${1:-}" = "--fetch" ]; then
    DIR="${2:?usage: scripts/gpu_check.sh --fetch DIR [PYTHON_VERSION (default 3.12)]}"
    PYVER="${3:-3.12}"
    PY="${DISTRIB_PYTHON:-python3}"
    mkdir -p "$DIR"
    "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$DIR" "horovod==$HOROVOD_VERSION"
    "$PY" -m pip download --only-binary :all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 -d "$DIR" cffi pycparser
    echo "gpu-check: $DIR holds what the build needs; on the GPU machine:"
    echo "  HOROVOD_SDIST=$DIR/horovod-$HOROVOD_VERSION.tar.gz PIP_FIND_LINKS=$DIR PIP_NO_INDEX=1 make gpu-check"
    exit 0
fi

sees_gpu() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
CPU_RUN=""
if [[ " $* " == *" --cpu "* ]]; then CPU_RUN=1; fi
if [ -n "${DISTRIB_PYTHON:-}" ]; then
    PY="$DISTRIB_PYTHON"
    "$PY" -c "import torch" 2>/dev/null || fail "DISTRIB_PYTHON=$PY has no torch; give the interpreter with torch"
elif [ -n "$CPU_RUN" ] && [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY=""
    for candidate in "$ROOT/.venv/bin/python" "$(command -v python3 || true)"; do
        if [ -x "$candidate" ] && sees_gpu "$candidate"; then PY="$candidate"; break; fi
    done
    [ -n "$PY" ] || fail "no torch here sees a GPU (tried .venv/bin/python and python3 on PATH); set DISTRIB_PYTHON to the interpreter whose torch has CUDA, or pass --cpu for a dry run on the CPU"
fi

if [ -z "$CPU_RUN" ]; then
    sees_gpu "$PY" || fail "torch in $PY sees no GPU (torch.cuda.is_available() is False); scripts/gpu_check.sh --cpu runs the checks on the CPU"
    if ! "$PY" -c "import sys, horovod.torch as hvd; sys.exit(0 if hvd.nccl_built() else 1)" 2>/dev/null; then
        echo "gpu-check: building Horovod $HOROVOD_VERSION with NCCL for $PY (about 2 minutes on 16 cores)"
        DISTRIB_PYTHON="$PY" DISTRIB_SETUP=horovod DISTRIB_WITHOUT_MPI=1 \
            HOROVOD_GPU_OPERATIONS="${HOROVOD_GPU_OPERATIONS:-NCCL}" bash "$ROOT/scripts/bootstrap.sh"
    fi
fi
cd "$ROOT"
exec "$PY" scripts/gpu_check.py "$@"
