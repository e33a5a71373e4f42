#!/usr/bin/env bash
# The kmod test layer (CTest label `kmod`): boots Debian's own kernel, the
# one that matches the installed headers, in QEMU with a busybox initramfs,
# loads dsvm.ko, runs tests/kmod/dsvm_selftest.c, unloads the module, and
# reads the verdict from the serial log as an exact line.
#
#   tests/kmod/run.sh
#
# Fails on: a build error or warning, a "not ok" case, insmod or rmmod
# failing, any BUG/WARNING/Oops/panic in the guest's log (the guest also
# runs with panic_on_warn=1 and oops=panic), no verdict before the timeout.
# Prints "SKIP: <reason>" and exits 0 when it cannot run here (not root and
# packages missing, packages or the kernel image not installable); CTest
# shows that as skipped (SKIP_REGULAR_EXPRESSION in CMakeLists.txt).
#
# Environment:
#   DSVM_KMOD_TIMEOUT  seconds for the guest (default 420; it runs 140-160 s
#                      on two cores without KVM)
#   DSVM_KMOD_CACHE    where the kernel image is kept between runs
#                      (default ${XDG_CACHE_HOME:-~/.cache}/dsvm/kmod)
#   DSVM_KMOD_WORK     build outputs (default build-kmod/ in the repository)
#   DSVM_KMOD_KEEP_LOG print the whole serial log even on success (1)
#   DSVM_KMOD_BUILD    the CMake build whose node integration tests run in
#                      the guest with the kmod backend (default build/ in the
#                      repository; CTest passes its own; when unset and
#                      build/ has no tests, that part is left out with a note)
# Facts behind the choices: ../shared/notes/kernel-vm.md; docs/KMOD.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${DSVM_KMOD_WORK:-$ROOT/build-kmod}
CACHE=${DSVM_KMOD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dsvm/kmod}
TIMEOUT=${DSVM_KMOD_TIMEOUT:-420}
VERDICT_LINE="DSVM-KMOD-VERDICT: PASS"

start=$(date +%s.%N)
phase_start=$start
timings=()

