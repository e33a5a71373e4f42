#!/usr/bin/env bash
# Runs every check that needs the GPU machine, from the kit that
# tests/gpu/make-kit.sh packed into .kit/: in one call of the device tool,
#
#   run(command="bash tests/gpu/run-kit.sh", carry=[".kit"], timeout_s=540)
#
# Steps, each under its own time limit, each logged; a failing step does not
# stop the next ones:
#   facts       the GPU, the kernel, the CPUs, userfaultfd, missing libraries
#   gpu_tests   the device backend suite on the cuda backend (ctest -L gpu)
#   bench_gpu*  dsvm-bench gpu --backend cuda: migration against cudaMemcpy
#               (2 MiB pages, 256 MiB and 1 GiB, the default copy threads
#               and one; 64 KiB and 4 KiB pages; each with direct copies
#               and staged) and the oversubscribed gather against zero-copy
#               and a staging loop (#5's targets), with direct copies and
#               (bench_gpu_staged) without
#   bench_gpu_6threads, _8threads  the cuda migration with more copy threads
#   bench_gpu_reuse  the oversubscribed gather with 8x the lookups per batch
#   emulated_*  the same migration on the emulated backend, 1 and 4 copy
#               threads (the copy threads' scaling on many cores)
#   example     examples/embedding_gather with its CUDA kernel against a
#               coordinator and a dsvm-node --device-backend cuda whose budget
#               is a third of the table, plain and --pipeline
#   fault_*     dsvm-bench fault-latency on many cores, fault polling off and
#               on (#3's latency target)
#   scan_*      dsvm-bench scan of 1 GiB, 4 KiB and 64 KiB pages (#3's
#               bandwidth target)
# Results, in $OUT (else ./kit-out): summary.txt (one line per step: name,
# exit status, seconds), results.jsonl (every JSON line the steps printed,
# each tagged with its step), logs.tar.gz (every step's whole output).
#
# DSVM_KIT_STEPS="gpu_tests bench_gpu" runs only the steps named.
set -uo pipefail
cd "$(dirname "$0")/../.."

kit=$PWD/.kit
out=${OUT:-$PWD/kit-out}
mkdir -p "$out"
logs=$(mktemp -d /tmp/dsvm-kit.XXXXXX)
if [ ! -x "$kit/build/node/dsvm-node" ]; then
  echo "run-kit: no kit in $kit: run tests/gpu/make-kit.sh here and carry .kit" | tee "$out/summary.txt"
  exit 1
fi
export LD_LIBRARY_PATH="$kit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export UCX_MODULE_DIR="$kit/lib/ucx"
b=$kit/build
kit_tmp=$logs
export kit b kit_tmp
: > "$out/summary.txt"
: > "$out/results.jsonl"
failed=0

# The whole kit stops starting steps after DSVM_KIT_SECONDS (default 500),
# and cuts each step's limit to what is left: the device call must return
# within its own limit with everything in $OUT.
deadline=$(($(date +%s) + ${DSVM_KIT_SECONDS:-500}))

