#include "node/daemon/heap_tuning.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

namespace dsvm::node {

std::string TuneHeap() {
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if ((tunables != nullptr && (std::strstr(tunables, "glibc.malloc.mmap_threshold") != nullptr ||
                               std::strstr(tunables, "glibc.malloc.trim_threshold") != nullptr)) ||
      std::getenv("MALLOC_MMAP_THRESHOLD_") != nullptr ||
      std::getenv("MALLOC_TRIM_THRESHOLD_") != nullptr) {
    return "heap thresholds left as the environment sets them";
  }
  // Setting either threshold turns glibc's dynamic thresholds off. The mmap
  // one first: it is the one glibc may refuse (above half its heap size),
  // and then nothing has changed.
  if (mallopt(M_MMAP_THRESHOLD, static_cast<int>(kMmapThreshold)) != 1) {
    return "the allocator refused the heap thresholds (a sanitizer's?); left as they were";
  }
  if (mallopt(M_TRIM_THRESHOLD, static_cast<int>(kTrimThreshold)) != 1) {
    return "the allocator refused the trim threshold; buffers stay in the heap, trimmed as before";
  }
  return "heap keeps buffers under " + std::to_string(kMmapThreshold >> 20) + " MiB and " +
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
