#!/usr/bin/env bash
# Idempotent set-up: Open MPI, .venv with torch + Horovod (PyTorch, MPI, Gloo), distrib itself.
# A second run checks each step and skips what is already done, in seconds.
#
# GPU users: set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>")
# and HOROVOD_GPU_OPERATIONS=NCCL before the first run; the rest is the same. Horovod is then built
# from its source release, patched for current toolchains (CUDA 13 headers need C++17; GCC 13
# needs <cstdint>, <string>, <stdexcept> spelled out), against the NCCL of torch's own wheels
# (nvidia-nccl-cu*) unless HOROVOD_NCCL_HOME/HOROVOD_NCCL_INCLUDE say otherwise, for the compute
# capabilities of this machine's GPUs unless HOROVOD_BUILD_CUDA_CC_LIST is set. Without network:
# HOROVOD_SDIST=/path/to/horovod-0.28.1.tar.gz, and PIP_FIND_LINKS=<folder> PIP_NO_INDEX=1 for the
# cffi and pycparser wheels (scripts/gpu_check.sh --fetch DIR downloads all three).
#
# DISTRIB_SETUP=horovod: only Horovod (built when missing) in an existing environment: no Open MPI
# from apt, no test tools, no editable install (scripts/gpu_check.sh uses it). DISTRIB_WITHOUT_MPI=1
# builds Horovod with Gloo only (no Open MPI needed; the launcher then uses Gloo).
#
# An environment you already have (a cluster module, a conda env, a container):
# DISTRIB_PYTHON=/path/to/python uses that interpreter instead of creating .venv. Its torch is
# never replaced, and its Horovod is kept (not rebuilt) when `horovodrun --check-build` lists
# PyTorch and at least one controller (MPI or Gloo): sites often build Horovod against their own
# MPI only, and the launcher picks whichever controller is there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
HOROVOD_VERSION="0.28.1"

say() { echo "[bootstrap] $*"; }
fail() { echo "[bootstrap] error: $*" >&2; exit 1; }

SETUP_PARTS="${DISTRIB_SETUP:-all}"
case "$SETUP_PARTS" in all|horovod) ;; *) fail "DISTRIB_SETUP=$SETUP_PARTS is not one of all, horovod" ;; esac
WITH_MPI=1
if [ "${DISTRIB_WITHOUT_MPI:-}" = 1 ]; then WITH_MPI=0; fi
GPU_BUILD=""
if [ -n "${HOROVOD_GPU_OPERATIONS:-}${HOROVOD_GPU_ALLREDUCE:-}" ]; then GPU_BUILD=1; fi

if [ -n "${DISTRIB_PYTHON:-}" ]; then
    PY="$DISTRIB_PYTHON"
    "$PY" -c "import sys; assert sys.version_info >= (3, 9)" 2>/dev/null ||
        fail "DISTRIB_PYTHON=$DISTRIB_PYTHON is not a Python 3.9+ interpreter; give the path of your environment's python"
    PREFIX="$("$PY" -c "import sys; print(sys.prefix)")"
    # Logs and the remembered check live in .venv when that is the environment, else beside the checkout
    # (an environment you brought may be read-only).
    if [ "$PREFIX" = "$(cd "$VENV" 2>/dev/null && pwd -P)" ]; then STATE="$VENV"; else STATE="$ROOT/.setup"; fi
else
    PY="$VENV/bin/python"
    STATE="$VENV"
fi
BIN="$(dirname "$PY")"
LOG_DIR="$STATE/logs"

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
if [ "$WITH_MPI" = 1 ] && { ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; }; then
    say "installing Debian's openmpi-bin libopenmpi-dev"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    mkdir -p "$LOG_DIR" 2>/dev/null || true
    logged apt-openmpi bash -c "$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y openmpi-bin libopenmpi-dev"
fi

