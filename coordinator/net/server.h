// Server: dsvm-coordinator's sockets, on Boost.Asio.
//
// One io_context run by one thread owns everything: the acceptor, every
// connection and the CoordinatorService, so no locks are needed. Frames are
// validated as they arrive; a malformed one closes that connection with a
// logged reason, and the others keep being served. Replies are written after
// the service's Flush() (group commit): one flush per burst of input.
//
// Every connection starts with the authentication handshake (proto/auth.h),
// done here: the service sees only frames of authenticated connections.
#ifndef DSVM_COORDINATOR_NET_SERVER_H_
#define DSVM_COORDINATOR_NET_SERVER_H_

#include <utility>  // before Asio: Boost 1.74 awaitable.hpp needs std::exchange under C++20
#include <boost/asio.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "coordinator/service/coordinator_service.h"
#include "proto/auth.h"

namespace dsvm::coordinator {

// Milliseconds of CLOCK_MONOTONIC: the one clock of the coordinator process.
uint64_t MonotonicMs();

struct ServerOptions {
  std::string listen = "127.0.0.1:7700";  // port 0 picks a free one
  uint32_t tick_ms = 50;
  size_t max_output_bytes = 64u << 20;     // a peer that stops reading is cut off here
  // The cluster secret connectors must prove; nullptr: none (--insecure),
  // any connector is accepted. Must outlive the server.
  const proto::ClusterSecret* secret = nullptr;
};

class Server {
 public:
  Server(boost::asio::io_context& io, CoordinatorService& service, ServerOptions options);
  ~Server();

  // Binds and starts accepting. Returns the port bound. Errors:
  // kInvalidArgument (address), kUnavailable (bind failed).
  Result<uint16_t> Start();
  // Stops accepting and closes every connection.
  void Stop();

 private:
  struct Connection;
  void Accept();
  void Read(std::shared_ptr<Connection> c);
  // Handles the complete frames read, at most kMessagesPerTurn messages (a
  // run counts its messages); false if some are left for a later turn.
  bool Consume(const std::shared_ptr<Connection>& c);
  // Consume, then read more once everything read is handled.
  void ConsumeThenRead(const std::shared_ptr<Connection>& c);
  // Hands a frame to the service; a PageRun message by message.
  Status Dispatch(const std::shared_ptr<Connection>& c, const proto::Frame& frame, uint64_t now);
  // One frame of a connection still in its handshake. False: refused (an
  // error reply is queued and the connection closes after it).
  bool Authenticate(const std::shared_ptr<Connection>& c, const proto::Frame& frame);
  void Refuse(const std::shared_ptr<Connection>& c, uint64_t request_id, const Status& why);
  void Close(const std::shared_ptr<Connection>& c, const std::string& why);
  void ScheduleFlush();
  void DoFlush();
  // Queues each send on its connection (if still open) and starts the writes.
  void SendAll(std::vector<Send>& sends);
  void Write(const std::shared_ptr<Connection>& c);
  void ScheduleTick();

  boost::asio::io_context& io_;
  CoordinatorService& service_;
  ServerOptions options_;
  boost::asio::ip::tcp::acceptor acceptor_;
  boost::asio::steady_timer tick_timer_;
  boost::asio::steady_timer retry_timer_;
  bool flush_failing_ = false;  // the last Flush failed (logged once per outage)
  boost::asio::steady_timer accept_timer_;  // Accept again after a failed accept
  std::unordered_map<ConnId, std::shared_ptr<Connection>> conns_;
  ConnId next_conn_ = 1;
  bool flush_scheduled_ = false;
  bool stopped_ = false;
};

}  // namespace dsvm::coordinator

#endif  // DSVM_COORDINATOR_NET_SERVER_H_
