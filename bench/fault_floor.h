// The floor a dsvm remote fault is measured against (docs/PERFORMANCE.md,
// ../shared/notes/ucx.md): the least a remote 4 KiB page fault can cost on
// this machine with the same tools, done by hand with no dsvm code on the
// path.
//
// A peer process holds the pages and busy-polls its UCX worker; it answers
// a 4 KiB active-message request with the page's bytes (AM request/reply:
// the peer need not expose memory, and an AM reply moves as fast as a
// ucp_get here, notes pitfall 2). The faulting process maps an anonymous
// region registered with userfaultfd (missing mode); a handler thread
// sleeps in poll() on the userfaultfd, and on each fault sends the request,
// busy-polls its worker until the reply is in, and resolves the fault with
// UFFDIO_COPY. Each first touch is timed as on the dsvm path
// (fault_timing.h).
//
// With `blocking`, the peer and the handler sleep on their worker's event
// fd instead of busy-polling (ucp_worker_arm, then poll), as dsvm-node's
// loop sleeps in epoll_wait: the same path with every hop a wake-up. On a
// machine with fewer idle cores than busy pollers, the busy floor's tail
// is set by the scheduler (a preempted poller answers a few ms late); the
// blocking floor shows what sleeping costs and gives a tail to compare a
// sleeping daemon's with. The transport is whatever UCX_TLS and UCX_NET_DEVICES
// say, as for the dsvm-node processes of the same run.
#ifndef DSVM_BENCH_FAULT_FLOOR_H_
#define DSVM_BENCH_FAULT_FLOOR_H_

#include <cstddef>
#include <vector>

#include "proto/status.h"

namespace dsvm::bench {

struct FloorOptions {
  size_t pages = 2000;       // timed faults, one per page
  size_t warmup_pages = 16;  // faulted first, not timed (connection setup)
  bool blocking = false;     // peer and handler sleep on the worker's event fd
};

// Runs the floor and returns one latency per timed page, in µs. Every value
// read is checked against what the peer holds. Forks the peer and starts a
// thread: call it in a process of its own (RunForked), never in the
// benchmark's main process. Errors: kUnavailable (userfaultfd or UCX cannot
// be used), kInternal (a wrong value, a failed peer), kIoError.
Status MeasureFaultFloor(const FloorOptions& options, std::vector<double>* micros);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_FAULT_FLOOR_H_
