#!/usr/bin/env bash
# The main job (README's first command). Installs what is missing, builds,
# and runs a dsvm cluster on 127.0.0.1:
#   1. a coordinator and three dsvm-node daemons sharing a cluster secret;
#   2. an MPI job (Debian's OpenMPI, 3 ranks, one per node daemon): a Jacobi
#      stencil whose two grids live in one dsvm region mapped at the same
#      address in every rank; halo rows move between the nodes as pages,
#      a dsvm barrier in the region separates the iterations, and rank 0
#      checks the result bit for bit against the same computation in one
#      process;
#   3. the cluster as the coordinator sees it (dsvmctl);
#   4. kill -9 of the coordinator, a restart on the same data and port: the
#      daemons rejoin and the job runs again.
# Everything is torn down on exit, also when interrupted. Exits non-zero when
# any step fails. DSVM_BUILD_DIR chooses the build directory (default build).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${DSVM_BUILD_DIR:-build}
nodes=3
job_timeout=120 # seconds; the job takes about one on two cores

bash deploy/install-deps.sh
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
cmake --build "$build" -j"$(nproc)" --target dsvm-coordinator dsvm-node dsvmctl jacobi_mpi

work=$(mktemp -d /tmp/dsvm-demo-XXXXXX)
coord_pid=""
node_pids=()
job_pid=""
# Everything this script starts runs in a session of its own (setsid), so a
# Ctrl-C reaches only the script, whose trap stops the rest newest first: the
# job, the daemons, the coordinator. A rank whose daemon went first would die
# of SIGSEGV (dsvm.h, "The daemon's death").
#
# stop SIGNAL PID: sends SIGNAL, then SIGKILL when PID still lives after 5 s.
stop() {
  kill "$1" "$2" 2> /dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$2" 2> /dev/null || break
    sleep 0.1
  done
  kill -KILL "$2" 2> /dev/null || true
  wait "$2" 2> /dev/null || true
}
stop_coordinator() {
  [ -z "$coord_pid" ] || stop "$1" "$coord_pid"
  coord_pid=""
}
stop_all() {
  # mpirun stops its ranks (within about a second) before it exits.
  [ -z "$job_pid" ] || stop -TERM "$job_pid"
  job_pid=""
  for pid in "${node_pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  for pid in "${node_pids[@]}"; do stop -TERM "$pid"; done
  node_pids=()
  stop_coordinator -TERM
}
cleanup() {
  trap '' INT TERM # a second Ctrl-C does not cut the teardown short
  stop_all
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "demo: interrupted" >&2; exit 130' INT
trap 'echo "demo: terminated" >&2; exit 143' TERM

fail() {
  echo "demo: FAILED: $1" >&2
  shift
  for log in "$@"; do
    echo "--- last lines of $(basename "$log"):" >&2
    tail -8 "$log" >&2 || true
  done
  exit 1
}

# Waits up to 10 s for file $1 to exist while process $2 lives.
wait_for() {
  for _ in $(seq 100); do
    [ -e "$1" ] && return 0
    kill -0 "$2" 2> /dev/null || return 1
    sleep 0.1
  done
  return 1
}

# Starts the coordinator on the data in $work/data; $1 is the address to
# listen on (port 0 picks one, written to $work/port).
start_coordinator() {
  rm -f "$work/port"
  setsid "$build"/coordinator/dsvm-coordinator --data-dir "$work/data" --listen "$1" \
    --port-file "$work/port" 2>> "$work/coordinator.log" &
  coord_pid=$!
  wait_for "$work/port" "$coord_pid" && [ -s "$work/port" ] ||
    fail "the coordinator did not start" "$work/coordinator.log"
  DSVM_COORDINATOR="127.0.0.1:$(cat "$work/port")"
  export DSVM_COORDINATOR
  echo "coordinator (pid $coord_pid) on $DSVM_COORDINATOR"
}

start_node() {
  local k=$1
  setsid "$build"/node/dsvm-node --coordinator "$DSVM_COORDINATOR" --listen 127.0.0.1:0 \
    --socket "$work/node$k.sock" 2>> "$work/node$k.log" &
  node_pids+=($!)
  wait_for "$work/node$k.sock" "$!" || fail "dsvm-node $k did not start" "$work/node$k.log"
  echo "dsvm-node (pid $!) joined, serving $work/node$k.sock"
}

ctl() { "$build"/client/dsvmctl "$@" || fail "dsvmctl $* exited with status $?"; }

# Runs the MPI job: rank r connects to $work/node<r>.sock. In the background
# and waited for, so that an interrupt reaches the trap at once.
run_job() {
  local mpi_env=()
  if [ "$(id -u)" -eq 0 ]; then
    mpi_env=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
  fi
  # Shared memory between the ranks (btl self,vader), the launcher on
  # loopback; no binding, so the ranks and the daemons share both cores.
  # mpirun --timeout stops a job that hangs.
  env "${mpi_env[@]}" setsid mpirun -np "$nodes" --oversubscribe --bind-to none \
    --mca btl self,vader --mca oob_tcp_if_include lo --timeout "$job_timeout" \
    "$build"/examples/jacobi_mpi --socket-dir "$work" "$@" &
  job_pid=$!
  local rc=0
  wait "$job_pid" || rc=$?
  job_pid=""
  if [ "$rc" -ne 0 ]; then
    local logs=("$work/coordinator.log")
    for k in $(seq 0 $((nodes - 1))); do logs+=("$work/node$k.log"); done
    fail "the MPI job exited with status $rc" "${logs[@]}"
  fi
}

echo "== 1. a coordinator and $nodes node daemons on 127.0.0.1"
# One secret for the whole cluster: every connection to the coordinator and
# between nodes proves it (dsvm-coordinator, dsvm-node and dsvmctl read it).
bash deploy/make-secret.sh "$work/secret"
export DSVM_SECRET_FILE="$work/secret"
start_coordinator 127.0.0.1:0
for k in $(seq 0 $((nodes - 1))); do start_node "$k"; done

echo
echo "== 2. MPI job: Jacobi on $nodes ranks, one per node daemon, grids in one dsvm region"
echo "(a grid row is one 4 KiB page; each rank writes its block of rows and reads the"
echo " rows next to it straight from the region, so those pages move between the nodes"
echo " every iteration; a dsvm barrier in page 0 separates the iterations; MPI only"
echo " launches the ranks, tells them when the region exists and gathers the results)"
start_ms=$(date +%s%3N)
run_job --region jacobi --keep
echo "the job took $(($(date +%s%3N) - start_ms)) ms, mpirun's start and end included"

echo
echo "== 3. the cluster as the coordinator sees it"
sleep 1 # the daemons report their counters with each heartbeat (0.5 s)
ctl nodes
ctl regions
# Page 0 holds the dsvm barrier, which every node read last; the first row
# of rank 1 (grid 0, row 171) was written by node 2 in the last iteration,
# then read by rank 0's check.
base=$(ctl region show jacobi | sed -n 's/.* base=\(0x[0-9a-f]*\) .*/\1/p')
[ -n "$base" ] || fail "dsvmctl region show jacobi printed no base address"
ctl page "$base"
ctl page "$(printf '0x%x' $((base + 4096 + 171 * 4096)))"

echo
echo "== 4. kill -9 of the coordinator, restart on the same data and port"
port=$(cat "$work/port")
before=$(ctl regions)
stop_coordinator -KILL
start_coordinator "127.0.0.1:$port"
live=0
for _ in $(seq 100); do
  live=$("$build"/client/dsvmctl nodes 2> /dev/null | grep -c ' live ' || true)
  [ "$live" -eq "$nodes" ] && break
  sleep 0.1
done
[ "$live" -eq "$nodes" ] || fail "the daemons did not rejoin the restarted coordinator" \
  "$work/coordinator.log" "$work/node0.log"
ctl nodes | grep '^node'
after=$(ctl regions)
echo "$after"
[ "$before" = "$after" ] || fail "the regions differ after the restart"
echo "the $nodes daemons rejoined and the regions are as before; the job again, on a new region:"
run_job --region jacobi2

echo
echo "== demo done"
