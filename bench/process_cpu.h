// CPU time of a process: what a benchmark charges to the processes that
// did the work of its timed part. Bandwidth on a small, shared machine
// depends on how the scheduler interleaves them; CPU seconds per byte do
// not, and say what more cores could buy.
#ifndef DSVM_BENCH_PROCESS_CPU_H_
#define DSVM_BENCH_PROCESS_CPU_H_

#include <sys/types.h>

namespace dsvm::bench {

// User plus system CPU seconds process `pid` (every thread) has used so
// far, from its CPU-time clock (clock_getcpuclockid: nanoseconds, not the
// 10 ms ticks of /proc/PID/stat); a negative value when it cannot be read
// (the process is gone).
double ProcessCpuSeconds(pid_t pid);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_PROCESS_CPU_H_
