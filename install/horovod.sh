#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (the last release) into the project's venv, CPU-only with gloo,
# against the torch already installed there. The sdist does not build against torch 2.1+ as
# released (see docs/cluster.md): three one-line changes make it build:
#   1. top-level CMakeLists.txt: C++14 -> C++17 (gloo's rendezvous store needs it);
#   2. horovod/torch/CMakeLists.txt: C++14 -> C++20 (torch 2.14's headers require C++20);
#   3. cmake/Modules/FindPytorch.cmake: a switch (MEDFOLD_HOROVOD_CPU_ONLY) that turns CUDA off
#      for a CPU build, since torch is a CUDA build and nvcc may be on the machine.
# The wheel is cached under .venv/horovod-wheel/, keyed by torch's version, so a rebuild of the
# venv with the same torch reinstalls in seconds. Checked with `horovodrun --check-build`.
# GPU clusters: set HOROVOD_GPU_OPERATIONS=NCCL and MEDFOLD_HOROVOD_CPU_ONLY=0 (not tested here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
VERSION=0.28.1
SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0

if "$PY" -c "import horovod.torch as hvd, sys; sys.exit(0 if hvd.gloo_built() else 1)" 2>/dev/null; then
    echo "horovod: already installed in $VENV"; exit 0
fi
TORCH=$("$PY" -c "import torch; print(torch.__version__)")
WHEELS="$VENV/horovod-wheel/torch-$TORCH"
if ! ls "$WHEELS"/horovod-$VERSION-*.whl >/dev/null 2>&1; then
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$BUILD"
    echo "$SHA256  $BUILD/horovod-$VERSION.tar.gz" | sha256sum -c --quiet
    tar -xzf "$BUILD/horovod-$VERSION.tar.gz" -C "$BUILD"
    SRC="$BUILD/horovod-$VERSION"
    sed -i 's/^set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt"
    sed -i 's/    set(CMAKE_CXX_STANDARD 14)/    set(CMAKE_CXX_STANDARD 20)/' "$SRC/horovod/torch/CMakeLists.txt"
    sed -i 's/^string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)/&\nif("$ENV{MEDFOLD_HOROVOD_CPU_ONLY}" STREQUAL "1")\n    set(Pytorch_CUDA FALSE)\nendif()/' \
        "$SRC/cmake/Modules/FindPytorch.cmake"
    grep -q 'set(CMAKE_CXX_STANDARD 17)' "$SRC/CMakeLists.txt"
    grep -q 'set(CMAKE_CXX_STANDARD 20)' "$SRC/horovod/torch/CMakeLists.txt"
    grep -q MEDFOLD_HOROVOD_CPU_ONLY "$SRC/cmake/Modules/FindPytorch.cmake"
    echo "horovod: building $VERSION against torch $TORCH (a few minutes)"
    # pip and wheel must be in the venv: the build runs without isolation, against its torch
    "$PY" -m pip install --quiet wheel >/dev/null
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_MPI=1 MEDFOLD_HOROVOD_CPU_ONLY=${MEDFOLD_HOROVOD_CPU_ONLY:-1} MAKEFLAGS=-j$(nproc) \
        "$PY" -m pip wheel --quiet --no-cache-dir --no-build-isolation --no-deps -w "$WHEELS" "$SRC"
fi
"$PY" -m pip install --quiet --no-deps "$WHEELS"/horovod-$VERSION-*.whl
"$PY" -m pip install --quiet cloudpickle psutil pyyaml packaging  # horovodrun's own needs
"$VENV/bin/horovodrun" --check-build
