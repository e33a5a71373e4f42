// DaemonConnection: libdsvm's end of the client plane (proto/PROTOCOL.md,
// "Client plane"): one UNIX SOCK_SEQPACKET connection to the node daemon,
// one record per frame, descriptors riding on records with SCM_RIGHTS.
//
// Requests are strictly one at a time: Call sends a request and waits for
// the reply with the same request id. Any failure of a call (the daemon
// closed the connection, did not answer within the timeout, or broke the
// protocol) shuts the connection down for good: a reply that arrived late
// could no longer be told apart from the answer to a later request, and a
// client that gave up on a MapRegion must not leave the daemon serving a
// mapping it no longer has. The daemon forgets every mapping of a client
// whose connection closes.
//
// Thread safety: none; the owner serialises calls (libdsvm holds its mutex).
// fd() and Shutdown() may be used by a thread that watches for hang-ups.
#ifndef DSVM_CLIENT_LIB_DAEMON_CONNECTION_H_
#define DSVM_CLIENT_LIB_DAEMON_CONNECTION_H_

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "node/memory/unique_fd.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::client {

// A reply and the descriptors that rode on it (owned by the receiver).
struct DaemonReply {
  proto::Message message;
  std::vector<node::UniqueFd> fds;
};

class DaemonConnection {
 public:
  DaemonConnection() = default;
  DaemonConnection(DaemonConnection&&) = default;
  DaemonConnection& operator=(DaemonConnection&&) = default;

  // Connects to the daemon listening at `path`. `timeout` bounds each later
  // Call's send and wait. Errors: kInvalidArgument (path empty or too long
  // for a UNIX socket address), kUnavailable (nothing listens there),
  // kPermissionDenied (the socket's permissions refuse this process),
  // kIoError.
  static Result<DaemonConnection> Connect(const std::string& path,
                                          std::chrono::milliseconds timeout);

  // Sends `request` as the next request id with duplicates of `fds`
  // attached (the caller keeps its own), then waits for the reply. Errors,
  // after each of which broken() is true: kUnavailable (not connected, the
  // daemon closed the connection, or no answer within the timeout),
  // kInternal (the daemon broke the protocol: a malformed or oversized
  // record, a reply to another request), kIoError.
  Result<DaemonReply> Call(const proto::Message& request, std::span<const int> fds = {});

  // Shuts the connection down in both directions, keeping the descriptor:
  // the daemon sees the client leave, a thread polling fd() wakes up, and
  // every later Call fails with kUnavailable. Idempotent.
  void Shutdown();

  bool broken() const { return broken_; }
  int fd() const { return sock_.get(); }
  // The request id the next Call will use (1 for the first).
  uint64_t next_request_id() const { return next_request_id_; }

 private:
  DaemonConnection(node::UniqueFd sock, std::chrono::milliseconds timeout);
  Result<DaemonReply> Exchange(const proto::Message& request, std::span<const int> fds);

  node::UniqueFd sock_;
  std::chrono::milliseconds timeout_{0};
  uint64_t next_request_id_ = 1;
  bool broken_ = true;  // until connected
  std::vector<uint8_t> buffer_;
};

}  // namespace dsvm::client

#endif  // DSVM_CLIENT_LIB_DAEMON_CONNECTION_H_
