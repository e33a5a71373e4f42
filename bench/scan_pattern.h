// What `dsvm-bench scan` moves, and how the reader checks it. The dsvm
// variants and the raw UCX floor use the same helpers, so a wrong byte
// fails either the same way.
//
// Word i of a scanned buffer holds ScanWord(seed, i): every word differs
// from its neighbours and from the same word under another seed, so a
// misplaced page, a stale copy (an earlier run's seed) or a torn page
// changes the checksum. The checksum is Fletcher's, modulo 2^64: a = the sum
// of the words, b = the sum of the running a; a catches any wrong word, b
// (which weighs each word by its position) a permutation of right ones.
// Both are two additions per 8-byte word, far below the cost of moving it.
#ifndef DSVM_BENCH_SCAN_PATTERN_H_
#define DSVM_BENCH_SCAN_PATTERN_H_

#include <cstddef>
#include <cstdint>

namespace dsvm::bench {

// splitmix64 of (seed, i).
inline uint64_t ScanWord(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct ScanSum {
  uint64_t a = 0;
  uint64_t b = 0;
  bool operator==(const ScanSum&) const = default;
};

// Reads `n` words in order, 8 bytes at a time: the scan itself.
inline ScanSum SumWords(const uint64_t* words, size_t n) {
  ScanSum s;
  for (size_t i = 0; i < n; ++i) {
    s.a += words[i];
    s.b += s.a;
  }
  return s;
}

// What SumWords returns over n words written by FillWords(…, seed).
inline ScanSum ExpectedSum(uint64_t seed, size_t n) {
  ScanSum s;
  for (size_t i = 0; i < n; ++i) {
    s.a += ScanWord(seed, i);
    s.b += s.a;
  }
  return s;
}

// Writes words [first, first + n) of the pattern at `words`.
inline void FillWords(uint64_t* words, size_t n, uint64_t seed, uint64_t first = 0) {
  for (size_t i = 0; i < n; ++i) words[i] = ScanWord(seed, first + i);
}

// The index of the first word that is not the pattern's, or n: for the
// message when a checksum is wrong.
inline size_t FirstWrongWord(const uint64_t* words, size_t n, uint64_t seed) {
  for (size_t i = 0; i < n; ++i) {
    if (words[i] != ScanWord(seed, i)) return i;
  }
  return n;
}

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_SCAN_PATTERN_H_
