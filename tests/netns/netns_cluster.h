// NetnsCluster: a dsvm cluster spread over Linux network namespaces, for the
// netns tests. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2.
//
// Topology, all inside namespaces named dsvmt<test pid><role> (nothing is
// added to the namespace the test runs in):
//
//   hub:  bridge br0, one port p<role> per member below
//   c:    dsvm-coordinator on 10.77.0.1, veth dsvm0
//   n<k>: dsvm-node on 10.77.0.(10+k), veth dsvm0, k = 1..nodes
//
// Every process is started through `ip netns exec`, which also remounts /sys
// so UCX sees the namespace's own devices, with UCX_TLS=tcp and
// UCX_NET_DEVICES=dsvm0: without them UCX would reach the other namespaces
// over shared memory and the network would never be used
// (../shared/notes/ucx.md, pitfalls 5 and 6). DSVM_SECRET_FILE names a
// fresh cluster secret, so nodes authenticate as in a real deployment.
//
// Cleanup: Stop() (and the destructor) stops every process and deletes
// every namespace. Should the test process die first (a crash, a ctest
// timeout's SIGKILL), its children die with it (PR_SET_PDEATHSIG) and a
// watcher process started with the cluster deletes the namespaces. Start()
// also deletes namespaces left by test processes that no longer exist.
#ifndef DSVM_TESTS_NETNS_NETNS_CLUSTER_H_
#define DSVM_TESTS_NETNS_NETNS_CLUSTER_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "proto/status.h"

namespace dsvm::testing {

// How a process ended: its exit code, 128 + the signal that killed it, or
// kTimedOut (then it was killed with SIGKILL).
struct ProcessResult {
  static constexpr int kTimedOut = -1;
  int code = kTimedOut;
  std::string out;     // stdout
  std::string err;     // stderr (its last 4000 bytes)
  double seconds = 0;  // from start to exit (or to being killed)
  std::string Describe() const;
};

class NetnsCluster {
 public:
  explicit NetnsCluster(int nodes);
  ~NetnsCluster();
  NetnsCluster(const NetnsCluster&) = delete;
  NetnsCluster& operator=(const NetnsCluster&) = delete;

  // "" when this process can build the topology (root, iproute2, network
  // namespaces and bridges available); else a sentence saying why not.
  // Probes by adding and deleting a namespace.
  static std::string Unsupported();

  // Builds the topology, starts the coordinator and the node daemons and
  // waits (10 s at most each) until the coordinator listens and every
  // daemon's client socket exists. Errors: kUnavailable with the failing
  // command's output or the process's log tail. On error, what was built is
  // left for Stop().
  Status Start();

  // Stops every process (SIGTERM, then SIGKILL after 3 s), deletes every
  // namespace and checks that none is left. Idempotent. Errors: something
  // could not be removed (named in the message).
  Status Stop();

  int nodes() const { return nodes_; }
  std::string node_address(int k) const;  // k = 1..nodes()
  std::string node_socket(int k) const;
  std::string node_namespace(int k) const;
  const std::string& coordinator_address() const { return coordinator_address_; }
  std::vector<std::string> namespaces() const;

  // Runs dsvm-netns-client --socket <node k's socket> ARGS... in node k's
  // namespace and waits for it.
  ProcessResult Client(int k, const std::vector<std::string>& args, int timeout_ms = 30000);
  // Runs several at once, each {node, args}. When one fails or the time is
  // up, the others are killed (they may wait forever for it: a lock it
  // holds, a barrier it never reaches).
  // `tick`, when given, is called every 2 ms while they run, with the
  // milliseconds since they were started and how many still run (for a
  // test's schedule of events).
  using Tick = std::function<void(int elapsed_ms, int running)>;
  std::vector<ProcessResult> Clients(
      const std::vector<std::pair<int, std::vector<std::string>>>& runs, int timeout_ms,
      const Tick& tick = nullptr);

  // Cuts node k off the network (its bridge port down), or joins it again.
  // Its TCP connections stay open and resume when it is joined again.
  Status Partition(int k, bool cut);

  // Whether node k's daemon (or the coordinator) still runs.
  bool NodeRunning(int k);
  bool CoordinatorRunning();

  // Bytes received by node k's veth since it was made.
  Result<uint64_t> ReceivedBytes(int k);
  // Node k's namespace's established TCP connections: the remote address
  // (IP only) and the bytes received on each (tcp_info, as `ss -i` shows).
  struct TcpConnection {
    std::string peer;
    uint64_t bytes_received = 0;
  };
  Result<std::vector<TcpConnection>> TcpConnections(int k);

  // The tails of the coordinator's and every daemon's logs.
  std::string Logs();
  // The coordinator's whole log.
  std::string CoordinatorLog() const;

 private:
  struct Proc {
    pid_t pid = -1;                       // -1 once reaped
    int code = ProcessResult::kTimedOut;  // once reaped: as in ProcessResult
    std::chrono::steady_clock::time_point started, ended;
    std::string out_path, err_path;  // the same file for daemons
  };

  std::string Namespace(const std::string& role) const;
  std::string secret_path() const { return dir_ + "/cluster.secret"; }
  Status WriteSecret();
  std::vector<std::string> Roles() const;
  Status StartWatcher();
  Status BuildTopology();
  // Runs `ip ARGS...` (or another tool) in this namespace; returns its output.
  Result<std::string> Tool(const std::vector<std::string>& argv);
  void CleanStale();
  // Starts argv in namespace ns; stdout and stderr go to <dir>/<log_name>.log,
  // or .out and .err when `split`.
  Proc Spawn(const std::string& ns, const std::vector<std::string>& argv,
             const std::string& log_name, bool split);
  bool Running(Proc& p);  // reaps it when it has exited
  void Kill(Proc& p);     // SIGKILL and reap
  ProcessResult Collect(const Proc& p) const;

  const int nodes_;
  const std::string prefix_;  // dsvmt<pid>
  std::string dir_;           // logs, sockets, the coordinator's data
  std::string coordinator_address_;
  std::vector<std::string> made_;  // namespaces added, in order
  Proc coordinator_;
  std::vector<Proc> daemons_;  // index k - 1
  pid_t watcher_ = -1;
  int watcher_fd_ = -1;  // the write end of the watcher's stdin
  int client_runs_ = 0;
  bool stopped_ = true;
};

}  // namespace dsvm::testing

#endif  // DSVM_TESTS_NETNS_NETNS_CLUSTER_H_