wanted() { [ -z "${DSVM_KIT_STEPS:-}" ] || [[ " $DSVM_KIT_STEPS " == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: runs COMMAND with its output in NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local t0 rc
  t0=$(date +%s)
  if [ $((deadline - t0)) -lt 15 ]; then
    echo "$name skipped: the kit's time is spent" | tee -a "$out/summary.txt"
    failed=1
    return 0
  fi
  [ "$limit" -gt $((deadline - t0)) ] && limit=$((deadline - t0))
  echo "run-kit: $name ..."
  # Through bash, so that a step may be a function of this script (exported).
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" > "$logs/$name.log" 2>&1
  rc=$?
  local line
  line="$name rc=$rc $(($(date +%s) - t0))s"
  [ "$rc" -eq 124 ] && line="$line (timed out after ${limit}s)"
  echo "$line" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || { failed=1; tail -15 "$logs/$name.log" | sed "s/^/  $name| /"; }
  grep -E '^\{"name"' "$logs/$name.log" | sed "s/^{/{\"step\":\"$name\",/" >> "$out/results.jsonl"
  return 0
}

facts() {
  echo "kit: $(tr '\n' ';' < "$kit/VERSION")"
  echo "kernel: $(uname -r); cpus: $(nproc); memory: $(free -g | awk '/Mem:/{print $2}') GiB"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
    echo "nvidia-smi: none"
  echo "vm.unprivileged_userfaultfd=$(cat /proc/sys/vm/unprivileged_userfaultfd 2> /dev/null || echo '?')"
  local missing
  missing=$(for f in "$b"/*/dsvm-* "$b"/examples/* "$b"/tests/gpu/*; do ldd "$f"; done 2>&1 |
            grep 'not found' | sort -u)
  echo "missing libraries: ${missing:-none}"
}
export -f facts
step facts 30 facts

# A skip for want of a GPU or driver is a failure here: this machine has
# one. (Hugetlb pages may be missing: without root their test skips, as
# the output says.)
gpu_tests() {
  # With hugetlb pages reserved where the kit may (root), so that
  # cudaHostRegister of a hugetlb memfd runs too.
  bash tests/unit/with-hugetlb.sh "$b/tests/gpu/dsvm_gpu_tests" > "$kit_tmp/gpu_tests.out" 2>&1
  local rc=$?
  cat "$kit_tmp/gpu_tests.out"
  ! grep -q '^SKIP: no GPU' "$kit_tmp/gpu_tests.out" && return "$rc"
  return 1
}
export -f gpu_tests
step gpu_tests 120 gpu_tests

step bench_gpu 240 "$b/bench/dsvm-bench" gpu --backend cuda

# The example against its own coordinator and a cuda daemon.
example() {
  local work pids=() rc=0
  work=$(mktemp -d /tmp/dsvm-kit-example.XXXXXX)
  (umask 077; { od -An -v -tx1 -N32 /dev/urandom | tr -d ' \n'; echo; } > "$work/secret")
  export DSVM_SECRET_FILE="$work/secret"
  "$b/coordinator/dsvm-coordinator" --data-dir "$work/data" --listen 127.0.0.1:0 \
    --port-file "$work/port" 2> "$work/coordinator.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.1; done
  # Budget 256 MiB, table 768 MiB (3x): 3 M rows of 64 floats.
  "$b/node/dsvm-node" --coordinator "127.0.0.1:$(cat "$work/port")" --listen 127.0.0.1:0 \
    --socket "$work/node.sock" --device-backend cuda --gpu-budget 256M 2> "$work/node.log" &
  pids+=($!)
  for _ in $(seq 100); do
    [ -S "$work/node.sock" ] || ! kill -0 "${pids[1]}" 2> /dev/null && break
    sleep 0.1
  done
  local args=(--socket "$work/node.sock" --rows 3145728 --dim 64 --chunk 64M --page-size 2097152
              --batches 4 --kernel cuda)
  "$b/examples/embedding_gather" "${args[@]}" --region kit-plain || rc=$?
  "$b/examples/embedding_gather" "${args[@]}" --region kit-pipelined --pipeline || rc=$?
  kill "${pids[@]}" 2> /dev/null
  wait
  echo "--- dsvm-node log"; tail -30 "$work/node.log"
  echo "--- coordinator log"; tail -10 "$work/coordinator.log"
  rm -rf "$work"
  return "$rc"
}
export -f example
step example 150 example

# In order of what the issues need most, since the kit's deadline may cut
# the last steps: 1 GiB migration (#5's target), then #3 on many cores,
# then the variants.
# 1 GiB each way: a 256 MiB copy takes about 5 ms on PCIe 5, too short to time.
step bench_gpu_1g 60 "$b/bench/dsvm-bench" gpu --backend cuda --skip-oversub --size 1G
# #3 on many cores: fault polling on (the default at 4 or more CPUs) with
# busy polling of the network, and off (the default below 4). The first
# runs a cluster without direct reads and one with them (--direct-reads
# both, the default); the second only with them.
step fault_fpoll100 150 "$b/bench/dsvm-bench" fault-latency --tls tcp --fault-poll-us 100 \
  --busy-poll-us 50
step scan_4k 150 "$b/bench/dsvm-bench" scan --tls tcp --size 1073741824 --fault-poll-us 100 \
  --busy-poll-us 50
# The oversubscribed gather with the daemon's copies all staged (before
# direct copies), against bench_gpu's.
step bench_gpu_staged 120 "$b/bench/dsvm-bench" gpu --backend cuda --skip-migration \
  --direct-copies off
# Migration staged by one thread (the baseline of the copy threads), and
# with smaller pages.
step bench_gpu_1thread 60 "$b/bench/dsvm-bench" gpu --backend cuda --skip-oversub --size 1G \
  --copy-threads 1
step bench_gpu_64k 60 "$b/bench/dsvm-bench" gpu --backend cuda --skip-oversub --page-size 65536 \
  --size 1G
step fault_fpoll0 90 "$b/bench/dsvm-bench" fault-latency --tls tcp --fault-poll-us 0 \
  --direct-reads on
step scan_64k 120 "$b/bench/dsvm-bench" scan --tls tcp --size 1073741824 --page-size 65536 \
  --fault-poll-us 100 --busy-poll-us 50
step bench_gpu_4k 90 "$b/bench/dsvm-bench" gpu --backend cuda --skip-oversub --page-size 4096
# The copy threads' scaling past the default on 16 cores.
step bench_gpu_6threads 60 "$b/bench/dsvm-bench" gpu --backend cuda --skip-oversub --size 1G \
  --copy-threads 6
step bench_gpu_8threads 60 "$b/bench/dsvm-bench" gpu --backend cuda --skip-oversub --size 1G \
  --copy-threads 8
# The oversubscribed gather with 8x the lookups per batch (a reuse of 2.7
# instead of 0.33): where each byte moved is read more than once in HBM.
step bench_gpu_reuse 120 "$b/bench/dsvm-bench" gpu --backend cuda --skip-migration --bags 65536
# The copy threads on 16 cores without the GPU: the emulated backend's
# "device" copies are host memcpy too (2 vCPUs here cannot show them).
step emulated_1thread 60 "$b/bench/dsvm-bench" gpu --backend emulated --skip-oversub \
  --copy-threads 1
step emulated_4threads 60 "$b/bench/dsvm-bench" gpu --backend emulated --skip-oversub \
  --copy-threads 4

tar -C "$logs" -czf "$out/logs.tar.gz" .
rm -rf "$logs"
echo "run-kit: done; $(grep -c . "$out/results.jsonl") JSON lines in results.jsonl"
cat "$out/summary.txt"
exit "$failed"
