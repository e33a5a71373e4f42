#include "tests/integration/running_daemon.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "tests/integration/coordinator_process.h"

namespace dsvm::testing {

RunningDaemon::RunningDaemon(std::unique_ptr<node::NodeDaemon> d) : d_(std::move(d)) {
  thread_ = std::thread([this] {
    d_->Run();
    stopped_ = true;
  });
}

bool RunningDaemon::WaitStopped(std::chrono::milliseconds wait) {
  const auto deadline = std::chrono::steady_clock::now() + wait;
  while (!stopped_ && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return stopped_;
}

RunningDaemon::~RunningDaemon() {
  d_->Stop();
  thread_.join();
}

Status RunningDaemon::Access(proto::PageAddr addr, bool write,
                             std::function<void(std::span<uint8_t>)> body) {
  // Shared with the loop: after a timeout the access may still end later.
  auto result = std::make_shared<std::promise<Status>>();
  d_->Post([this, addr, write, body, result] {
    d_->Access(addr, write, [body, result](Status st, std::span<uint8_t> bytes) {
      if (st.ok()) body(bytes);
      result->set_value(st);
    });
  });
  auto f = result->get_future();
  if (f.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    return Unavailable("access timed out");
  }
  return f.get();
}

uint64_t RunningDaemon::ReadU64(proto::PageAddr addr) {
  uint64_t v = 0;
  Status st = Access(addr, false, [&](std::span<uint8_t> b) {
    std::memcpy(&v, b.data() + addr % 4096 % b.size(), 8);
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  return v;
}

void RunningDaemon::Stall(std::chrono::milliseconds how_long) {
  std::promise<void> begun;
  d_->Post([&begun, how_long] {
    begun.set_value();
    std::this_thread::sleep_for(how_long);
  });
  begun.get_future().wait();
}

void RunningDaemon::WriteU64(proto::PageAddr addr, uint64_t v) {
  Status st = Access(addr, true, [&](std::span<uint8_t> b) {
    std::memcpy(b.data() + addr % 4096 % b.size(), &v, 8);
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
}

namespace {
std::vector<std::unique_ptr<RunningDaemon>>* g_daemons = nullptr;
}  // namespace

void SetQuietForkDaemons(std::vector<std::unique_ptr<RunningDaemon>>* daemons) {
  g_daemons = daemons;
}

pid_t QuietFork() {
  std::vector<std::promise<void>> parked(g_daemons ? g_daemons->size() : 0);
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  for (size_t i = 0; i < parked.size(); ++i) {
    RunningDaemon& d = *(*g_daemons)[i];
    d->Post([&parked, i, released] {
      parked[i].set_value();
      released.wait();
    });
  }
  for (auto& p : parked) p.get_future().wait();
  const pid_t pid = ::fork();
  if (pid != 0) release.set_value();
  return pid;
}

node::NodeDaemonOptions TestNodeOptions(const std::string& coordinator) {
  node::NodeDaemonOptions o;
  o.coordinator = coordinator;
  o.retransmit_after_ms = 100;
  if (const char* ms = std::getenv("DSVM_TEST_RETRANSMIT_MS"); ms && std::atoi(ms) > 0) {
    o.retransmit_after_ms = static_cast<uint32_t>(std::atoi(ms));
  }
  o.secret_file = TestSecretPath();
  if (const char* backend = std::getenv("DSVM_TEST_FAULT_BACKEND"); backend && *backend) {
    o.fault_backend = backend;
  }
  return o;
}

std::vector<std::string> TestCoordinatorFlags(std::vector<std::string> flags) {
  const char* dead_after = std::getenv("DSVM_TEST_DEAD_AFTER_MS");
  if (dead_after != nullptr && std::atoi(dead_after) > 0 &&
      std::find(flags.begin(), flags.end(), "--dead-after-ms") == flags.end()) {
    flags.insert(flags.end(), {"--dead-after-ms", dead_after});
  }
  return flags;
}

}  // namespace dsvm::testing
