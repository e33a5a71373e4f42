// `dsvm-bench fault-latency` (issue #3): what a page fault costs a client
// process on the dsvm path, against the floor measured in the same run.
//
// The dsvm path is made of real processes: a dsvm-coordinator, three
// dsvm-node daemons (nodes 1-3) and client processes that speak the client
// plane raw (ClientHello, RegionOpen, the memfd mapped at the region's base
// and its userfaultfd handed over with MapRegion), then touch the region
// with plain loads and stores; their faults are served by their node's
// daemon. Per UCX_TLS setting, on a fresh cluster, with N pages per series:
//
//   first_touch_write  node 1 writes pages never written (a directory round
//                      trip, no data moved), timed first store;
//   remote_read        node 2 reads pages node 1 holds Modified: the
//                      fault fetches the page from node 1's daemon
//                      (through the directory, and with direct reads on
//                      also straight from node 1);
//   local_reread       node 2's reader reads them again (valid, mapped);
//   local_minor        ... again after dropping its page-table entries
//                      (MADV_DONTNEED): one local minor fault each, served
//                      by node 2's daemon without the network;
//   local_valid        a second process on node 2 touches the same pages for
//                      the first time (valid on the node: no remote trip);
//   remote_write_invalidate  node 3 writes pages that node 1 wrote and node
//                      2 read (Shared{1, 2}): the fault takes the page from
//                      the owner and invalidates the other sharer.
//
// Every value read is checked (whole pages, after each timed pass), and at
// the end nodes 1 and 2 read node 3's writes back. The floor is
// MeasureFaultFloor (fault_floor.h), run with the same environment beside
// the idle cluster, busy-polling and then blocking; a bare request/reply
// with the coordinator is timed too, to split the gap.
#ifndef DSVM_BENCH_FAULT_LATENCY_H_
#define DSVM_BENCH_FAULT_LATENCY_H_

#include <cstddef>
#include <string>
#include <vector>

#include "proto/status.h"

namespace dsvm::bench {

struct FaultLatencyOptions {
  size_t pages = 2000;       // timed accesses per series
  size_t warmup_pages = 16;  // per path, untimed: UCX connections between the nodes
  // One fresh cluster and floor per entry, each run with UCX_TLS set to it
  // and UCX_NET_DEVICES=lo (../shared/notes/ucx.md, pitfalls 5 and 6).
  std::vector<std::string> transports = {"tcp", "sm,tcp"};
  std::string node_binary;         // empty: DefaultNodeBinary()
  std::string coordinator_binary;  // empty: DefaultCoordinatorBinary()
  int child_timeout_s = 60;        // per client process; a hung fault fails the run
  // Each client process exits as soon as it has reported, instead of at the
  // end of the run. Today that makes the daemons spin on the closed
  // connections (node_process.h): kept to show the effect.
  bool clients_exit = false;
  // --busy-poll-us for the coordinator and the daemons (0: they sleep when
  // idle). Metric names then carry ".poll" after the transport.
  uint32_t busy_poll_us = 0;
  int64_t fault_poll_us = -1;  // --fault-poll-us of the daemons; negative: their default
  // One fresh cluster per entry (per transport), its daemons started with
  // --direct-reads set to it (proto/PROTOCOL.md, "Direct reads"). Metric
  // names carry ".direct" after the transport for "on"; "off" keeps the
  // names the directory's path always had. With both, the remote read's
  // median on/off is fault.remote_read.<tls>.direct_vs_directory.
  std::vector<std::string> direct_reads = {"off", "on"};
};

// Runs everything and emits the metrics (names in docs/PERFORMANCE.md).
// Sets *skipped and returns OK, after saying why on stderr, when
// userfaultfd cannot be used here as dsvm-node needs it. Errors:
// kNotFound (a binary is missing), kInternal (a value read wrong, a client
// or daemon failed), kUnavailable (a process did not start or a client
// hung), kIoError.
Status RunFaultLatency(const FaultLatencyOptions& options, bool* skipped);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_FAULT_LATENCY_H_
