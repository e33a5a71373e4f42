// The cluster a dsvm-bench subcommand runs against: one dsvm-coordinator
// (with its cluster secret) and N dsvm-node daemons on 127.0.0.1, as child
// processes, their sockets and logs in one temporary directory; and the
// client processes the bench forked, kept until the daemons are gone.
//
// Nothing outlives the bench: the daemons and the clients die with it
// (PR_SET_PDEATHSIG), and the temporary directory is removed when the
// Cluster goes, or, when the bench dies without unwinding (a signal,
// SIGKILL), by a small watcher process (TempDir).
#ifndef DSVM_BENCH_CLUSTER_H_
#define DSVM_BENCH_CLUSTER_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "bench/coordinator_process.h"
#include "bench/forked_child.h"
#include "bench/node_process.h"
#include "proto/status.h"

namespace dsvm::bench {

// A fresh directory under $TMPDIR (default /tmp), removed with everything
// in it by the destructor. Make() also forks a watcher that ignores
// SIGINT, SIGTERM and SIGHUP and waits on a pipe: when every holder of the
// pipe's write end is gone (the bench and the clients it forked, which die
// with it) without the destructor having said "removed", the watcher
// removes the directory itself. Call Make() from a single-threaded process.
class TempDir {
 public:
  TempDir() = default;
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // `prefix`: the start of the directory's name. Errors: kIoError.
  Status Make(std::string_view prefix);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  pid_t watcher_ = -1;
  int watcher_fd_ = -1;  // write end of the watcher's pipe
};

struct ClusterOptions {
  int nodes = 3;
  std::string node_binary;                // an existing binary: see ResolveBinaries
  std::string coordinator_binary;         // the same
  std::string dir_prefix = "dsvm-bench";  // of the temporary directory's name
  // --busy-poll-us for the coordinator and every daemon (0: they sleep).
  uint32_t busy_poll_us = 0;
  // --fault-poll-us for every daemon; negative: the daemon's default.
  int64_t fault_poll_us = -1;
  // --zero-copy for every daemon; empty: the daemon's default.
  std::string zero_copy;
  // --direct-reads for every daemon ("on", "off"); empty: the daemon's default.
  std::string direct_reads;
};

// Members are destroyed in reverse order: clients, daemons, coordinator,
// then the directory; each destructor kills what still runs. Call Stop()
// for a clean stop that reports what went wrong.
struct Cluster {
  TempDir dir;
  std::unique_ptr<CoordinatorProcess> coordinator;
  std::vector<std::unique_ptr<NodeProcess>> nodes;  // nodes[i] is started i-th
  // Client processes that did their part, kept alive with their mapping and
  // daemon connection until the daemons have stopped, so that pages they
  // hold stay mapped while other clients are measured.
  std::vector<std::unique_ptr<ForkedChild>> clients;

  // Copies the tail of every daemon's and the coordinator's log to stderr.
  void PrintLogTails();

  // Lines the daemons logged at WARN or ERROR, to stderr: the run's figures
  // stand, but something was off.
  void ReportLogProblems();

  // Daemons first (their warnings until then are reported), then the
  // clients they served, then the coordinator. Returns the first error.
  Status Stop();
};

// Makes the directory (node i's socket and log: <dir>/node<i+1>.sock and
// .log; the coordinator's data under it too), starts the coordinator and
// the daemons, each daemon serving clients before the next starts. On an
// error what was started is left in `c` for Stop() or the destructors.
// Errors: those of CoordinatorProcess::Start and NodeProcess::Start.
Status StartCluster(const ClusterOptions& options, Cluster* c);

// Fills an empty binary path with the default beside this executable
// (DefaultNodeBinary, DefaultCoordinatorBinary). Errors: kNotFound, naming
// the target to build, when one is not an executable file.
Status ResolveBinaries(std::string* node_binary, std::string* coordinator_binary);

// Whether userfaultfd can be used here as dsvm-node needs it (the daemon's
// own probe). When not, says "<bench>: SKIP: …" on stderr.
bool UffdUsableOrSaySkip(std::string_view bench);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_CLUSTER_H_
