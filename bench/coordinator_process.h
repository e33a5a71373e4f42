// A dsvm-coordinator child process for benchmarks: started on 127.0.0.1:0
// in a fresh temporary directory, stopped with SIGTERM, directory removed.
#ifndef DSVM_BENCH_COORDINATOR_PROCESS_H_
#define DSVM_BENCH_COORDINATOR_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "proto/auth.h"
#include "proto/status.h"

namespace dsvm::bench {

// The coordinator binary next to this executable in a build tree:
// <dir of /proc/self/exe>/../coordinator/dsvm-coordinator. Empty when
// /proc/self/exe cannot be read.
std::string DefaultCoordinatorBinary();

class CoordinatorProcess {
 public:
  // Starts `binary --listen 127.0.0.1:0 --data-dir D --port-file F` (then
  // `extra_args`) with its
  // output in a log file, and waits (up to 20 s) for the port file. The child
  // is killed if this process dies. Errors: kNotFound (no such binary),
  // kUnavailable (it exited or never wrote its port), kIoError.
  static Result<std::unique_ptr<CoordinatorProcess>> Start(
      const std::string& binary, const std::vector<std::string>& extra_args = {});

  // Stops the child if it runs, removes the directory.
  ~CoordinatorProcess();
  CoordinatorProcess(const CoordinatorProcess&) = delete;
  CoordinatorProcess& operator=(const CoordinatorProcess&) = delete;

  // "127.0.0.1:PORT".
  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }
  // The cluster secret it demands: a fresh one per process, in its directory.
  const std::string& secret_path() const { return secret_path_; }
  const proto::ClusterSecret& secret() const { return *secret_; }

  // SIGTERM, then SIGKILL after 5 s. Errors: kInternal when the coordinator
  // did not exit 0 on SIGTERM (the log's tail goes to stderr).
  Status Stop();

  // Copies the last `lines` lines of the coordinator's log to stderr.
  void PrintLogTail(size_t lines) const;

  // Sends `sig` (SIGSTOP, SIGCONT: a coordinator that stands still).
  // Errors: kFailedPrecondition (not running), kIoError.
  Status Signal(int sig);

 private:
  CoordinatorProcess() = default;

  pid_t pid_ = -1;
  std::string root_;  // temporary: data/, port, coordinator.log
  std::string address_;
  std::string secret_path_;
  std::optional<proto::ClusterSecret> secret_;
};

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_COORDINATOR_PROCESS_H_
