#!/usr/bin/env bash
# Packs what the GPU machine runs into .kit/ (ignored by git), so that one
# call of the device tool does every check that needs a GPU or many cores:
#
#   bash tests/gpu/make-kit.sh          here (builds build-kit/, writes .kit/)
#   bash tests/gpu/run-kit.sh           there, with .kit carried
#
# The GPU machine has CUDA and CMake but no UCX, RocksDB, Boost or
# GoogleTest, and nothing can be fetched there, so the kit holds stripped
# binaries in their build tree's layout (dsvm-bench finds dsvm-node and
# dsvm-coordinator beside it, as in a build), every shared library they load
# but glibc's own, and UCX's transport modules (UCX_MODULE_DIR). The cuda
# device backend and the example's kernel are built for Hopper (sm_90, with
# PTX for later GPUs): the machines lent here are H100 and H200.
#
# Environment: DSVM_KIT_BUILD (default build-kit), DSVM_KIT_DIR (default .kit).
set -euo pipefail
cd "$(dirname "$0")/../.."

build=${DSVM_KIT_BUILD:-build-kit}
kit=${DSVM_KIT_DIR:-.kit}
case "$kit" in /*) ;; *) kit="$PWD/$kit" ;; esac

command -v nvcc > /dev/null || [ -x /usr/local/cuda/bin/nvcc ] ||
  { echo "make-kit: no CUDA toolkit (nvcc) here; the kit needs the cuda backend" >&2; exit 1; }
export PATH="$PATH:/usr/local/cuda/bin"

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSVM_WITH_CUDA=ON \
  -DDSVM_EXAMPLE_CUDA_ARCHITECTURES=90
targets=(dsvm-coordinator dsvm-node dsvmctl dsvm-bench embedding_gather dsvm_gpu_tests)
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"

# Relative to the build tree; kept there in the kit.
bins=(coordinator/dsvm-coordinator node/dsvm-node client/dsvmctl bench/dsvm-bench
      examples/embedding_gather tests/gpu/dsvm_gpu_tests)

rm -rf "$kit"
mkdir -p "$kit/build" "$kit/lib/ucx"

# glibc's libraries come from the machine itself: they must match its loader.
is_glibc() {
  case "$(basename "$1")" in
    ld-linux*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*) return 0 ;;
  esac
  return 1
}
add_libs_of() {
  local lib
  for lib in $(ldd "$1" | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
    is_glibc "$lib" && continue
    [ -e "$kit/lib/$(basename "$lib")" ] && continue
    cp -L "$lib" "$kit/lib/"
    strip --strip-unneeded "$kit/lib/$(basename "$lib")" 2> /dev/null || true
  done
}

for rel in "${bins[@]}"; do
  mkdir -p "$kit/build/$(dirname "$rel")"
  strip --strip-all -o "$kit/build/$rel" "$build/$rel"
  add_libs_of "$build/$rel"
done

# UCX loads its transports (cma here; ib and rdmacm where verbs are) as
# modules from a directory compiled into it; UCX_MODULE_DIR points it at
# these. A module whose own libraries are missing is skipped by UCX.
ucx_modules=$(dirname "$(ldd "$build/node/dsvm-node" | grep -oE '/[^ ]+libucp\.so[^ ]*')")/ucx
for mod in "$ucx_modules"/*.so.0; do
  [ -e "$mod" ] || continue
  cp -L "$mod" "$kit/lib/ucx/"
  add_libs_of "$mod"
done

{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . || echo ' (with uncommitted changes)')"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "nvcc $(PATH="$PATH" nvcc --version | grep -oE 'release [0-9.]+' || echo '?')"
} > "$kit/VERSION"
cat "$kit/VERSION"
echo "make-kit: $(du -sh "$kit" | cut -f1) in $kit (the device tool carries at most 64 MiB with the tree)"