skip() { echo "SKIP: $*"; exit 0; }
fail() { echo "FAIL: kmod: $*" >&2; exit 1; }
phase() {
  local now
  now=$(date +%s.%N)
  timings+=("$1 $(awk -v a="$phase_start" -v b="$now" 'BEGIN { printf "%.1f", b - a }')s")
  phase_start=$now
}
elapsed() { awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(uname -m)" = x86_64 ] || skip "the kmod layer needs an x86_64 host"

# 1. Packages: headers, QEMU, busybox, compiler (idempotent, as root).
if ! bash "$ROOT/deploy/install-kmod-deps.sh"; then
  skip "kmod packages missing and not installable here (deploy/install-kmod-deps.sh, as root)"
fi
phase deps

# 2. The kernel: Debian's image of exactly the installed headers' version.
KDIR=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
[ -n "$KDIR" ] || skip "no Debian kernel headers under /usr/src"
KVER=${KDIR#/usr/src/linux-headers-}
HDRVER=$(dpkg-query -W -f='${Version}' "linux-headers-$KVER")
IMGDIR="$CACHE/$KVER-$HDRVER"
cold=warm
if [ ! -s "$IMGDIR/vmlinuz" ]; then
  cold=cold
  mkdir -p "$IMGDIR"
  dl=$(mktemp -d "$IMGDIR/dl.XXXXXX")
  if ! (cd "$dl" && apt-get download -q "linux-image-$KVER=$HDRVER" >/dev/null 2>&1); then
    # The package lists may be missing or stale on a fresh machine.
    if [ "$(id -u)" -eq 0 ]; then
      apt-get update -qq >/dev/null 2>&1 || true
    fi
    (cd "$dl" && apt-get download -q "linux-image-$KVER=$HDRVER" >/dev/null 2>&1) || {
      rm -rf "$dl"
      skip "cannot download linux-image-$KVER=$HDRVER"
    }
  fi
  dpkg-deb --fsys-tarfile "$dl"/linux-image-*.deb |
    tar -x -O "./boot/vmlinuz-$KVER" > "$dl/vmlinuz"
  [ -s "$dl/vmlinuz" ] || fail "no /boot/vmlinuz-$KVER in linux-image-$KVER=$HDRVER"
  # The uncompressed ELF vmlinux boots through PVH and saves the guest the
  # xz decompression (seconds under TCG); the bzImage stays as a fallback.
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$dl/vmlinuz" | head -1 | cut -d: -f1 || true)
  # (Through a file: in a pipe, tail dies of SIGPIPE when xz stops at the
  # end of the stream, and pipefail turns that into a failure.)
  if [ -n "$off" ] &&
     tail -c +$((off + 1)) "$dl/vmlinuz" > "$dl/payload.xz" &&
     xz -dcq --single-stream "$dl/payload.xz" > "$dl/vmlinux" 2>/dev/null &&
     [ "$(head -c 4 "$dl/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
    mv "$dl/vmlinux" "$IMGDIR/vmlinux"
  fi
  mv "$dl/vmlinuz" "$IMGDIR/vmlinuz"
  rm -rf "$dl"
fi
KERNEL="$IMGDIR/vmlinuz"
[ -s "$IMGDIR/vmlinux" ] && KERNEL="$IMGDIR/vmlinux"
phase "kernel($cold)"

# 3. The module, built out of the source tree, warnings as errors.
rm -rf "$WORK/kmod"
mkdir -p "$WORK/kmod"
# Sources only: objects of an in-tree `make -C kmod` must not leak in.
cp "$ROOT"/kmod/Kbuild "$ROOT"/kmod/Makefile "$ROOT"/kmod/*.[ch] "$WORK/kmod/"
cp -r "$ROOT/kmod/uapi" "$WORK/kmod/uapi"
make -s -C "$WORK/kmod" KDIR="$KDIR" KCFLAGS=-Werror > "$WORK/kmod-build.log" 2>&1 || {
  cat "$WORK/kmod-build.log" >&2
  fail "dsvm.ko does not build"
}
grep -v "Skipping BTF generation" "$WORK/kmod-build.log" || true
modinfo=$(command -v modinfo || echo /sbin/modinfo)
vermagic=$("$modinfo" -F vermagic "$WORK/kmod/dsvm.ko" | awk '{ print $1 }')
[ "$vermagic" = "$KVER" ] || fail "dsvm.ko vermagic '$vermagic' is not the image's $KVER"
if [ "$KERNEL" = "$IMGDIR/vmlinux" ]; then
  banner=$(LC_ALL=C grep -a -m1 -o "Linux version $KVER [^%]*Debian $HDRVER" "$KERNEL" | head -1 || true)
  [ -n "$banner" ] || fail "the cached image is not linux $KVER $HDRVER"
fi
phase module

# 4. The selftest, static: the guest has no libc.
gcc -static -O2 -g -Wall -Wextra -Werror -Wno-unused-parameter \
  -Wno-missing-field-initializers -pthread -I "$ROOT/kmod/uapi" \
  -o "$WORK/dsvm_selftest" "$ROOT/tests/kmod/dsvm_selftest.c" || fail "dsvm_selftest does not build"
# The node daemon's kmod backend against the module, static too.
g++ -std=c++20 -static -O2 -g -Wall -Wextra -Werror -Wno-unused-parameter \
  -Wno-missing-field-initializers -pthread -I "$ROOT" -o "$WORK/dsvm_kmod_backend_test" \
  "$ROOT/tests/kmod/kmod_backend_test.cc" "$ROOT/node/fault/kmod_backend.cc" \
  "$ROOT/node/fault/kmod_client.cc" "$ROOT/node/fault/fd_passing.cc" "$ROOT/node/memory/page_store.cc" \
  "$ROOT/node/memory/page_views.cc" \
  "$ROOT/proto/status.cc" "$ROOT/proto/log.cc" || fail "kmod_backend_test does not build"
# The local fault bench (bench/kmod_fault.cc): figures only, never a verdict.
g++ -std=c++20 -static -O2 -Wall -Wextra -Werror -Wno-missing-field-initializers -pthread \
  -I "$ROOT" -o "$WORK/dsvm-bench-kmod" "$ROOT/bench/kmod_fault.cc" "$ROOT/bench/kmod_fault_main.cc" ||
  fail "dsvm-bench-kmod does not build"
phase selftest

# 5. The initramfs: busybox, the module, the selftest, /init.
initrd="$WORK/initramfs"
rm -rf "$initrd"
mkdir -p "$initrd"/{bin,dev,proc,sys,tmp}
cp /bin/busybox "$initrd/bin/busybox"
# Only the applets /init uses (one symlink each; linking all ~400 costs a
# second of forks).
for applet in sh mount mkdir uname insmod rmmod dmesg sed grep cat ls ip poweroff; do
  ln -s busybox "$initrd/bin/$applet"
done
cp "$WORK/kmod/dsvm.ko" "$WORK/dsvm_selftest" "$WORK/dsvm_kmod_backend_test" "$WORK/dsvm-bench-kmod" \
  "$initrd/"

# The data path's integration tests (tests/integration/node_daemon_test.cc:
# a coordinator process, three node daemons, client processes) with the
# kmod backend: the binaries of the CMake build at their own paths (the test
# finds the coordinator and dsvmctl there), without debug info, and the
# shared libraries they load.
BUILD=${DSVM_KMOD_BUILD:-$ROOT/build}
it_tests=("$BUILD/tests/integration/dsvm_node_integration_tests"
          "$BUILD/tests/integration/dsvm_gpu_map_integration_tests")
it_bins=("${it_tests[@]}" "$BUILD/coordinator/dsvm-coordinator"
         "$BUILD/client/dsvmctl" "$BUILD/node/dsvm-node" "$BUILD/bench/dsvm-bench")
it_missing=0
for bin in "${it_bins[@]}"; do [ -x "$bin" ] || it_missing=1; done
if [ "$it_missing" = 1 ]; then
  [ -z "${DSVM_KMOD_BUILD:-}" ] || fail "no node integration tests in $BUILD (build it first)"
  echo "kmod: no build in $BUILD: the integration tests are left out of the guest"
else
  add_elf() {  # FILE: into the initramfs at its own path, with its libraries
    mkdir -p "$initrd$(dirname "$1")"
    strip --strip-debug -o "$initrd$1" "$1"
    local lib
    for lib in $(ldd "$1" | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
      [ -e "$initrd$lib" ] && continue
      mkdir -p "$initrd$(dirname "$lib")"
      cp -L "$lib" "$initrd$lib"
    done
  }
  for bin in "${it_bins[@]}"; do add_elf "$bin"; done
  printf '%s\n' "${it_tests[@]}" > "$initrd/integration-tests"
  echo "$BUILD/bench/dsvm-bench" > "$initrd/bench"
fi
cat > "$initrd/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
verdict=PASS
echo "dsvm-kmod: guest $(uname -r) up"
if insmod /dsvm.ko; then
  if ! /dsvm_selftest; then
    echo "dsvm-kmod: selftest failed"
    verdict=FAIL
  fi
  if ! /dsvm_kmod_backend_test; then
    echo "dsvm-kmod: kmod backend test failed"
    verdict=FAIL
  fi
  if [ -s /integration-tests ]; then
    # Loopback for UCX's tcp transport; shared memory for its other parts.
    ip link set lo up
    mkdir -p /dev/shm
    mount -t tmpfs tmpfs /dev/shm
    # The emulated guest is ten times slower (twenty under a parallel
    # ctest): requests are resent after 3 s (then backing off), not 100 ms,
    # and a node is declared dead after 30 s of silence, not 3 s, since a
    # daemon busy copying 2 MiB pages there misses heartbeats.
    # The node tests, then the GPU-map tests (emulated GPUs) on the module.
    { rc=0
      for t in $(cat /integration-tests); do
        DSVM_TEST_FAULT_BACKEND=kmod DSVM_TEST_RETRANSMIT_MS=3000 DSVM_TEST_DEAD_AFTER_MS=30000 \
          "$t" --gtest_brief=1 || rc=1
      done
      echo $rc > /tmp/integration.rc; } 2>&1 | sed 's/^/integration: /'
    if [ "$(cat /tmp/integration.rc)" = 0 ]; then
      echo "dsvm-kmod: integration tests with the kmod backend passed"
    else
      echo "dsvm-kmod: integration tests with the kmod backend failed"
      verdict=FAIL
    fi
  fi
  if [ -s /bench ]; then
    # dsvm-node processes (the kmod backend by default here), a coordinator
    # and client processes: every value read is checked; its figures, from
    # an emulated machine, are not kept.
    { "$(cat /bench)" fault-latency --quick; echo $? > /tmp/cluster.rc; } 2>&1 |
      sed 's/^/cluster: /'
    if [ "$(cat /tmp/cluster.rc)" = 0 ]; then
      echo "dsvm-kmod: dsvm-bench fault-latency --quick with dsvm-node processes passed"
    else
      echo "dsvm-kmod: dsvm-bench fault-latency --quick with dsvm-node processes failed"
      verdict=FAIL
    fi
    "$(cat /bench)" fault-latency --backend=kmod | sed 's/^/bench: /' ||
      echo "dsvm-kmod: the bench did not run"
  else
    /dsvm-bench-kmod | sed 's/^/bench: /' || echo "dsvm-kmod: the bench did not run"
  fi
  if rmmod dsvm; then
    echo "dsvm-kmod: rmmod ok"
  else
    echo "dsvm-kmod: rmmod failed"
    verdict=FAIL
  fi
else
  echo "dsvm-kmod: insmod failed"
  verdict=FAIL
fi
echo "dsvm-kmod: dmesg follows"
dmesg | sed 's/^/dmesg: /'
if dmesg | grep -qE 'BUG|WARNING|Oops|Call Trace|Kernel panic|refcount_t|Bad page'; then
  echo "dsvm-kmod: kernel log shows a bug"
  verdict=FAIL
fi
echo "DSVM-KMOD-VERDICT: $verdict"
poweroff -f
EOF
chmod +x "$initrd/init"
(cd "$initrd" && find . | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null) > "$WORK/initramfs.cpio"
phase initramfs

# 6. Boot. KVM only where the CPU shows VMX/SVM: elsewhere /dev/kvm may be a
# paravirtual hypervisor under which a stock kernel crawls.
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then
  accel=(-accel kvm -cpu host)
else
  accel=(-accel tcg,thread=multi -cpu max)
fi
log="$WORK/serial.log"
rm -f "$log"
rc=0
timeout "$TIMEOUT" qemu-system-x86_64 "${accel[@]}" -machine q35 -smp 2 -m 1536M \
  -nodefaults -display none -no-reboot \
  -serial "file:$log" \
  -kernel "$KERNEL" -initrd "$WORK/initramfs.cpio" \
  -append "console=ttyS0 panic=-1 oops=panic panic_on_warn=1 quiet loglevel=4 rdinit=/init" \
  < /dev/null > "$WORK/qemu.log" 2>&1 || rc=$?
phase boot+test

tr -d '\r' < "$log" > "$log.txt" 2>/dev/null || true
show_log() {
  {
    echo "---- guest: failed cases and status (whole log: $log.txt) ----"
    grep -E '^not ok|^dsvm-kmod:|^DSVM-KMOD-VERDICT' "$log.txt" || true
    echo "---- guest: kernel log since the module loaded ----"
    sed -n '/dsvm: loading\|dsvm: \/dev\/dsvm ready/,$p' "$log.txt" | grep '^dmesg: ' | tail -n 60 || true
    echo "---- guest: console, last 60 lines ----"
    grep -v '^dmesg: ' "$log.txt" | tail -n 60 || true
    echo "---- qemu ----"
    cat "$WORK/qemu.log" || true
  } >&2
}
summary="kernel $KVER ($HDRVER), ${accel[1]}, $cold image, total $(elapsed)s: ${timings[*]}"

[ "$rc" -ne 124 ] || { show_log; fail "guest timed out after ${TIMEOUT}s ($summary)"; }
grep -E '^(not )?ok [0-9]+ - |^# |^1\.\.|^dsvm-kmod: (rmmod|integration|dsvm-bench)|^integration: \[ *(PASSED|FAILED|SKIPPED)' \
  "$log.txt" || true
if grep -nE 'BUG:|WARNING:|Oops|Call Trace|Kernel panic|refcount_t:|Bad page' "$log.txt" >&2; then
  show_log
  fail "the guest kernel reported a bug ($summary)"
fi
if ! grep -qx "$VERDICT_LINE" "$log.txt"; then
  show_log
  fail "no '$VERDICT_LINE' line (qemu exit $rc) ($summary)"
fi
[ "${DSVM_KMOD_KEEP_LOG:-0}" != 1 ] || cat "$log.txt"
# The guest's fault bench, as JSON lines (docs/PERFORMANCE.md, "dsvm.ko").
sed -n 's/^bench: //p' "$log.txt"
echo "PASS: kmod: $summary"
