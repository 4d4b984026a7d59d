#!/usr/bin/env bash
# Idempotent set-up: Open MPI, .venv with torch + Horovod (PyTorch, MPI, Gloo), distrib itself.
# A second run checks each step and skips what is already done, in seconds.
#
# GPU users: set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>")
# and HOROVOD_GPU_OPERATIONS=NCCL before the first run; the rest is the same.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
LOG_DIR="$VENV/logs"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
HOROVOD_VERSION="0.28.1"
PY="$VENV/bin/python"

say() { echo "[bootstrap] $*"; }
fail() { echo "[bootstrap] error: $*" >&2; exit 1; }

# Runs a step with its output in a log file; on failure prints one line naming the log.
logged() {
    local name="$1"; shift
    mkdir -p "$LOG_DIR"
    local log="$LOG_DIR/$name.log"
    if ! "$@" >"$log" 2>&1; then
        fail "$name failed; see $log (its last lines: tail -n 30 $log)"
    fi
}

# 1. Open MPI from Debian (Horovod's MPI controller and mpi4py build against it).
if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; then
    say "installing Debian's openmpi-bin libopenmpi-dev"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    mkdir -p "$LOG_DIR" 2>/dev/null || true
    logged apt-openmpi bash -c "$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y openmpi-bin libopenmpi-dev"
fi

# 2. The virtual environment.
if [ ! -x "$PY" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
mkdir -p "$LOG_DIR"

# 3. Python dependencies (build requirements of Horovod included).
if ! "$PY" -c "import torch, numpy, mpi4py, cmake, psutil, yaml, cloudpickle, packaging, wheel, tqdm, matplotlib, tensorboard, pytest, pytest_timeout" 2>/dev/null; then
    say "installing $TORCH_SPEC, numpy, mpi4py and Horovod's build requirements"
    logged pip-deps "$PY" -m pip install $TORCH_SPEC numpy mpi4py cmake setuptools wheel packaging psutil pyyaml cloudpickle pytest pytest-timeout tqdm matplotlib tensorboard
fi

# 4. Horovod 0.28.1 built with PyTorch, MPI and Gloo.
# Its CMake forces -std=c++14 but torch >= 2.1 headers need C++17: a compiler wrapper rewrites
# the flag (upstream fixed this on master but never released it: horovod issues 3996, 4014).
horovod_ok() {
    "$PY" - <<'PY' 2>/dev/null
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
PY
}
if ! horovod_ok; then
    say "building Horovod $HOROVOD_VERSION (about 5 minutes on 2 cores; log: $LOG_DIR/horovod-build.log)"
    WRAP="$VENV/cxx17"
    mkdir -p "$WRAP"
    cat >"$WRAP/c++" <<'WRAPPER'
#!/usr/bin/env bash
args=()
for a in "$@"; do
    case "$a" in -std=c++14|-std=c++11|-std=gnu++14|-std=gnu++11) a="-std=c++17" ;; esac
    args+=("$a")
done
exec /usr/bin/c++ "${args[@]}"
WRAPPER
    chmod +x "$WRAP/c++"
    # CMAKE_POLICY_VERSION_MINIMUM: CMake 4 refuses the old minimum in Horovod's bundled gloo.
    # --no-cache-dir: the built library's RUNPATH names the torch/lib of the venv that built it,
    # so a wheel cached from another checkout's venv would point at a folder that may be gone.
    logged horovod-build env PATH="$VENV/bin:$PATH" CXX="$WRAP/c++" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip install --no-build-isolation --no-cache-dir "horovod==$HOROVOD_VERSION"
    horovod_ok || fail "Horovod built but lacks MPI or Gloo; see $LOG_DIR/horovod-build.log"
fi

# 5. distrib itself, editable, with the distrib-launch console script.
if ! "$PY" -c "import distrib, launch" 2>/dev/null || [ ! -x "$VENV/bin/distrib-launch" ]; then
    say "installing distrib (editable)"
    logged pip-distrib "$PY" -m pip install --no-build-isolation --no-deps -e "$ROOT"
fi

# 6. Check the result the way a user would. horovodrun --check-build takes ~9 s (it probes every
# framework), so a passed check is remembered against the Horovod library it checked: a second
# set-up skips it in well under a second, and a rebuilt or replaced Horovod is checked again.
stamp="$VENV/.horovod-check-build-ok"
horovod_lib="$(ls "$VENV"/lib/python*/site-packages/horovod/torch/mpi_lib_v2*.so 2>/dev/null | head -n 1)"
fingerprint="$(stat -c '%n %s %Y' "$horovod_lib" 2>/dev/null || echo none)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ]; then
    check="$("$VENV/bin/horovodrun" --check-build 2>&1)" || fail "horovodrun --check-build failed: $check"
    for want in "\[X\] PyTorch" "\[X\] MPI" "\[X\] Gloo"; do
        echo "$check" | grep -q "$want" || fail "horovodrun --check-build lacks ${want//\\/}; rebuild with: rm -rf $VENV && make setup"
    done
    echo "$fingerprint" >"$stamp"
fi
say "ready: $("$PY" -c 'import torch, horovod; print("torch", torch.__version__, "horovod", horovod.__version__)')"
