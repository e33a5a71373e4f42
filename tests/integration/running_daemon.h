// Node daemons inside an integration test process: each runs its loop on a
// thread of its own, as in dsvm-node, and the test reaches it only through
// Post(). Shared by the node and GPU-map integration tests.
#ifndef DSVM_TESTS_INTEGRATION_RUNNING_DAEMON_H_
#define DSVM_TESTS_INTEGRATION_RUNNING_DAEMON_H_

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "node/daemon/node_daemon.h"

namespace dsvm::testing {

class RunningDaemon {
 public:
  explicit RunningDaemon(std::unique_ptr<node::NodeDaemon> d);
  ~RunningDaemon();
  node::NodeDaemon& operator*() { return *d_; }
  node::NodeDaemon* operator->() { return d_.get(); }

  // Runs fn on the daemon's loop thread and waits for it (20 s at most).
  // After a timeout fn may still run later: it and the promise are the
  // closure's own, not this frame's.
  template <typename F>
  void Sync(F fn) {
    auto done = std::make_shared<std::promise<void>>();
    d_->Post([this, fn, done] {
      fn(*d_);
      done->set_value();
    });
    ASSERT_EQ(done->get_future().wait_for(std::chrono::seconds(20)), std::future_status::ready);
  }

  // One access through the daemon, waited for (20 s at most): `body` runs
  // with the page's bytes while the page is held.
  Status Access(proto::PageAddr addr, bool write, std::function<void(std::span<uint8_t>)> body);
  // The word at addr (8-byte aligned), read or written through Access.
  uint64_t ReadU64(proto::PageAddr addr);
  void WriteU64(proto::PageAddr addr, uint64_t v);
  // Holds the daemon's loop for `how_long` (it serves nothing meanwhile:
  // a stalled node), returning once the hold has begun.
  void Stall(std::chrono::milliseconds how_long);
  // True once the loop has returned on its own (NodeDaemon::fatal), waiting
  // up to `wait` for it. Sync and Access must not be used after that.
  bool WaitStopped(std::chrono::milliseconds wait);

 private:
  std::unique_ptr<node::NodeDaemon> d_;
  std::atomic<bool> stopped_{false};
  std::thread thread_;
};

// fork() with the loop of every daemon in `daemons` parked: a daemon thread
// inside malloc at the moment of the fork would leave the allocator's lock
// held in the child for ever (AddressSanitizer's allocator is not
// fork-safe; a client child hung so). Set it from SetUp, clear it in
// TearDown.
void SetQuietForkDaemons(std::vector<std::unique_ptr<RunningDaemon>>* daemons);
pid_t QuietFork();

// The options every daemon of the integration tests starts with: the test
// cluster secret, requests resent after 100 ms unless DSVM_TEST_RETRANSMIT_MS
// says otherwise, and the uffd fault backend unless DSVM_TEST_FAULT_BACKEND
// says otherwise (tests/kmod/run.sh runs the tests in an emulated QEMU
// guest, ten times slower, with "kmod" and 3000).
node::NodeDaemonOptions TestNodeOptions(const std::string& coordinator);

// Coordinator flags for the tests: `flags`, and a longer death deadline
// where DSVM_TEST_DEAD_AFTER_MS sets one and `flags` have none.
std::vector<std::string> TestCoordinatorFlags(std::vector<std::string> flags);

}  // namespace dsvm::testing

#endif  // DSVM_TESTS_INTEGRATION_RUNNING_DAEMON_H_
