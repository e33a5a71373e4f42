// Running one part of a benchmark in a forked child and collecting what it
// measured: series of samples (one vector of doubles each) sent back over a
// pipe. Fault-latency clients must be processes of their own (a region is
// mapped at its cluster-wide address once per process, and its faults are
// served by the process's node daemon), and the UCX floor must not share
// the parent's address space or threads.
//
// Fork only from a single-threaded process: the child runs `body` on a copy
// of the parent's only thread and leaves with _exit, so the parent's
// destructors (a coordinator it owns, say) never run in the child. The
// child's stdout is not used; its stderr is the parent's. Children are
// killed when the parent dies.
#ifndef DSVM_BENCH_FORKED_CHILD_H_
#define DSVM_BENCH_FORKED_CHILD_H_

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "proto/status.h"

namespace dsvm::bench {

using SampleSeries = std::vector<std::vector<double>>;

class ForkedChild {
 public:
  // What the child runs: fills the series it measured and returns OK, or
  // returns why it failed (printed by the child to stderr as "<what>:
  // <status>"). At most 16 series of at most 2^24 samples each.
  using Body = std::function<Status(SampleSeries*)>;

  // Forks. The child runs `body`, sends its series, then stays alive, with
  // whatever it holds (a mapping, a connection to its daemon), until
  // Release(). Errors: kIoError.
  static Result<std::unique_ptr<ForkedChild>> Start(const std::string& what, const Body& body);

  // Kills the child if it is still there.
  ~ForkedChild();
  ForkedChild(const ForkedChild&) = delete;
  ForkedChild& operator=(const ForkedChild&) = delete;

  // Waits for the child's series, at most `timeout_s`. Errors: kInternal
  // (the child failed, or died), kUnavailable (no answer in time: the child
  // is killed; a fault never served, say).
  Result<SampleSeries> Collect(int timeout_s);

  // Lets the child exit and reaps it (SIGKILL after 5 s). Errors: kInternal
  // when it did not exit 0.
  Status Release();

 private:
  ForkedChild() = default;
  std::string what_;
  pid_t pid_ = -1;
  int result_fd_ = -1;   // read end: the child's series
  int release_fd_ = -1;  // write end: one byte lets the child exit
};

// Start, Collect, Release: a child that needs nothing kept alive.
Result<SampleSeries> RunForked(const std::string& what, int timeout_s,
                               const ForkedChild::Body& body);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_FORKED_CHILD_H_