# 2. The virtual environment (not with DISTRIB_PYTHON: that environment exists).
if [ ! -x "$PY" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
mkdir -p "$LOG_DIR"

# 3. Python dependencies: distrib's requirements and extras (pyproject.toml), the test tools and
# Horovod's build requirements. A torch that is already there stays: it may be the site's CUDA build.
# Presence is checked by name (find_spec runs none of them): importing them all took seconds.
if [ "$SETUP_PARTS" = horovod ]; then
    "$PY" -c "import torch" 2>/dev/null || fail "DISTRIB_SETUP=horovod needs torch in $PY; install it first"
elif ! "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in 'torch numpy mpi4py cmake psutil yaml cloudpickle packaging wheel tqdm matplotlib tensorboard onnx onnxscript onnxruntime pytest pytest_timeout build pdoc'.split()))" 2>/dev/null; then
    TORCH_REQ="$TORCH_SPEC"
    if "$PY" -c "import torch" 2>/dev/null; then TORCH_REQ=""; fi
    say "installing ${TORCH_REQ:+$TORCH_REQ, }numpy, mpi4py, the test tools and Horovod's build requirements"
    logged pip-deps "$PY" -m pip install $TORCH_REQ numpy mpi4py cmake setuptools wheel packaging psutil pyyaml cloudpickle pytest pytest-timeout tqdm matplotlib tensorboard onnx onnxscript onnxruntime build pdoc
fi

# What `horovodrun --check-build` marks [X] for this environment's Horovod among PyTorch and the
# controllers: e.g. "PyTorch MPI Gloo"; empty when there is no Horovod with PyTorch support. The
# check takes ~9 s (it probes every framework), so its answer is remembered against the Horovod
# library and the torch it came from: a second set-up reuses it in well under a second, and a
# rebuilt Horovod or a replaced torch is checked again. horovodrun's own entry point is called
# through $PY, so no other environment's horovodrun on PATH can answer for this one.
horovod_built() {
    local fingerprint stamp="$STATE/.horovod-check-build" check
    fingerprint="$("$PY" - <<'PY' 2>/dev/null
import glob, importlib.util, os
def where(package, *parts):  # the file, its size and time; no import (a site's torch may have no metadata)
    path = os.path.join(os.path.dirname(importlib.util.find_spec(package).origin), *parts)
    path = glob.glob(path)[0]
    return f"{path} {os.stat(path).st_size} {int(os.stat(path).st_mtime)}"
print(where("horovod", "torch", "mpi_lib_v2*.so"), where("torch", "version.py"))
PY
)" || return 0
    if [ "$(head -n 1 "$stamp" 2>/dev/null)" = "$fingerprint" ]; then
        tail -n +2 "$stamp"
        return 0
    fi
    check="$("$PY" -c "import sys; from horovod.runner.launch import run_commandline; sys.argv[0] = 'horovodrun'; sys.exit(run_commandline())" --check-build 2>&1)" || return 0
    local built
    built="$(echo "$check" | awk '/^Available /{section=$2} /\[X\]/ && ((section == "Frameworks:" && $2 == "PyTorch") || section == "Controllers:" || (section == "Tensor" && $2 == "NCCL")) {printf "%s%s", sep, $2; sep=" "}')"
    printf '%s\n%s\n' "$fingerprint" "$built" >"$stamp"
    echo "$built"
}
has() { [[ " $built " == *" $1 "* ]]; }

# 4. Horovod with PyTorch. Our own .venv gets 0.28.1 built with PyTorch, MPI and Gloo (the tests
# use both controllers); an environment given by DISTRIB_PYTHON keeps any Horovod that has PyTorch
# and one controller. A GPU build (HOROVOD_GPU_OPERATIONS) also needs the NCCL tensor operations.
horovod_usable() {
    has PyTorch || return 1
    if [ -n "$GPU_BUILD" ]; then has NCCL || return 1; fi
    if [ -n "${DISTRIB_PYTHON:-}" ]; then has MPI || has Gloo; return; fi
    has Gloo && { [ "$WITH_MPI" = 0 ] || has MPI; }
}

