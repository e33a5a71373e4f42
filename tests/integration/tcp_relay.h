// TcpRelay: the network between a test's process and a TCP server, as a
// relay on 127.0.0.1 that the test can cut and heal. Cut, it moves no byte
// either way and accepts no connection, but closes nothing: what is sent
// meanwhile waits, as over a network that drops every packet while TCP
// retransmits. Healed, it all flows again, in order. A partition between
// one node daemon and the coordinator, with everything else connected.
#ifndef DSVM_TESTS_INTEGRATION_TCP_RELAY_H_
#define DSVM_TESTS_INTEGRATION_TCP_RELAY_H_

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "proto/status.h"

namespace dsvm::testing {

class TcpRelay {
 public:
  // Listens on 127.0.0.1 (an ephemeral port) and relays each connection to
  // `target` ("127.0.0.1:port"), on a thread of its own. Errors: kIoError.
  static Result<std::unique_ptr<TcpRelay>> Start(const std::string& target);
  ~TcpRelay();
  TcpRelay(const TcpRelay&) = delete;
  TcpRelay& operator=(const TcpRelay&) = delete;

  // "127.0.0.1:port": connect here instead of to the target.
  std::string address() const;
  void Cut() { cut_ = true; }
  void Heal() { cut_ = false; }
  // Drops every relayed connection, with the bytes it held (a reset
  // connection, as after a router reboot), cut or not; new connections
  // are relayed as before. Returns once they are closed.
  void Reset();

 private:
  TcpRelay(int listen_fd, int port, std::string target_host, int target_port);
  void Loop();

  const int listen_fd_;
  const int port_;
  const std::string target_host_;
  const int target_port_;
  std::atomic<bool> cut_{false};
  std::atomic<bool> reset_{false};  // asked by Reset(), cleared by the loop when done
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace dsvm::testing

#endif  // DSVM_TESTS_INTEGRATION_TCP_RELAY_H_
