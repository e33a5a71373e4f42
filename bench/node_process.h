// A dsvm-node child process for benchmarks: joins a coordinator, serves
// clients on a UNIX socket in a directory the caller owns, and is stopped
// with SIGTERM. Its UCX transport follows the environment it inherits
// (UCX_TLS, UCX_NET_DEVICES), so the caller sets those before Start.
#ifndef DSVM_BENCH_NODE_PROCESS_H_
#define DSVM_BENCH_NODE_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "proto/status.h"

namespace dsvm::bench {

// <dir of /proc/self/exe>/../node/dsvm-node. Empty when /proc/self/exe
// cannot be read.
std::string DefaultNodeBinary();

class NodeProcess {
 public:
  // Starts `binary --coordinator C --listen 127.0.0.1:0 --socket S` (then
  // `extra_args`) with
  // its output in `log_path`, and waits (up to 20 s) until S accepts a
  // connection. That connection stays open until the daemon is gone: a
  // closed client connection makes today's dsvm-node spin (its client
  // loop takes the end of file for EAGAIN when errno is left so; see
  // docs/PERFORMANCE.md, "Remote fault latency"), which would load the
  // machine under every figure taken after it. The child is killed if this process dies. Errors:
  // kNotFound (no such binary), kUnavailable (it exited or never listened;
  // the log's tail goes to stderr), kIoError.
  static Result<std::unique_ptr<NodeProcess>> Start(const std::string& binary,
                                                    const std::string& coordinator,
                                                    const std::string& secret_file,
                                                    const std::string& socket_path,
                                                    const std::string& log_path,
                                                    const std::vector<std::string>& extra_args = {});

  // Kills the child if it still runs (SIGKILL); call Stop() first for a
  // clean exit.
  ~NodeProcess();
  NodeProcess(const NodeProcess&) = delete;
  NodeProcess& operator=(const NodeProcess&) = delete;

  const std::string& socket_path() const { return socket_path_; }
  pid_t pid() const { return pid_; }

  // True while the child has not exited (reaps it when it has).
  bool Running();

  // SIGTERM, then SIGKILL after 5 s. Errors: kInternal when the daemon did
  // not exit 0 (the log's tail goes to stderr).
  Status Stop();

  // Copies the last `lines` lines of the daemon's log to stderr.
  void PrintLogTail(size_t lines) const;

 private:
  NodeProcess() = default;

  pid_t pid_ = -1;
  int probe_fd_ = -1;  // the readiness probe's connection, kept open
  std::string socket_path_;
  std::string log_path_;
};

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_NODE_PROCESS_H_
