// What every dsvm-bench subcommand prints: one JSON object per line on
// stdout, {"name": …, "value": …, "unit": …}, and nothing else there.
// Progress, notes and errors go to stderr, so stdout can be piped into a
// tracker unchanged.
#ifndef DSVM_BENCH_BENCH_OUTPUT_H_
#define DSVM_BENCH_BENCH_OUTPUT_H_

#include <chrono>
#include <string_view>

namespace dsvm::bench {

// Prints one metric line and flushes it. `name` and `unit` must be plain
// printable ASCII without quotes or backslashes (they are ours, not input);
// `value` must be finite.
void EmitMetric(std::string_view name, double value, std::string_view unit);

using Clock = std::chrono::steady_clock;

inline double SecondsBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_BENCH_OUTPUT_H_
