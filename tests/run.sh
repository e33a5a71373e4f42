#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, and runs every
# test layer that can run on this machine. CI (.ci/run) runs exactly this.
#
#   tests/run.sh                 everything that can run here
#   DSVM_FUZZ_SECONDS=60 tests/run.sh   longer fuzzing (default 10 s a target)
#
# Layers (CTest labels): unit, sim, integration, kmod (dsvm.ko in a QEMU
# guest), netns (the cluster across network namespaces joined by veth; root),
# fuzz, and unit, sim and integration again under ASan+UBSan; then the
# README's first command, deploy/demo.sh, as a smoke test (root). The gpu
# label (the cuda device backend on a real GPU) is not run here: CI machines
# have none; `ctest -L gpu` on a machine with one. The kmod and netns stages
# skip themselves with a message where they cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh
# The kmod stage's packages (kernel headers, QEMU, busybox); without root the
# stage skips itself with a message.
bash deploy/install-kmod-deps.sh || echo "tests/run.sh: kmod packages not installed; the kmod stage will skip"

jobs=$(nproc)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$jobs"

# Fuzz each decoder for a bounded time (built with clang in build-fuzz).
DSVM_FUZZ_SECONDS="${DSVM_FUZZ_SECONDS:-10}" bash tests/fuzz/run.sh

# The same tests, and a shorter simulation, under AddressSanitizer and
# UndefinedBehaviorSanitizer (the coordinator processes of the integration
# tests included). DSVM_SKIP_SANITIZERS=1 skips this stage.
if [ "${DSVM_SKIP_SANITIZERS:-0}" != 1 ]; then
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DDSVM_SANITIZE=address,undefined
  cmake --build build-asan -j"$jobs" --target dsvm_unit_tests dsvm_integration_tests \
    dsvm-coordinator dsvm-node dsvm-sim dsvm-bench dsvm_node_integration_tests
  export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
  ctest --test-dir build-asan -L 'unit|integration' --output-on-failure -j"$jobs"
  build-asan/tests/sim/dsvm-sim --seeds 1-40
  build-asan/tests/sim/dsvm-sim --random 20
  unset UBSAN_OPTIONS
fi

# The README's first command, as a smoke test: the MPI job over dsvm must pass
# its own check against one process. Root only (mpirun as root, userfaultfd);
# DSVM_SKIP_DEMO=1 skips it.
if [ "${DSVM_SKIP_DEMO:-0}" != 1 ] && [ "$(id -u)" -eq 0 ]; then
  if DSVM_BUILD_DIR=build bash deploy/demo.sh > build/demo.log 2>&1; then
    echo "tests/run.sh: deploy/demo.sh passed (its output: build/demo.log)"
  else
    tail -40 build/demo.log
    echo "tests/run.sh: deploy/demo.sh failed" >&2
    exit 1
  fi
fi

# Last, so its summary closes the output.
ctest --test-dir build -L 'unit|sim|integration|kmod|netns' --output-on-failure -j"$jobs"
