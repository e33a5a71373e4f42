#include "node/daemon/heap_tuning.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

namespace dsvm::node {

std::string TuneHeap() {
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables != nullptr && std::strstr(tunables, "glibc.malloc.") != nullptr) {
    return "heap left as GLIBC_TUNABLES sets it";
  }
  // Setting either threshold turns glibc's dynamic thresholds off. Trim
  // first: should glibc refuse it, nothing has changed.
  if (mallopt(M_TRIM_THRESHOLD, static_cast<int>(kTrimThreshold)) != 1 ||
      mallopt(M_MMAP_THRESHOLD, static_cast<int>(kMmapThreshold)) != 1) {
    return "glibc refused the heap thresholds; left as they were";
  }
  return "heap keeps buffers up to " + std::to_string(kMmapThreshold >> 20) + " MiB and " +
         std::to_string(kTrimThreshold >> 20) + " MiB free between batches";
}

bool IdleTrim::Due(uint64_t moved, uint64_t now_ms) {
  if (moved != mark_) {
    mark_ = moved;
    changed_ms_ = now_ms;
    untrimmed_ = true;
    return false;
  }
  if (!untrimmed_ || now_ms - changed_ms_ < kIdleMs) return false;
  untrimmed_ = false;
  return true;
}

bool TrimHeap() { return malloc_trim(0) == 1; }

}  // namespace dsvm::node
