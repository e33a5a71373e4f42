// How `dsvm-bench fault-latency` times one access and what the pages hold.
// The dsvm path and the hand-made floor use these same helpers, so their
// figures differ only by what serves the fault.
#ifndef DSVM_BENCH_FAULT_TIMING_H_
#define DSVM_BENCH_FAULT_TIMING_H_

#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace dsvm::bench {

inline constexpr size_t kFaultPageSize = 4096;
inline constexpr size_t kWordsPerPage = kFaultPageSize / sizeof(uint64_t);

inline uint64_t MonotonicNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

// One load, timed with CLOCK_MONOTONIC on either side. The compiler
// barriers keep the load between the two clock reads; the fault, if any,
// is taken by the load itself.
inline uint64_t TimedLoad(const void* at, double* micros) {
  asm volatile("" ::: "memory");
  const uint64_t t0 = MonotonicNs();
  asm volatile("" ::: "memory");
  const uint64_t v = *static_cast<const volatile uint64_t*>(at);
  asm volatile("" ::: "memory");
  const uint64_t t1 = MonotonicNs();
  *micros = static_cast<double>(t1 - t0) / 1000.0;
  return v;
}

inline void TimedStore(void* at, uint64_t value, double* micros) {
  asm volatile("" ::: "memory");
  const uint64_t t0 = MonotonicNs();
  asm volatile("" ::: "memory");
  *static_cast<volatile uint64_t*>(at) = value;
  asm volatile("" ::: "memory");
  const uint64_t t1 = MonotonicNs();
  *micros = static_cast<double>(t1 - t0) / 1000.0;
}

// The value of word `word` of page `page` as its first writer leaves it:
// every word of every page differs, so a page delivered to the wrong
// address, a stale copy or a torn page is caught.
inline uint64_t PatternWord(uint64_t page, uint64_t word) {
  return ((page + 1) * 0x9E3779B97F4A7C15ull) ^ (word * 0xD1B54A32D192ED03ull) ^ 0x5A5A;
}

// The value a second writer stores in word 0 of `page`.
inline uint64_t OverwriteWord(uint64_t page) { return ~PatternWord(page, 0) ^ 0xC0FFEE; }

// The q-quantile (0 <= q <= 1; 0: the minimum) by the nearest-rank method: the smallest
// sample with at least q of all samples at or below it. `v` is sorted here.
inline double Quantile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size())));
  rank = std::clamp<size_t>(rank, 1, v.size());
  return v[rank - 1];
}

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_FAULT_TIMING_H_
