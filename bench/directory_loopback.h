// Part 2 of `dsvm-bench directory`: a dsvm-coordinator on 127.0.0.1 and two
// node connections, each in its own thread, that keep a window of W
// outstanding Acquire(kWrite) requests on pages they take from each other
// (every acquire fetches from the other node), answering the directory as a
// node daemon would. Baseline in the same run, on the same connections and
// window: Heartbeat request/reply (transport and framing, no directory work
// and no persistence).
#ifndef DSVM_BENCH_DIRECTORY_LOOPBACK_H_
#define DSVM_BENCH_DIRECTORY_LOOPBACK_H_

#include <cstddef>
#include <string>
#include <vector>

#include "proto/status.h"

namespace dsvm::bench {

struct LoopbackOptions {
  std::string coordinator_address;  // "host:port" of a running coordinator; empty: start one
  std::string coordinator_binary;   // empty: DefaultCoordinatorBinary(), skipped if missing
  size_t pages = 4096;
  std::vector<size_t> windows = {1, 64};  // outstanding requests per connection
  double warmup_seconds = 0.2;            // per phase, not counted
  double seconds = 1.0;                   // per phase, counted
};

// Runs the phases and emits their metrics. Sets *skipped (and returns OK)
// when no coordinator address was given and the default binary does not
// exist. Every Grant, Fetch and Release is checked against what the node
// asked for and holds; at the end every page a node holds is checked with
// PageQuery. Errors: kInternal (a check failed), kUnavailable (the
// coordinator cannot be started or reached, or stopped answering).
Status RunDirectoryLoopback(const LoopbackOptions& options, bool* skipped);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_DIRECTORY_LOOPBACK_H_
