#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, and runs every
# test layer that can run on this machine. CI (.ci/run) runs exactly this.
#
#   tests/run.sh                 everything that can run here
#   DSVM_FUZZ_SECONDS=60 tests/run.sh   longer fuzzing (default 10 s a target)
#
# Layers (CTest labels): unit, sim, integration, fuzz. netns, kmod and gpu
# arrive with issues #3, #4 and #5.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh

jobs=$(nproc)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$jobs"

# Fuzz each decoder for a bounded time (built with clang in build-fuzz).
DSVM_FUZZ_SECONDS="${DSVM_FUZZ_SECONDS:-10}" bash tests/fuzz/run.sh

# Last, so its summary closes the output.
ctest --test-dir build -L 'unit|sim|integration' --output-on-failure -j"$jobs"
