// Server: dsvm-coordinator's sockets, on Boost.Asio.
//
// One io_context run by one thread owns everything: the acceptor, every
// connection and the CoordinatorService, so no locks are needed. Frames are
// validated as they arrive; a malformed one closes that connection with a
// logged reason, and the others keep being served. Replies are written after
// the service's Flush() (group commit): one flush per burst of input.
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

namespace dsvm::coordinator {

// Milliseconds of CLOCK_MONOTONIC: the one clock of the coordinator process.
uint64_t MonotonicMs();

struct ServerOptions {
  std::string listen = "127.0.0.1:7700";  // port 0 picks a free one
  uint32_t tick_ms = 50;
  size_t max_output_bytes = 64u << 20;     // a peer that stops reading is cut off here
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
  void Consume(const std::shared_ptr<Connection>& c);
  void Close(const std::shared_ptr<Connection>& c, const std::string& why);
  void ScheduleFlush();
  void DoFlush();
  void Write(const std::shared_ptr<Connection>& c);
  void ScheduleTick();

  boost::asio::io_context& io_;
  CoordinatorService& service_;
  ServerOptions options_;
  boost::asio::ip::tcp::acceptor acceptor_;
  boost::asio::steady_timer tick_timer_;
  boost::asio::steady_timer retry_timer_;
  std::unordered_map<ConnId, std::shared_ptr<Connection>> conns_;
  ConnId next_conn_ = 1;
  bool flush_scheduled_ = false;
  bool stopped_ = false;
};

}  // namespace dsvm::coordinator

#endif  // DSVM_COORDINATOR_NET_SERVER_H_
