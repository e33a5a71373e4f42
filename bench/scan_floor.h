// The floor `dsvm-bench scan` is measured against: how fast plain UCX moves
// the same number of bytes between two processes on this machine, with the
// same UCX_TLS and UCX_NET_DEVICES as the dsvm-node daemons of the run and
// no dsvm code on the path.
//
// The receiver (the calling process) listens on 127.0.0.1:0
// (ucp_listener); the sender, a forked process, connects to it by socket
// address, as dsvm-node peers connect, with the same endpoint error mode
// (UCP_ERR_HANDLING_MODE_PEER: on this UCX it gives up shared-memory lanes,
// ../shared/notes/ucx.md pitfall 4, so both paths use the same lanes).
// Per pass the receiver zeroes its buffer, posts a tag receive for every
// chunk, starts the clock and says "go"; the sender keeps `window` tag sends
// of `chunk` bytes in flight; the clock stops when the last chunk is in.
// Both busy-poll their workers. The receiver then checks every byte
// (scan_pattern.h), outside the timed part.
#ifndef DSVM_BENCH_SCAN_FLOOR_H_
#define DSVM_BENCH_SCAN_FLOOR_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "proto/status.h"

namespace dsvm::bench {

struct RawBandwidthOptions {
  uint64_t bytes = uint64_t{1} << 30;  // per pass; a multiple of 8
  size_t chunk = size_t{4} << 20;      // bytes per message (the last may be shorter)
  size_t window = 8;                   // sends in flight at once
  int warmup_passes = 1;               // not timed: connection and protocol setup
  int passes = 3;                      // timed
  uint64_t seed = 0;                   // of the pattern (scan_pattern.h)
};

// Runs the floor; `seconds` receives each timed pass's duration. Forks the
// sender and uses UCX: call it in a process of its own (RunForked), never
// in the benchmark's main process. Errors: kUnavailable (UCX could not
// start, listen or connect), kInternal (a wrong byte, a failed transfer or
// sender), kIoError.
Status MeasureRawBandwidth(const RawBandwidthOptions& options, std::vector<double>* seconds);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_SCAN_FLOOR_H_
