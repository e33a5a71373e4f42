// Test support: a real dsvm-coordinator process, and a scripted node that
// speaks the coherence protocol over a FramedSocket.
#ifndef DSVM_TESTS_INTEGRATION_COORDINATOR_PROCESS_H_
#define DSVM_TESTS_INTEGRATION_COORDINATOR_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "proto/auth.h"
#include "proto/framed_socket.h"
#include "proto/messages.h"

namespace dsvm::testing {

// Makes a fresh directory under /tmp and removes it (recursively) at the end.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The cluster secret of every cluster this test process starts: a file made
// once per process (mode 0600, removed at exit), and its contents.
const std::string& TestSecretPath();
const proto::ClusterSecret& TestSecret();
// A tool's connection to a coordinator of this process, authenticated.
Result<proto::FramedSocket> ConnectTool(const std::string& address);

class CoordinatorProcess {
 public:
  ~CoordinatorProcess();
  // Starts the binary on 127.0.0.1 with an ephemeral port and waits until it
  // listens. Errors: the process exited (its exit code and stderr tail in
  // the message) or did not listen within 10 s. It demands TestSecret()
  // unless extra_flags has --insecure.
  Status Start(const std::string& data_dir, const std::vector<std::string>& extra_flags = {});
  void Kill(int signal);  // and reap it
  void Signal(int signal);  // without waiting: WaitExit reaps it
  // Waits for the process to exit by itself; returns its exit code (or -signal).
  int WaitExit(int timeout_ms);
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string stderr_text() const;
  bool running() const { return pid_ > 0; }

 private:
  pid_t pid_ = -1;
  uint16_t port_ = 0;
  std::string log_path_;
};

// A scripted node: joins, asks for pages, and answers the directory the way a
// node daemon's coherence agent does (without moving any page bytes).
class ScriptedNode {
 public:
  Status Connect(const std::string& address, proto::NodeId rejoin_as = proto::kNoNode);
  proto::NodeId id() const { return id_; }

  // Whether the node's copy already allows the access (then a real node
  // takes no fault, and Acquire refuses with kFailedPrecondition).
  bool Holds(proto::PageAddr page, bool write) const;

  // Sends an Acquire for `page` of region `region` (the id the node maps
  // there) and waits for the Grant answering it, serving other directory
  // messages meanwhile. Errors: the connection broke, or timeout.
  Result<proto::Grant> Acquire(proto::RegionId region, proto::PageAddr page, proto::AccessKind kind,
                               int timeout_ms = 5000);
  Status Heartbeat();
  // Serves directory messages for `ms` (answers Invalidate, no-data Fetch, Grant).
  void Serve(int ms);
  proto::FramedSocket& socket() { return sock_; }

 private:
  void Answer(const proto::Message& m);

  proto::FramedSocket sock_;
  proto::NodeId id_ = proto::kNoNode;
  uint64_t next_seq_ = 0;
  std::map<proto::PageAddr, proto::TxnId> last_txn_;
  std::map<proto::PageAddr, proto::PageState> state_;
};

}  // namespace dsvm::testing

#endif  // DSVM_TESTS_INTEGRATION_COORDINATOR_PROCESS_H_