# For a GPU build: nvcc, NCCL, the GPUs' compute capabilities, cffi, and Horovod's source release
# patched for CUDA 13 (its CMake asks nvcc for C++11). Adds to BUILD_ENV; sets SOURCE.
prepare_gpu_build() {
    local cuda_home="${CUDA_HOME:-/usr/local/cuda}" nccl cc_list sdist
    if ! command -v nvcc >/dev/null; then
        [ -x "$cuda_home/bin/nvcc" ] || fail "HOROVOD_GPU_OPERATIONS is set but there is no nvcc (not on PATH, not in $cuda_home/bin); install the CUDA toolkit or set CUDA_HOME"
        BUILD_ENV+=(PATH="$BIN:$cuda_home/bin:$PATH" CUDA_HOME="$cuda_home")
    fi
    if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}" ]; then
        nccl="$("$PY" -c "import importlib.util as u; print(list(u.find_spec('nvidia.nccl').submodule_search_locations)[0])" 2>/dev/null)" ||
            fail "HOROVOD_GPU_OPERATIONS: no NCCL in $PY (torch's CUDA wheels bring nvidia-nccl-cu*); set HOROVOD_NCCL_HOME to an NCCL install"
        [ -f "$nccl/include/nccl.h" ] && [ -e "$nccl/lib/libnccl.so.2" ] ||
            fail "the NCCL of torch's wheel at $nccl has no include/nccl.h or lib/libnccl.so.2; set HOROVOD_NCCL_HOME to an NCCL install"
        # The wheel ships only libnccl.so.2; Horovod's CMake looks for libnccl.so.
        mkdir -p "$STATE/nccl-lib"
        ln -sf "$nccl/lib/libnccl.so.2" "$STATE/nccl-lib/libnccl.so"
        BUILD_ENV+=(HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$STATE/nccl-lib" HOROVOD_NCCL_LINK=SHARED
                    LD_LIBRARY_PATH="$nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
    fi
    if [ -z "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ]; then
        cc_list="$("$PY" -c "import torch; print(','.join(sorted({'%d%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))" 2>/dev/null || true)"
        if [ -n "$cc_list" ]; then BUILD_ENV+=(HOROVOD_BUILD_CUDA_CC_LIST="$cc_list"); fi
    fi
    # cffi is a build requirement of Horovod's PyTorch part (setup.py), not installed by torch.
    "$PY" -c "import cffi" 2>/dev/null || logged pip-cffi "$PY" -m pip install cffi
    sdist="${HOROVOD_SDIST:-$STATE/horovod-sdist/horovod-$HOROVOD_VERSION.tar.gz}"
    if [ ! -f "$sdist" ]; then
        [ -z "${HOROVOD_SDIST:-}" ] || fail "HOROVOD_SDIST=$HOROVOD_SDIST is not a file; give the path of horovod-$HOROVOD_VERSION.tar.gz"
        logged horovod-download "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation \
            -d "$STATE/horovod-sdist" "horovod==$HOROVOD_VERSION"
    fi
    SOURCE="$STATE/horovod-src"
    rm -rf "$SOURCE"
    mkdir -p "$SOURCE"
    tar xzf "$sdist" -C "$SOURCE" --strip-components=1 || fail "cannot unpack $sdist"
    sed -i 's/^set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$SOURCE/horovod/common/ops/cuda/CMakeLists.txt"
    grep -q '^set(CMAKE_CUDA_STANDARD 17)' "$SOURCE/horovod/common/ops/cuda/CMakeLists.txt" ||
        fail "$sdist: horovod/common/ops/cuda/CMakeLists.txt does not set CMAKE_CUDA_STANDARD as 0.28.1 does"
}

built="$(horovod_built)"
if horovod_usable; then
    say "keeping the Horovod of $PY: horovodrun --check-build lists ${built// /, }; not rebuilding it"
else
    # Its CMake forces -std=c++14 but torch >= 2.1 headers need C++17: a compiler wrapper rewrites
    # the flag (upstream fixed this on master but never released it: horovod issues 3996, 4014).
    say "building Horovod $HOROVOD_VERSION (horovodrun --check-build lists: ${built:-no Horovod with PyTorch}; about 5 minutes on 2 cores; log: $LOG_DIR/horovod-build.log)"
    WRAP="$STATE/cxx17"
    mkdir -p "$WRAP"
    cat >"$WRAP/c++" <<'WRAPPER'
#!/usr/bin/env bash
args=()
extra=()
for a in "$@"; do
    case "$a" in
        -std=c++14|-std=c++11|-std=gnu++14|-std=gnu++11) a="-std=c++17" ;;
        # GCC 13's headers no longer include these transitively (horovod/common/group_table.h,
        # common.h); only for Horovod's own .cc files: CMake's compiler checks and nvcc's steps
        # stay as they are.
        *.cc) extra=(-include cstdint -include string -include stdexcept) ;;
    esac
    args+=("$a")
done
exec /usr/bin/c++ "${extra[@]}" "${args[@]}"
WRAPPER
    chmod +x "$WRAP/c++"
    # CMAKE_POLICY_VERSION_MINIMUM: CMake 4 refuses the old minimum in Horovod's bundled gloo.
    # --no-cache-dir: the built library's RUNPATH names the torch/lib of the venv that built it,
    # so a wheel cached from another checkout's venv would point at a folder that may be gone.
    # --force-reinstall --no-deps: a Horovod 0.28.1 that is there but lacks a part is rebuilt, not
    # "already satisfied" (its own requirements came in step 3).
    BUILD_ENV=(PATH="$BIN:$PATH" CXX="$WRAP/c++" CMAKE_POLICY_VERSION_MINIMUM=3.5
               HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
               HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)")
    if [ "$WITH_MPI" = 1 ]; then BUILD_ENV+=(HOROVOD_WITH_MPI=1); else BUILD_ENV+=(HOROVOD_WITHOUT_MPI=1); fi
    SOURCE="horovod==$HOROVOD_VERSION"
    if [ -n "$GPU_BUILD" ]; then prepare_gpu_build; fi
    logged horovod-build env "${BUILD_ENV[@]}" \
        "$PY" -m pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps "$SOURCE"
    built="$(horovod_built)"
    horovod_usable ||
        fail "Horovod built but horovodrun --check-build lists only: ${built:-nothing}; see $LOG_DIR/horovod-build.log"
fi

if [ "$SETUP_PARTS" = horovod ]; then
    say "ready: Horovod of $PY lists ${built// /, }"
    exit 0
fi

# 5. distrib itself, editable, with the distrib-launch console script; then the whole imports.
versions() {
    "$PY" -c 'import torch, horovod, distrib, launch; print("torch", torch.__version__, "horovod", horovod.__version__, "distrib", distrib.__version__)' 2>&1
}
if ! got="$(versions)" || [ ! -x "$BIN/distrib-launch" ]; then
    say "installing distrib (editable)"
    logged pip-distrib "$PY" -m pip install --no-build-isolation --no-deps -e "$ROOT"
    got="$(versions)" || fail "torch, Horovod or distrib does not import in $PY: $(echo "$got" | tail -n 1)"
fi
say "ready: $got"
