// The node daemon's heap, tuned for page traffic.
//
// Pages of 4 KiB and 64 KiB travel in batches (PageBatch, up to 1 MiB) sent
// as eager active messages. UCX's tcp transport reassembles such a message
// in a buffer it mallocs, and the daemon frees it once the batch's pages
// are installed. glibc serves an allocation of that size with a fresh
// mmap, or, once its dynamic threshold has risen past it, from the top of
// the heap, which it trims again whenever more than twice that is free
// there (several batches freed together). So most batches' buffers were
// faulted in, zeroed and charged page by page: a third of the receiving
// daemon's CPU time in a 64 KiB scan, and 470 000 page faults in 12 s of
// it against 6 500 after this (docs/PERFORMANCE.md, Scan, "Stop 22").
//
// TuneHeap keeps buffers under kMmapThreshold in the heap and lets up to
// kTrimThreshold of freed memory stay at its top, so the next batch reuses
// pages already resident. The thresholds hold for every arena (the GPU
// tier's copy threads have their own), each of which may keep that much.
// What they keep after a burst of traffic goes back to the kernel once the
// daemon has moved no page bytes for a second (IdleTrim): malloc_trim, on
// the daemon's loop, which also releases free memory inside the heaps.
#ifndef DSVM_NODE_DAEMON_HEAP_TUNING_H_
#define DSVM_NODE_DAEMON_HEAP_TUNING_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsvm::node {

// Allocations under this size come from the heap (a batch of 1 MiB, a
// 2 MiB page, with room for UCX's headers).
inline constexpr size_t kMmapThreshold = 4u << 20;
// Free memory the heap may keep at its top before it gives it back.
inline constexpr size_t kTrimThreshold = 64u << 20;

// Sets glibc's mmap and trim thresholds to the values above for this
// process. Changes nothing, and says so in the returned text, when the
// environment sets either threshold (GLIBC_TUNABLES, or the older
// MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_: the operator's choice
// wins) or the allocator refuses (a sanitizer's does). Returns what was
// done, for the log.
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
