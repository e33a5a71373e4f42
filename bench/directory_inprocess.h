// Part 1 of `dsvm-bench directory`: coordinator::PageDirectory driven in
// process by simulated nodes that answer its outbox at once, as a node
// daemon would (PROTOCOL rules: last_txn, kUpgrade, request_seq). Measures
// directory transitions per second on one core, without persistence (the
// records are taken with TakeDirty after every batch, as the coordinator
// must, and dropped), against a bare std::unordered_map update of the same
// pages measured in the same run.
#ifndef DSVM_BENCH_DIRECTORY_INPROCESS_H_
#define DSVM_BENCH_DIRECTORY_INPROCESS_H_

#include <cstddef>

#include "proto/status.h"

namespace dsvm::bench {

struct InProcessOptions {
  size_t pages = 4096;       // the page set every workload works on
  size_t batch_pages = 256;  // requests handed to the directory between TakeDirty calls
  double seconds = 0.6;      // timed part of each workload (at least two rounds run)
  bool quick = false;        // a few rounds each, for CI: checks, no meaningful timing
};

// Runs the workloads and emits their metrics. Every grant, fetch and
// invalidation is checked against what the simulated nodes asked for and
// hold, and CheckInvariants() runs at the end of each workload. Errors:
// kInternal naming the first check that failed.
Status RunDirectoryInProcess(const InProcessOptions& options);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_DIRECTORY_INPROCESS_H_
