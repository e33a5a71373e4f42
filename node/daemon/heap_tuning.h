// The node daemon's heap, tuned for page traffic.
//
// Pages of 4 KiB and 64 KiB travel in batches (PageBatch, up to 1 MiB) sent
// as eager active messages. UCX's tcp transport reassembles such a message
// in a buffer it mallocs, and the daemon frees it once the batch's pages
// are installed. glibc serves an allocation of that size with a fresh
// mmap, or, once its dynamic threshold has risen past it, from the top of
// the heap, which it trims again as soon as more than twice that is free.
// Either way every batch's buffer was faulted in, zeroed and charged page
// by page: a third of the receiving daemon's CPU time in a 64 KiB scan
// (docs/PERFORMANCE.md, Scan, "Stop 22").
//
// TuneHeap keeps buffers of up to kMmapThreshold in the heap and lets up to
// kTrimThreshold of freed memory stay there, so the next batch reuses
// pages already resident. What that keeps after a burst of traffic goes
// back to the kernel once the daemon has moved no bytes for a while
// (IdleTrim).
#ifndef DSVM_NODE_DAEMON_HEAP_TUNING_H_
#define DSVM_NODE_DAEMON_HEAP_TUNING_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsvm::node {

// Allocations up to this size come from the heap (a batch of 1 MiB, a
// 2 MiB page, with room for UCX's headers).
inline constexpr size_t kMmapThreshold = 4u << 20;
// Free memory the heap may keep at its top before it gives it back.
inline constexpr size_t kTrimThreshold = 64u << 20;

// Sets glibc's mmap and trim thresholds to the values above for this
// process. Changes nothing, and says so in the returned text, when
// GLIBC_TUNABLES already sets a malloc tunable (the operator's choice
// wins) or glibc refuses a value. Returns what was done, for the log.
std::string TuneHeap();

// When to give the heap's free memory back: once no page bytes have moved
// for kIdleMs after some did. Pure: the daemon feeds it its byte counters
// and the time, and calls malloc_trim when Due says so.
class IdleTrim {
 public:
  static constexpr uint64_t kIdleMs = 1000;
  // `moved`: bytes sent and received so far (only grows). True at most
  // once per quiet spell, and only after traffic.
  bool Due(uint64_t moved, uint64_t now_ms);

 private:
  uint64_t mark_ = 0;        // `moved` when it last changed
  uint64_t changed_ms_ = 0;  // when it last changed
  bool untrimmed_ = false;   // traffic since the last trim
};

// Gives free heap memory back to the kernel (malloc_trim). Returns whether
// any was.
bool TrimHeap();

}  // namespace dsvm::node

#endif  // DSVM_NODE_DAEMON_HEAP_TUNING_H_
