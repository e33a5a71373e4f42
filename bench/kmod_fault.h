// The local fault bench of dsvm.ko (issue #4): a page fault resolved inside
// the module on a page the node holds (a "local hit", read of a Shared page
// and write of a Modified one) against a native anonymous page fault and
// against the userfaultfd backend's local minor fault, all in one run.
//
// Needs dsvm.ko loaded (/dev/dsvm) and userfaultfd: in the QEMU guest of
// tests/kmod/run.sh, which runs `dsvm-bench fault-latency --backend=kmod`
// from the build, or the static `dsvm-bench-kmod` (kmod_fault_main.cc)
// where there is no build. Prints JSON lines {"name", "value", "unit"} on
// stdout (docs/PERFORMANCE.md), progress and errors on stderr.
#ifndef DSVM_BENCH_KMOD_FAULT_H_
#define DSVM_BENCH_KMOD_FAULT_H_

#include <cstdint>

namespace dsvm::bench {

// Runs each series over `pages` pages (1..2^20). Returns the exit code: 0,
// 1 when a path cannot be measured, 2 for a bad page count.
int RunKmodFaultBench(uint64_t pages);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_KMOD_FAULT_H_
