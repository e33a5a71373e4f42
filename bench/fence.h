// `dsvm-bench fence`: what a node's fence costs (proto/PROTOCOL.md,
// "Leases"). A node whose lease lapsed moves the bytes of every page its
// processes can reach out of the region's memfd (PageStore::RetainRange,
// which the uffd backend's UnmapRange calls), and must be done within the
// lease's margin, a quarter of the coordinator's deadline. Measured on one
// PageStore of `bytes` filled with a pattern, against the same run's
// baselines: Retain page by page (what a fence did before RetainRange),
// and the same reads into fresh memory without the punch (what any move
// out of the memfd must at least do). Every byte is checked after Restore
// and in the floor's copies, and the memfd must have holes where pages
// were retained. No client maps the store: the fence in a daemon also
// write-protects and clears clients' page tables, not measured here.
//
// Metrics (GB is 10^9 bytes): fence.retain_range.<tag>.gbps,
// fence.retain_each.<tag>.gbps, fence.copy_floor.<tag>.gbps,
// fence.retain_range.<tag>.vs_retain_each and .vs_copy_floor (ratios of
// the rates), fence.retain_range.<tag>.ms_per_gib and fence.<tag>.bytes;
// <tag> is page4k, page64k or page2m.
//
// Then, unless `store_only`, the fence as a dsvm-node does it: a
// coordinator and one daemon, whose client process creates a region of
// `bytes`, writes every page (mapped writable in its page tables) and
// stays. The coordinator is stopped (SIGSTOP) until the node's lease
// lapses and it fences: its log says how many pages each fence took and in
// how long (an early fence, for a node that holds much, and the one at the
// lapse). The coordinator goes on (SIGCONT) and a second process reads
// every page back, checked. Metrics: fence.daemon.<tag>.gbps (the pages
// the fences took over their time), .ms_per_gib, .vs_retain_range (over
// the store-only rate of the same run), .pages and .early_fences. SKIP
// (said on stderr) where userfaultfd cannot be used.
#ifndef DSVM_BENCH_FENCE_H_
#define DSVM_BENCH_FENCE_H_

#include <cstdint>
#include <string>

#include "proto/status.h"

namespace dsvm::bench {

struct FenceOptions {
  uint64_t bytes = uint64_t{1} << 30;
  uint32_t page_size = 4096;
  int rounds = 3;  // the best of each counts
  bool store_only = false;          // leave out the daemon's fence
  std::string node_binary;          // empty: beside this executable
  std::string coordinator_binary;
};

// Errors: kInvalidArgument (a page size other than 4 KiB, 64 KiB or 2 MiB;
// bytes not a positive multiple of it), kIoError (the store), kDataLoss
// (a byte changed).
Status RunFence(const FenceOptions& options);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_FENCE_H_
