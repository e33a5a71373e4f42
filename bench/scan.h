// `dsvm-bench scan` (issue #3): a sequential read of a region whose pages
// another node holds, in GB/s, against raw UCX bandwidth in the same run.
//
// Real processes, as in fault-latency: a dsvm-coordinator and two dsvm-node
// daemons (nodes A and B) on 127.0.0.1, and client processes that use
// libdsvm (dsvm.h). Per UCX_TLS value, on a fresh cluster:
//
//   raw_ucx     the floor (scan_floor.h): two processes moving the same
//               number of bytes with plain UCX tag messages;
//   then per variant, on a region of its own, created and filled by a
//   writer process on node A (dsvm_prefetch for writing, then the pattern
//   of scan_pattern.h, with a seed of the variant's), and read by a reader
//   process on node B that is timed:
//   fault       a plain read of every 8-byte word in order: every page is a
//               remote read fault;
//   prefetch    dsvm_prefetch of the whole region, then the same read;
//   readmostly  dsvm_advise(DSVM_ADVICE_READ_MOSTLY), then the same read.
//
// The reader checks the checksum of everything it read (a wrong byte fails
// the run, naming the first wrong offset) and that its node fetched every
// page from node A during the timed part (dsvm_stats); it then closes and
// destroys the region. After the fault variant it also times a second read
// of the same pages, valid on its node by then (local_reread): the speed of
// the read loop itself.
#ifndef DSVM_BENCH_SCAN_H_
#define DSVM_BENCH_SCAN_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "proto/status.h"

namespace dsvm::bench {

struct ScanOptions {
  uint64_t bytes = uint64_t{1} << 30;  // per variant, and per raw UCX pass
  uint64_t fault_bytes = 0;            // the fault variant's size; 0: bytes
  size_t page_size = 4096;             // 4096, 65536 or 2097152
  // One fresh cluster and floor per entry, each run with UCX_TLS set to it
  // and UCX_NET_DEVICES=lo (../shared/notes/ucx.md, pitfalls 5 and 6).
  std::vector<std::string> transports = {"tcp"};
  std::string node_binary;         // empty: DefaultNodeBinary()
  std::string coordinator_binary;  // empty: DefaultCoordinatorBinary()
  int child_timeout_s = 600;       // per client process; a hung fault fails the run
  int raw_passes = 3;              // timed passes of the floor; the best one counts
  // --busy-poll-us for the coordinator and the daemons (0: they sleep when
  // idle). dsvm metric names then carry ".poll" after the transport.
  uint32_t busy_poll_us = 0;
  int64_t fault_poll_us = -1;  // --fault-poll-us of the daemons; negative: their default
  // --zero-copy of the daemons (auto, on, off); empty: their default. dsvm
  // metric names then carry ".zc_<mode>".
  std::string zero_copy;
};

// Runs everything and emits the metrics (names in docs/PERFORMANCE.md).
// Sets *skipped and returns OK, after saying why on stderr, when
// userfaultfd cannot be used here as dsvm-node needs it. Errors:
// kInvalidArgument (options), kNotFound (a binary is missing), kInternal
// (a wrong byte, a page not fetched, a client, daemon or floor failed),
// kUnavailable (a process did not start, or a client hung), kIoError.
Status RunScan(const ScanOptions& options, bool* skipped);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_SCAN_H_
