#!/usr/bin/env bash
# The main job (README's first command). Installs what is missing, builds,
# and shows what dsvm runs today:
#   1. a coordinator on 127.0.0.1 with its RocksDB directory;
#   2. regions placed in the cluster-wide window (same address on every node);
#   3. two nodes driving the directory through the real coordinator
#      (write ping-pong over 4096 pages, every grant checked);
#   4. kill -9 of the coordinator and a restart on the same data: the regions
#      and the directory come back;
#   5. the protocol simulator under loss, reordering, duplication and crashes.
# Everything is torn down on exit, also when interrupted. The MPI job over a
# shared dsvm array arrives with the node daemon (issue #3).
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
cmake --build build -j"$(nproc)" --target dsvm-coordinator dsvmctl dsvm-bench dsvm-sim

work=$(mktemp -d /tmp/dsvm-demo-XXXXXX)
coord_pid=""
stop_coordinator() {
  if [ -n "$coord_pid" ]; then
    kill "$1" "$coord_pid" 2> /dev/null || true
    wait "$coord_pid" 2> /dev/null || true
    coord_pid=""
  fi
}
cleanup() {
  stop_coordinator -TERM
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "demo: interrupted"; exit 130' INT TERM

start_coordinator() {
  rm -f "$work/port"
  build/coordinator/dsvm-coordinator --data-dir "$work/data" --listen 127.0.0.1:0 \
    --port-file "$work/port" 2>> "$work/coordinator.log" &
  coord_pid=$!
  for _ in $(seq 100); do
    [ -s "$work/port" ] && break
    sleep 0.1
  done
  if [ ! -s "$work/port" ]; then
    echo "demo: the coordinator did not start:" >&2
    tail -5 "$work/coordinator.log" >&2
    exit 1
  fi
  DSVM_COORDINATOR="127.0.0.1:$(cat "$work/port")"
  export DSVM_COORDINATOR
  echo "coordinator pid $coord_pid on $DSVM_COORDINATOR"
}
ctl() { build/client/dsvmctl "$@"; }

echo "== 1. a coordinator on 127.0.0.1"
start_coordinator

echo "== 2. regions in the cluster-wide window"
ctl region create embeddings 1G 2M
ctl region create activations 256M
ctl region create bad/name 4K || echo "(refused, as it should be)"

echo "== 3. two nodes drive the directory through the coordinator"
build/bench/dsvm-bench directory --quick --coordinator "$DSVM_COORDINATOR"

echo "== 4. kill -9 of the coordinator, restart on the same data"
before=$(ctl region show embeddings; ctl region show activations)
stop_coordinator -KILL
start_coordinator
after=$(ctl region show embeddings; ctl region show activations)
echo "$after"
if [ "$before" != "$after" ]; then
  echo "demo: FAILED: regions differ after the restart" >&2
  exit 1
fi
echo "regions identical after kill -9 and restart"

echo "== 5. the protocol under loss, reordering, duplication and crashes"
build/tests/sim/dsvm-sim --random 50

echo "== demo done"
