// Unit tests for libdsvm (client/): argument checks, error codes, and the
// client plane against a fake node daemon.
//
// FakeDaemon is a SOCK_SEQPACKET server thread in the test process that
// answers as dsvm-node does (ClientHello, RegionCreate/Open/Delete with a
// real memfd, MapRegion, UnmapRegion) and records what it received; a test
// overrides single answers to play a daemon that refuses, lies, goes silent
// or dies. It never initialises or registers the userfaultfd it is handed,
// so a test may touch a mapped region: it reads the fake's memfd directly,
// no fault is involved. Faults themselves need the real daemon
// (tests/integration).
//
// libdsvm is a per-process singleton: every test finalizes in TearDown.
// Regions sit at distinct 2 MiB granules of the coordinator's default
// window, above those uffd_backend_test uses.
#include <dsvm/dsvm.h>
#include <errno.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <dsvm/dsvm.hpp>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/lib/client_testing.h"
#include "node/fault/fd_passing.h"
#include "node/fault/uffd_client.h"
#include "node/memory/unique_fd.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm {
namespace {

using node::UniqueFd;

constexpr uint64_t kWindowBase = 0x200000000000ull;
constexpr uint64_t kWindowSize = 1ull << 44;
constexpr uint64_t kGranule = 2ull << 20;
constexpr proto::NodeId kNode = 7;

// Region base number k: clear of uffd_backend_test's range.
uint64_t Base(int k) { return kWindowBase + (64 + static_cast<uint64_t>(k)) * kGranule; }

// --- Looking at this process ---------------------------------------------------

struct Mapping {
  uint64_t end = 0;
  std::string perms;  // "rw-s", "---s"
};

// The mapping that starts exactly at `base`, from /proc/self/maps.
std::optional<Mapping> MappingAt(uint64_t base) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    uint64_t start = 0, end = 0;
    char perms[8] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %7s", &start, &end, perms) != 3) continue;
    if (start == base) return Mapping{end, perms};
  }
  return std::nullopt;
}

// What /proc/self/fd says a descriptor is: "anon_inode:[userfaultfd]", ...
std::string FdKind(int fd) {
  char buf[256];
  const std::string link = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(link.c_str(), buf, sizeof(buf) - 1);
  return n < 0 ? std::string() : std::string(buf, static_cast<size_t>(n));
}

int CountFdsOfKind(const std::string& kind) {
  int count = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    const std::string name = e.path().filename();
    if (FdKind(std::atoi(name.c_str())) == kind) ++count;
  }
  return count;
}

// Mapping regions needs a userfaultfd; where the kernel or policy refuses
// one, the tests that map are skipped.
std::string UffdRefusal() {
  static const std::string why = [] {
    auto u = node::CreateUserfaultfd();
    return u.ok() ? std::string() : u.status().ToString();
  }();
  return why;
}
#define SKIP_WITHOUT_UFFD()                                                          \
  do {                                                                               \
    if (!UffdRefusal().empty()) GTEST_SKIP() << "no userfaultfd: " << UffdRefusal(); \
  } while (0)

// --- The fake daemon --------------------------------------------------------------

// What the fake received, in order.
struct Seen {
  proto::MessageType type = proto::MessageType::kInvalid;
  uint64_t request_id = 0;
  uint64_t base = 0;  // MapRegion, UnmapRegion
  std::string name;   // RegionCreate, RegionOpen, RegionDelete
  std::vector<std::string> fd_kinds;
  std::optional<Mapping> mapping;  // MapRegion, UnmapRegion: the client's mapping at base then
};

// A fake daemon's answer to one request.
struct Answer {
  enum Kind { kReply, kSilent, kHangUp } kind = kReply;
  proto::Message message;
  int attach_fd = -1;  // a descriptor to send with it (the fake keeps it)

  static Answer Reply(proto::Message m, int fd = -1) { return Answer{kReply, std::move(m), fd}; }
  static Answer WithStatus(StatusCode code, std::string text) {
    return Reply(proto::StatusReply{static_cast<uint16_t>(code), std::move(text)});
  }
  static Answer Silent() { return Answer{kSilent, {}, -1}; }
  static Answer HangUp() { return Answer{kHangUp, {}, -1}; }
};

class FakeDaemon {
 public:
  FakeDaemon() {
    char tmpl[] = "/tmp/dsvm_client_test.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    path_ = dir_ + "/node.sock";
    listen_.reset(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path_.c_str());
    EXPECT_EQ(::bind(listen_.get(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    EXPECT_EQ(::listen(listen_.get(), 8), 0);
    wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    thread_ = std::thread([this] { Serve(); });
  }

  ~FakeDaemon() {
    stop_ = true;
    Wake();
    thread_.join();
    std::filesystem::remove_all(dir_);
  }

  const std::string& path() const { return path_; }
  const std::string& dir() const { return dir_; }

  // fork() with the serving thread parked: a thread inside malloc at the
  // moment of fork leaves the allocator's lock held in the child forever
  // (AddressSanitizer's allocator is not fork-safe).
  pid_t ForkQuiet() {
    {
      std::unique_lock<std::mutex> l(mu_);
      park_requested_ = true;
    }
    Wake();
    {
      std::unique_lock<std::mutex> l(mu_);
      park_cv_.wait(l, [this] { return parked_; });
    }
    const pid_t pid = ::fork();
    if (pid != 0) {
      std::lock_guard<std::mutex> l(mu_);
      park_requested_ = false;
      park_cv_.notify_all();
    }
    return pid;
  }

  // Where the next created region goes.
  void SetNextBase(uint64_t base) {
    std::lock_guard<std::mutex> l(mu_);
    next_base_ = base;
  }
  // Answers requests of `type` with `fn` while it returns an answer.
  void Override(proto::MessageType type,
                std::function<std::optional<Answer>(const proto::Frame&)> fn) {
    std::lock_guard<std::mutex> l(mu_);
    overrides_[type] = std::move(fn);
  }
  // A region as if created earlier by another process.
  void AddRegion(const std::string& name, uint64_t base, uint64_t size, uint32_t page_size) {
    std::lock_guard<std::mutex> l(mu_);
    AddRegionLocked(name, base, size, page_size);
  }
  // The memfd behind region `name` (owned by the fake), or -1.
  int MemfdOf(const std::string& name) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = regions_.find(name);
    return it == regions_.end() ? -1 : it->second.memfd.get();
  }
  bool HasRegion(const std::string& name) {
    std::lock_guard<std::mutex> l(mu_);
    return regions_.count(name) != 0;
  }
  std::vector<Seen> seen() {
    std::lock_guard<std::mutex> l(mu_);
    return seen_;
  }
  std::vector<proto::MessageType> seen_types() {
    std::vector<proto::MessageType> t;
    for (const Seen& s : seen()) t.push_back(s.type);
    return t;
  }
  int connections_closed() {
    std::lock_guard<std::mutex> l(mu_);
    return closed_;
  }
  // Closes every client connection, as a dying daemon does; returns once done.
  void HangUpAll() {
    hang_up_ = true;
    Wake();
    while (hang_up_) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  // Waits until `n` client connections were closed (by the client or the fake).
  bool WaitClosed(int n) {
    for (int i = 0; i < 2000; ++i) {
      if (connections_closed() >= n) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  }

 private:
  struct Region {
    proto::RegionReply info;
    UniqueFd memfd;
  };

  void Wake() {
    const uint64_t one = 1;
    EXPECT_EQ(::write(wake_.get(), &one, sizeof(one)), 8);
  }

  // REQUIRES: mu_ held.
  void AddRegionLocked(const std::string& name, uint64_t base, uint64_t size, uint32_t page_size) {
    Region r;
    r.info = proto::RegionReply{++next_id_, base, size, page_size, name};
    r.memfd.reset(::memfd_create(name.c_str(), MFD_CLOEXEC));
    EXPECT_TRUE(r.memfd.valid());
    EXPECT_EQ(::ftruncate(r.memfd.get(), static_cast<off_t>(size)), 0);
    regions_[name] = std::move(r);
  }

  void Serve() {
    std::vector<UniqueFd> clients;
    while (!stop_) {
      std::vector<pollfd> p = {{listen_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
      for (auto& c : clients) p.push_back({c.get(), POLLIN, 0});
      if (::poll(p.data(), p.size(), -1) < 0) continue;
      if (p[1].revents) {
        uint64_t v;
        EXPECT_EQ(::read(wake_.get(), &v, sizeof(v)), 8);
        if (park_requested_) {  // ForkQuiet: hold still, touching no allocator
          std::unique_lock<std::mutex> l(mu_);
          parked_ = true;
          park_cv_.notify_all();
          park_cv_.wait(l, [this] { return !park_requested_; });
          parked_ = false;
          continue;
        }
        if (hang_up_) {
          std::lock_guard<std::mutex> l(mu_);
          closed_ += static_cast<int>(clients.size());
          clients.clear();
          hang_up_ = false;
          continue;
        }
      }
      if (p[0].revents) {
        int fd = ::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) clients.emplace_back(fd);
      }
      for (size_t i = 2; i < p.size(); ++i) {
        if (p[i].revents == 0) continue;
        if (!ServeOne(p[i].fd)) {
          std::lock_guard<std::mutex> l(mu_);
          ++closed_;
          std::erase_if(clients, [&](const UniqueFd& c) { return c.get() == p[i].fd; });
          break;  // `p` no longer matches `clients`
        }
      }
    }
  }

  // One request; false when the connection is to be closed.
  bool ServeOne(int fd) {
    std::vector<uint8_t> buf(proto::kHeaderSize + proto::kMaxControlPayload);
    auto got = node::ReceiveFds(fd, buf);
    if (!got.ok()) return false;
    auto frame = proto::Decode(std::span<const uint8_t>(buf.data(), got->bytes));
    EXPECT_TRUE(frame.ok()) << frame.status().ToString();
    if (!frame.ok()) return false;

    Answer answer;
    {
      std::lock_guard<std::mutex> l(mu_);
      Seen s;
      s.type = proto::TypeOf(frame->message);
      s.request_id = frame->header.request_id;
      for (auto& f : got->fds) s.fd_kinds.push_back(FdKind(f.get()));
      std::visit(
          [&](const auto& m) {
            using T = std::decay_t<decltype(m)>;
            if constexpr (std::is_same_v<T, proto::MapRegion> ||
                          std::is_same_v<T, proto::UnmapRegion>) {
              s.base = m.base;
              s.mapping = MappingAt(m.base);
            } else if constexpr (std::is_same_v<T, proto::RegionCreate> ||
                                 std::is_same_v<T, proto::RegionOpen> ||
                                 std::is_same_v<T, proto::RegionDelete>) {
              s.name = m.name;
            }
          },
          frame->message);
      seen_.push_back(s);
      std::optional<Answer> custom;
      if (auto it = overrides_.find(s.type); it != overrides_.end()) custom = it->second(*frame);
      answer = custom ? std::move(*custom) : Standard(frame->message);
    }
    // Drops the descriptors it was handed before answering: the client's
    // own copies are all that remain once it has the answer.
    got->fds.clear();
    if (answer.kind == Answer::kHangUp) return false;
    if (answer.kind == Answer::kSilent) return true;
    std::vector<int> attach;
    if (answer.attach_fd >= 0) attach.push_back(answer.attach_fd);
    Status st = node::SendFds(fd, proto::Encode(answer.message, frame->header.request_id), attach);
    return st.ok();
  }

  // What dsvm-node answers. REQUIRES: mu_ held.
  Answer Standard(const proto::Message& message) {
    return std::visit(
        [&](const auto& m) -> Answer {
          using T = std::decay_t<decltype(m)>;
          if constexpr (std::is_same_v<T, proto::ClientHello>) {
            return Answer::Reply(proto::ClientHelloReply{kNode, kWindowBase, kWindowSize});
          } else if constexpr (std::is_same_v<T, proto::RegionCreate>) {
            if (regions_.count(m.name)) {
              return Answer::WithStatus(StatusCode::kAlreadyExists,
                                        "region '" + m.name + "' exists");
            }
            const uint64_t size = (m.size + m.page_size - 1) / m.page_size * m.page_size;
            AddRegionLocked(m.name, next_base_, size, m.page_size);
            const Region& r = regions_[m.name];
            return Answer::Reply(r.info, r.memfd.get());
          } else if constexpr (std::is_same_v<T, proto::RegionOpen>) {
            auto it = regions_.find(m.name);
            if (it == regions_.end()) {
              return Answer::WithStatus(StatusCode::kNotFound, "no region '" + m.name + "'");
            }
            return Answer::Reply(it->second.info, it->second.memfd.get());
          } else if constexpr (std::is_same_v<T, proto::RegionDelete>) {
            if (regions_.erase(m.name) == 0) {
              return Answer::WithStatus(StatusCode::kNotFound, "no region '" + m.name + "'");
            }
            return Answer::WithStatus(StatusCode::kOk, "");
          } else if constexpr (std::is_same_v<T, proto::MapRegion> ||
                               std::is_same_v<T, proto::UnmapRegion>) {
            return Answer::WithStatus(StatusCode::kOk, "");
          } else {
            ADD_FAILURE() << "the fake daemon got " << proto::TypeName(T::kType);
            return Answer::HangUp();
          }
        },
        message);
  }

  std::string dir_, path_;
  UniqueFd listen_, wake_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> hang_up_{false};
  std::atomic<bool> park_requested_{false};  // ForkQuiet asks the thread to park
  bool parked_ = false;                        // REQUIRES: mu_ held
  std::condition_variable park_cv_;

  std::mutex mu_;
  std::map<proto::MessageType, std::function<std::optional<Answer>(const proto::Frame&)>>
      overrides_;                          // GUARDED_BY(mu_)
  std::map<std::string, Region> regions_;  // GUARDED_BY(mu_)
  uint64_t next_base_ = Base(0);           // GUARDED_BY(mu_)
  proto::RegionId next_id_ = 0;            // GUARDED_BY(mu_)
  std::vector<Seen> seen_;                 // GUARDED_BY(mu_)
  int closed_ = 0;                         // GUARDED_BY(mu_)
};

// --- Fixture ------------------------------------------------------------------------

class ClientApiTest : public ::testing::Test {
 protected:
  void TearDown() override {
    dsvm_finalize();  // NOT_INITIALIZED when the test finalized itself
    client::SetRequestTimeoutForTesting(client::kDefaultRequestTimeout);
  }

  // dsvm_init against the fake, which then has seen ClientHello.
  void Init() { ASSERT_EQ(dsvm_init(daemon_.path().c_str()), DSVM_OK) << dsvm_last_error(); }

  // The fake's records of type t.
  std::vector<Seen> SeenOf(proto::MessageType t) {
    std::vector<Seen> out;
    for (const Seen& s : daemon_.seen()) {
      if (s.type == t) out.push_back(s);
    }
    return out;
  }

  FakeDaemon daemon_;
};

std::string LastError() { return dsvm_last_error(); }

// --- Error codes -------------------------------------------------------------------------

TEST(ClientErrors, StrerrorNamesEveryCode) {
  const int codes[] = {DSVM_OK,
                       DSVM_EINVALID_ARGUMENT,
                       DSVM_ENOT_FOUND,
                       DSVM_EALREADY_EXISTS,
                       DSVM_EPERMISSION_DENIED,
                       DSVM_EUNAVAILABLE,
                       DSVM_EDATA_LOSS,
                       DSVM_ECORRUPTION,
                       DSVM_EIO,
                       DSVM_ERESOURCE_EXHAUSTED,
                       DSVM_EFAILED_PRECONDITION,
                       DSVM_EINTERNAL,
                       DSVM_ENOT_INITIALIZED,
                       DSVM_EBUSY};
  const std::string unknown = dsvm_strerror(12345);
  std::set<std::string> texts;
  for (int c : codes) {
    ASSERT_NE(dsvm_strerror(c), nullptr) << c;
    const std::string text = dsvm_strerror(c);
    EXPECT_FALSE(text.empty()) << c;
    EXPECT_NE(text, unknown) << c;
    texts.insert(text);
  }
  EXPECT_EQ(texts.size(), std::size(codes)) << "two codes share a text";
  for (int c : {1, -12, -31, -34, -1000, INT_MIN, INT_MAX}) {
    ASSERT_NE(dsvm_strerror(c), nullptr);
    EXPECT_EQ(std::string(dsvm_strerror(c)), "unknown dsvm error code") << c;
  }
}

TEST(ClientErrors, CodesMirrorStatusCode) {
  EXPECT_EQ(DSVM_EINVALID_ARGUMENT, -static_cast<int>(StatusCode::kInvalidArgument));
  EXPECT_EQ(DSVM_ENOT_FOUND, -static_cast<int>(StatusCode::kNotFound));
  EXPECT_EQ(DSVM_EALREADY_EXISTS, -static_cast<int>(StatusCode::kAlreadyExists));
  EXPECT_EQ(DSVM_EPERMISSION_DENIED, -static_cast<int>(StatusCode::kPermissionDenied));
  EXPECT_EQ(DSVM_EUNAVAILABLE, -static_cast<int>(StatusCode::kUnavailable));
  EXPECT_EQ(DSVM_EDATA_LOSS, -static_cast<int>(StatusCode::kDataLoss));
  EXPECT_EQ(DSVM_ECORRUPTION, -static_cast<int>(StatusCode::kCorruption));
  EXPECT_EQ(DSVM_EIO, -static_cast<int>(StatusCode::kIoError));
  EXPECT_EQ(DSVM_ERESOURCE_EXHAUSTED, -static_cast<int>(StatusCode::kResourceExhausted));
  EXPECT_EQ(DSVM_EFAILED_PRECONDITION, -static_cast<int>(StatusCode::kFailedPrecondition));
  EXPECT_EQ(DSVM_EINTERNAL, -static_cast<int>(StatusCode::kInternal));
}

// --- Before init ---------------------------------------------------------------------------

TEST(ClientUninitialized, EveryCallSaysNotInitialized) {
  void* addr = nullptr;
  size_t size = 0;
  uint32_t id = 0;
  EXPECT_EQ(dsvm_region_create("a", 4096, 0, &addr), DSVM_ENOT_INITIALIZED);
  EXPECT_NE(LastError().find("dsvm_init"), std::string::npos) << LastError();
  EXPECT_EQ(dsvm_region_open("a", &addr, &size), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_region_close(reinterpret_cast<void*>(Base(0))), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_region_destroy("a"), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_node_id(&id), DSVM_ENOT_INITIALIZED);
  dsvm_node_stats_t stats;
  EXPECT_EQ(dsvm_stats(&stats), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_prefetch(reinterpret_cast<void*>(Base(0)), 4096, 0), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_advise(reinterpret_cast<void*>(Base(0)), 4096, DSVM_ADVICE_READ_MOSTLY, 0),
            DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_finalize(), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(addr, nullptr);
  alignas(16) static dsvm_lock_t lock;
  alignas(16) static dsvm_barrier_t barrier;
  EXPECT_EQ(dsvm_lock_init(&lock), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_lock_acquire(&lock), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_lock_try_acquire(&lock), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_lock_release(&lock), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_barrier_init(&barrier, 2), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_barrier_wait(&barrier), DSVM_ENOT_INITIALIZED);
  // Bad arguments are refused as such, initialised or not.
  EXPECT_EQ(dsvm_region_create(nullptr, 4096, 0, &addr), DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(dsvm_node_id(nullptr), DSVM_EINVALID_ARGUMENT);
}

TEST(ClientInit, NoDaemonIsUnavailable) {
  char tmpl[] = "/tmp/dsvm_client_test.XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  const std::string missing = dir + "/nobody.sock";
  EXPECT_EQ(dsvm_init(missing.c_str()), DSVM_EUNAVAILABLE);
  EXPECT_NE(LastError().find(missing), std::string::npos) << LastError();
  // A file that is not a listening socket.
  const std::string file = dir + "/plain";
  std::ofstream(file) << "x";
  EXPECT_EQ(dsvm_init(file.c_str()), DSVM_EUNAVAILABLE) << LastError();
  // A socket nobody listens on any more.
  {
    UniqueFd s(::socket(AF_UNIX, SOCK_SEQPACKET, 0));
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    const std::string stale = dir + "/stale.sock";
    std::snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", stale.c_str());
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    s.reset();
    EXPECT_EQ(dsvm_init(stale.c_str()), DSVM_EUNAVAILABLE) << LastError();
  }
  std::filesystem::remove_all(dir);
  uint32_t id;
  EXPECT_EQ(dsvm_node_id(&id), DSVM_ENOT_INITIALIZED);
}

TEST(ClientInit, BadPathsAreInvalid) {
  EXPECT_EQ(dsvm_init(""), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("empty"), std::string::npos) << LastError();
  const std::string long_path = "/tmp/" + std::string(200, 'x');
  EXPECT_EQ(dsvm_init(long_path.c_str()), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("longer"), std::string::npos) << LastError();
}

TEST(ClientInit, NullPathUsesEnvironmentThenDefault) {
  char tmpl[] = "/tmp/dsvm_client_test.XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  const std::string missing = dir + "/from-env.sock";
  ASSERT_EQ(::setenv("DSVM_SOCKET", missing.c_str(), 1), 0);
  EXPECT_EQ(dsvm_init(nullptr), DSVM_EUNAVAILABLE);
  EXPECT_NE(LastError().find(missing), std::string::npos) << LastError();
  ASSERT_EQ(::setenv("DSVM_SOCKET", "", 1), 0);
  int rc = dsvm_init(nullptr);
  if (rc == DSVM_OK) {
    dsvm_finalize();  // a real daemon runs here
  } else {
    EXPECT_NE(LastError().find(DSVM_DEFAULT_SOCKET), std::string::npos) << LastError();
  }
  ASSERT_EQ(::unsetenv("DSVM_SOCKET"), 0);
  rc = dsvm_init(nullptr);
  if (rc == DSVM_OK) {
    dsvm_finalize();
  } else {
    EXPECT_NE(LastError().find(DSVM_DEFAULT_SOCKET), std::string::npos) << LastError();
  }
  std::filesystem::remove_all(dir);
}

TEST_F(ClientApiTest, NullPathUsesDsvmSocket) {
  ASSERT_EQ(::setenv("DSVM_SOCKET", daemon_.path().c_str(), 1), 0);
  const int rc = dsvm_init(nullptr);
  ::unsetenv("DSVM_SOCKET");
  ASSERT_EQ(rc, DSVM_OK) << LastError();
  EXPECT_STREQ(dsvm_last_error(), "");
}

TEST_F(ClientApiTest, HelloGivesNodeId) {
  Init();
  uint32_t id = 0;
  EXPECT_EQ(dsvm_node_id(&id), DSVM_OK);
  EXPECT_EQ(id, kNode);
  EXPECT_EQ(dsvm_node_id(nullptr), DSVM_EINVALID_ARGUMENT);
  const auto seen = daemon_.seen();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].type, proto::MessageType::kClientHello);
  EXPECT_EQ(seen[0].request_id, 1u);
}

TEST_F(ClientApiTest, StatsCopiesEveryCounterOfTheDaemon) {
  Init();
  proto::NodeStatsReply reply{kNode, 3, {}};
  reply.counters = proto::NodeCounters{.read_faults = 11,
                                       .write_faults = 12,
                                       .local_hits = 13,
                                       .pages_fetched = 14,
                                       .pages_sent = 15,
                                       .bytes_fetched = 16,
                                       .bytes_sent = 17,
                                       .invalidations = 18,
                                       .downgrades = 19,
                                       .prefetched_pages = 1ull << 40,
                                       .gpu_maps = 21,
                                       .gpu_zero_copy_maps = 22,
                                       .gpu_maps_lost = 23,
                                       .gpu_placed_pages = 24,
                                       .gpu_pages_in = 25,
                                       .gpu_pages_out = 1ull << 41,
                                       .fences = 26,
                                       .fenced_accesses = 1ull << 42,
                                       .direct_reads = 27,
                                       .direct_reads_served = 1ull << 43,
                                       .gpu_direct_pages_in = 28,
                                       .gpu_direct_pages_out = 1ull << 44};
  daemon_.Override(proto::MessageType::kNodeStats,
                   [&](const proto::Frame&) { return Answer::Reply(reply); });
  dsvm_node_stats_t s;
  std::memset(&s, 0xAB, sizeof(s));
  ASSERT_EQ(dsvm_stats(&s), DSVM_OK) << LastError();
  EXPECT_EQ(s.node, kNode);
  EXPECT_EQ(s.clients, 3u);
  EXPECT_EQ(s.read_faults, 11u);
  EXPECT_EQ(s.write_faults, 12u);
  EXPECT_EQ(s.local_hits, 13u);
  EXPECT_EQ(s.pages_fetched, 14u);
  EXPECT_EQ(s.pages_sent, 15u);
  EXPECT_EQ(s.bytes_fetched, 16u);
  EXPECT_EQ(s.bytes_sent, 17u);
  EXPECT_EQ(s.invalidations, 18u);
  EXPECT_EQ(s.downgrades, 19u);
  EXPECT_EQ(s.prefetched_pages, 1ull << 40);
  EXPECT_EQ(s.gpu_maps, 21u);
  EXPECT_EQ(s.gpu_zero_copy_maps, 22u);
  EXPECT_EQ(s.gpu_maps_lost, 23u);
  EXPECT_EQ(s.gpu_placed_pages, 24u);
  EXPECT_EQ(s.gpu_pages_in, 25u);
  EXPECT_EQ(s.gpu_pages_out, 1ull << 41);
  EXPECT_EQ(s.fences, 26u);
  EXPECT_EQ(s.fenced_accesses, 1ull << 42);
  EXPECT_EQ(s.direct_reads, 27u);
  EXPECT_EQ(s.direct_reads_served, 1ull << 43);
  EXPECT_EQ(s.gpu_direct_pages_in, 28u);
  EXPECT_EQ(s.gpu_direct_pages_out, 1ull << 44);
  EXPECT_EQ(dsvm_stats(nullptr), DSVM_EINVALID_ARGUMENT);

  // Another node's counters: the daemon broke the protocol.
  reply.node = kNode + 1;
  EXPECT_EQ(dsvm_stats(&s), DSVM_EINTERNAL);
  EXPECT_NE(LastError().find("NodeStats"), std::string::npos) << LastError();
}

TEST_F(ClientApiTest, DoubleInitIsRefused) {
  Init();
  EXPECT_EQ(dsvm_init(daemon_.path().c_str()), DSVM_EFAILED_PRECONDITION);
  EXPECT_NE(LastError().find("already"), std::string::npos) << LastError();
  uint32_t id = 0;
  EXPECT_EQ(dsvm_node_id(&id), DSVM_OK);  // the first connection still serves
  EXPECT_EQ(dsvm_finalize(), DSVM_OK);
  EXPECT_EQ(dsvm_finalize(), DSVM_ENOT_INITIALIZED);
  Init();  // and again after finalize
}

TEST_F(ClientApiTest, HelloRefusals) {
  daemon_.Override(proto::MessageType::kClientHello, [](const proto::Frame&) {
    return Answer::WithStatus(StatusCode::kInvalidArgument, "client ABI 1, daemon speaks 2");
  });
  EXPECT_EQ(dsvm_init(daemon_.path().c_str()), DSVM_EFAILED_PRECONDITION);
  EXPECT_NE(LastError().find("daemon speaks 2"), std::string::npos) << LastError();
  daemon_.Override(proto::MessageType::kClientHello, [](const proto::Frame&) {
    return Answer::WithStatus(StatusCode::kPermissionDenied, "uid 1000 may not connect");
  });
  EXPECT_EQ(dsvm_init(daemon_.path().c_str()), DSVM_EPERMISSION_DENIED);
  EXPECT_NE(LastError().find("uid 1000"), std::string::npos) << LastError();
  daemon_.Override(proto::MessageType::kClientHello, [](const proto::Frame&) {
    return Answer::Reply(proto::ClientHelloReply{proto::kNoNode, kWindowBase, kWindowSize});
  });
  EXPECT_EQ(dsvm_init(daemon_.path().c_str()), DSVM_EINTERNAL);
  daemon_.Override(proto::MessageType::kClientHello,
                   [](const proto::Frame&) { return Answer::HangUp(); });
  EXPECT_EQ(dsvm_init(daemon_.path().c_str()), DSVM_EUNAVAILABLE);
  uint32_t id;
  EXPECT_EQ(dsvm_node_id(&id), DSVM_ENOT_INITIALIZED);
}

// --- Argument checks ---------------------------------------------------------------------------

TEST_F(ClientApiTest, BadArgumentsAreRefusedBeforeAnyRequest) {
  Init();
  void* addr = reinterpret_cast<void*>(0x1);
  size_t size = 0;
  const std::string too_long(DSVM_MAX_NAME_LENGTH + 1, 'n');
  const std::string longest(DSVM_MAX_NAME_LENGTH, 'n');
  for (const char* bad : {static_cast<const char*>(nullptr), "", too_long.c_str(), ".hidden",
                          "has space", "a/b", "tab\t", "\xc3\xa9t\xc3\xa9"}) {
    SCOPED_TRACE(bad ? bad : "(null)");
    EXPECT_EQ(dsvm_region_create(bad, 4096, 0, &addr), DSVM_EINVALID_ARGUMENT);
    EXPECT_FALSE(LastError().empty());
    EXPECT_EQ(dsvm_region_open(bad, &addr, &size), DSVM_EINVALID_ARGUMENT);
    EXPECT_EQ(dsvm_region_destroy(bad), DSVM_EINVALID_ARGUMENT);
  }
  EXPECT_EQ(dsvm_region_create("ok", 0, 0, &addr), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("size is 0"), std::string::npos) << LastError();
  for (size_t page :
       {size_t{1}, size_t{512}, size_t{8192}, size_t{1} << 20, size_t{4} << 20, SIZE_MAX}) {
    EXPECT_EQ(dsvm_region_create("ok", 4096, page, &addr), DSVM_EINVALID_ARGUMENT) << page;
    EXPECT_NE(LastError().find("page size"), std::string::npos) << LastError();
  }
  EXPECT_EQ(dsvm_region_create("ok", 4096, 0, nullptr), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("addr is NULL"), std::string::npos) << LastError();
  EXPECT_EQ(dsvm_region_open("ok", nullptr, &size), DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(dsvm_region_close(nullptr), DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(dsvm_region_close(reinterpret_cast<void*>(Base(3))), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("not the address of a region"), std::string::npos) << LastError();
  EXPECT_EQ(dsvm_region_close(&size), DSVM_EINVALID_ARGUMENT);
  // Larger than the whole window: refused here, as the coordinator would.
  EXPECT_EQ(dsvm_region_create("ok", kWindowSize + 1, 0, &addr), DSVM_ERESOURCE_EXHAUSTED);
  EXPECT_EQ(dsvm_region_create("ok", SIZE_MAX, DSVM_PAGE_SIZE_2M, &addr), DSVM_ERESOURCE_EXHAUSTED);
  // Access attributes and tokens.
  dsvm_region_attr_t attr{};
  EXPECT_EQ(dsvm_region_create_attr("ok", 4096, nullptr, &addr), DSVM_EINVALID_ARGUMENT);
  attr.mode = 01000;
  EXPECT_EQ(dsvm_region_create_attr("ok", 4096, &attr, &addr), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("0777"), std::string::npos) << LastError();
  attr.mode = 0660;
  attr.token = "";
  EXPECT_EQ(dsvm_region_create_attr("ok", 4096, &attr, &addr), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("token is empty"), std::string::npos) << LastError();
  const std::string long_token(256, 't');
  attr.token = long_token.c_str();
  EXPECT_EQ(dsvm_region_create_attr("ok", 4096, &attr, &addr), DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(dsvm_region_open_token("ok", nullptr, &addr, &size), DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(dsvm_region_open_token("ok", "", &addr, &size), DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(dsvm_region_open_token("ok", long_token.c_str(), &addr, &size),
            DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(addr, reinterpret_cast<void*>(0x1)) << "a refused call wrote *addr";
  // Nothing of it reached the daemon.
  EXPECT_EQ(daemon_.seen_types(),
            std::vector<proto::MessageType>{proto::MessageType::kClientHello});
  // The longest name and every allowed character pass the check.
  EXPECT_EQ(dsvm_region_open(longest.c_str(), &addr, &size), DSVM_ENOT_FOUND);
  EXPECT_EQ(dsvm_region_open("Az09._-x", &addr, &size), DSVM_ENOT_FOUND);
}

// --- Regions against the fake daemon -------------------------------------------------------

TEST_F(ClientApiTest, CreateMapsTheRegionAtItsBase) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(1));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("alpha", 3 * 4096 + 1, 0, &addr), DSVM_OK) << LastError();
  EXPECT_STREQ(dsvm_last_error(), "");
  ASSERT_EQ(addr, reinterpret_cast<void*>(Base(1)));
  auto m = MappingAt(Base(1));
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->end, Base(1) + 4 * 4096);  // rounded up to whole pages
  EXPECT_EQ(m->perms, "rw-s");

  // The requests, in order, with increasing ids.
  const auto seen = daemon_.seen();
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[1].type, proto::MessageType::kRegionCreate);
  EXPECT_EQ(seen[1].name, "alpha");
  EXPECT_EQ(seen[2].type, proto::MessageType::kMapRegion);
  EXPECT_EQ(seen[2].base, Base(1));
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i].request_id, i + 1);
  // MapRegion came with [userfaultfd, pidfd], the memfd already mapped.
  ASSERT_EQ(seen[2].fd_kinds.size(), 2u);
  EXPECT_EQ(seen[2].fd_kinds[0], "anon_inode:[userfaultfd]");
  EXPECT_EQ(seen[2].fd_kinds[1], "anon_inode:[pidfd]");
  ASSERT_TRUE(seen[2].mapping.has_value());
  // The client kept no copy of the userfaultfd nor of the memfd.
  EXPECT_EQ(CountFdsOfKind("anon_inode:[userfaultfd]"), 0);
  EXPECT_EQ(CountFdsOfKind("anon_inode:[pidfd]"), 0);

  // The mapping is the daemon's memfd (the fake registered nothing, so a
  // store goes straight to the file).
  static_cast<volatile uint8_t*>(addr)[4096 + 5] = 0x5A;
  uint8_t byte = 0;
  ASSERT_EQ(::pread(daemon_.MemfdOf("alpha"), &byte, 1, 4096 + 5), 1);
  EXPECT_EQ(byte, 0x5A);
  EXPECT_EQ(dsvm_region_close(addr), DSVM_OK) << LastError();
}

TEST_F(ClientApiTest, CreateWithLargePages) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(2));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("huge", 1, DSVM_PAGE_SIZE_2M, &addr), DSVM_OK) << LastError();
  EXPECT_EQ(addr, reinterpret_cast<void*>(Base(2)));
  auto m = MappingAt(Base(2));
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->end, Base(2) + DSVM_PAGE_SIZE_2M);
}

TEST_F(ClientApiTest, OpenReturnsAddressAndSize) {
  SKIP_WITHOUT_UFFD();
  daemon_.AddRegion("beta", Base(4), 16 * 65536, 65536);
  Init();
  void* addr = nullptr;
  size_t size = 0;
  ASSERT_EQ(dsvm_region_open("beta", &addr, &size), DSVM_OK) << LastError();
  EXPECT_EQ(addr, reinterpret_cast<void*>(Base(4)));
  EXPECT_EQ(size, 16u * 65536);
  ASSERT_TRUE(MappingAt(Base(4)).has_value());
  // Open twice in one process: refused, the first mapping untouched.
  void* again = nullptr;
  EXPECT_EQ(dsvm_region_open("beta", &again, nullptr), DSVM_EFAILED_PRECONDITION);
  EXPECT_NE(LastError().find("open already"), std::string::npos) << LastError();
  EXPECT_EQ(again, nullptr);
  EXPECT_EQ(SeenOf(proto::MessageType::kRegionOpen).size(), 1u);
  // size may be NULL.
  ASSERT_EQ(dsvm_region_close(addr), DSVM_OK);
  ASSERT_EQ(dsvm_region_open("beta", &addr, nullptr), DSVM_OK) << LastError();
  EXPECT_EQ(addr, reinterpret_cast<void*>(Base(4)));
}

TEST_F(ClientApiTest, DaemonRefusalsKeepTheirCode) {
  Init();
  for (StatusCode code :
       {StatusCode::kInvalidArgument, StatusCode::kNotFound, StatusCode::kAlreadyExists,
        StatusCode::kPermissionDenied, StatusCode::kUnavailable, StatusCode::kDataLoss,
        StatusCode::kCorruption, StatusCode::kIoError, StatusCode::kResourceExhausted,
        StatusCode::kFailedPrecondition, StatusCode::kInternal}) {
    SCOPED_TRACE(std::string(StatusCodeName(code)));
    daemon_.Override(proto::MessageType::kRegionOpen, [code](const proto::Frame&) {
      return Answer::WithStatus(code, "because of reasons");
    });
    void* addr = nullptr;
    EXPECT_EQ(dsvm_region_open("gamma", &addr, nullptr), -static_cast<int>(code));
    EXPECT_NE(LastError().find("because of reasons"), std::string::npos) << LastError();
    EXPECT_NE(LastError().find("gamma"), std::string::npos) << LastError();
    EXPECT_EQ(addr, nullptr);
  }
  // The connection survived every refusal.
  uint32_t id;
  EXPECT_EQ(dsvm_node_id(&id), DSVM_OK);
  daemon_.Override(proto::MessageType::kRegionOpen,
                   [](const proto::Frame&) { return std::optional<Answer>(); });
  void* addr = nullptr;
  EXPECT_EQ(dsvm_region_open("gamma", &addr, nullptr), DSVM_ENOT_FOUND);
  EXPECT_EQ(dsvm_region_destroy("gamma"), DSVM_ENOT_FOUND);
}

TEST_F(ClientApiTest, CreateOfAnExistingNameIsAlreadyExists) {
  daemon_.AddRegion("taken", Base(5), 4096, 4096);
  Init();
  void* addr = nullptr;
  EXPECT_EQ(dsvm_region_create("taken", 4096, 0, &addr), DSVM_EALREADY_EXISTS);
  EXPECT_NE(LastError().find("exists"), std::string::npos) << LastError();
  EXPECT_TRUE(daemon_.HasRegion("taken"));  // no rollback of someone else's region
  EXPECT_TRUE(SeenOf(proto::MessageType::kRegionDelete).empty());
}

TEST_F(ClientApiTest, RefusedMapRegionUnmapsAndCreateIsUndone) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(6));
  daemon_.Override(proto::MessageType::kMapRegion, [](const proto::Frame&) {
    return Answer::WithStatus(StatusCode::kFailedPrecondition, "kernel lacks minor faults");
  });
  void* addr = nullptr;
  EXPECT_EQ(dsvm_region_create("delta", 4096, 0, &addr), DSVM_EFAILED_PRECONDITION);
  EXPECT_NE(LastError().find("minor faults"), std::string::npos) << LastError();
  EXPECT_NE(LastError().find("deleted again"), std::string::npos) << LastError();
  EXPECT_EQ(addr, nullptr);
  EXPECT_FALSE(MappingAt(Base(6)).has_value());
  EXPECT_FALSE(daemon_.HasRegion("delta"));
  ASSERT_EQ(SeenOf(proto::MessageType::kRegionDelete).size(), 1u);
  // Open is not undone: the region was there before.
  daemon_.AddRegion("epsilon", Base(7), 4096, 4096);
  EXPECT_EQ(dsvm_region_open("epsilon", &addr, nullptr), DSVM_EFAILED_PRECONDITION);
  EXPECT_FALSE(MappingAt(Base(7)).has_value());
  EXPECT_TRUE(daemon_.HasRegion("epsilon"));
  EXPECT_EQ(CountFdsOfKind("anon_inode:[userfaultfd]"), 0);
}

TEST_F(ClientApiTest, TakenAddressRangeIsResourceExhausted) {
  SKIP_WITHOUT_UFFD();
  Init();
  void* squatter = ::mmap(reinterpret_cast<void*>(Base(8)), 4096, PROT_READ,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  ASSERT_EQ(squatter, reinterpret_cast<void*>(Base(8)));
  daemon_.SetNextBase(Base(8));
  void* addr = nullptr;
  EXPECT_EQ(dsvm_region_create("zeta", 8192, 0, &addr), DSVM_ERESOURCE_EXHAUSTED);
  EXPECT_NE(LastError().find("something else is mapped"), std::string::npos) << LastError();
  EXPECT_FALSE(daemon_.HasRegion("zeta"));
  EXPECT_TRUE(SeenOf(proto::MessageType::kMapRegion).empty());
  auto m = MappingAt(Base(8));
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->perms, "r--p");  // the squatter is untouched
  ::munmap(squatter, 4096);
}

TEST_F(ClientApiTest, CloseSendsUnmapRegionThenUnmaps) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(9));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("eta", 3 * 4096, 0, &addr), DSVM_OK) << LastError();
  // Not the start of the region: refused, with the start named.
  EXPECT_EQ(dsvm_region_close(static_cast<char*>(addr) + 4096), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("inside region 'eta'"), std::string::npos) << LastError();
  ASSERT_TRUE(MappingAt(Base(9)).has_value());

  EXPECT_EQ(dsvm_region_close(addr), DSVM_OK) << LastError();
  const auto unmaps = SeenOf(proto::MessageType::kUnmapRegion);
  ASSERT_EQ(unmaps.size(), 1u);
  EXPECT_EQ(unmaps[0].base, Base(9));
  EXPECT_TRUE(unmaps[0].mapping.has_value()) << "unmapped before the daemon was told";
  EXPECT_TRUE(unmaps[0].fd_kinds.empty());
  EXPECT_FALSE(MappingAt(Base(9)).has_value());
  EXPECT_EQ(dsvm_region_close(addr), DSVM_EINVALID_ARGUMENT);  // closed already
  EXPECT_TRUE(daemon_.HasRegion("eta"));                       // close keeps the region
}

TEST_F(ClientApiTest, CloseReportsADaemonRefusalButReleases) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(10));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("theta", 4096, 0, &addr), DSVM_OK) << LastError();
  daemon_.Override(proto::MessageType::kUnmapRegion, [](const proto::Frame&) {
    return Answer::WithStatus(StatusCode::kNotFound, "region not mapped by this client");
  });
  EXPECT_EQ(dsvm_region_close(addr), DSVM_ENOT_FOUND);
  EXPECT_NE(LastError().find("released here"), std::string::npos) << LastError();
  EXPECT_FALSE(MappingAt(Base(10)).has_value());
  EXPECT_EQ(dsvm_region_close(addr), DSVM_EINVALID_ARGUMENT);
}

TEST_F(ClientApiTest, DestroyIsRefusedWhileOpenHere) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(11));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("iota", 4096, 0, &addr), DSVM_OK) << LastError();
  EXPECT_EQ(dsvm_region_destroy("iota"), DSVM_EFAILED_PRECONDITION);
  EXPECT_NE(LastError().find("close it first"), std::string::npos) << LastError();
  EXPECT_TRUE(SeenOf(proto::MessageType::kRegionDelete).empty());
  ASSERT_EQ(dsvm_region_close(addr), DSVM_OK);
  EXPECT_EQ(dsvm_region_destroy("iota"), DSVM_OK) << LastError();
  EXPECT_FALSE(daemon_.HasRegion("iota"));
  EXPECT_EQ(dsvm_region_destroy("iota"), DSVM_ENOT_FOUND);
}

TEST_F(ClientApiTest, FinalizeClosesEveryRegion) {
  SKIP_WITHOUT_UFFD();
  Init();
  void* a = nullptr;
  void* b = nullptr;
  daemon_.SetNextBase(Base(12));
  ASSERT_EQ(dsvm_region_create("kappa", 4096, 0, &a), DSVM_OK) << LastError();
  daemon_.SetNextBase(Base(13));
  ASSERT_EQ(dsvm_region_create("lambda", 4096, 0, &b), DSVM_OK) << LastError();
  EXPECT_EQ(dsvm_finalize(), DSVM_OK) << LastError();
  std::set<uint64_t> unmapped;
  for (const Seen& s : SeenOf(proto::MessageType::kUnmapRegion)) {
    EXPECT_TRUE(s.mapping.has_value());
    unmapped.insert(s.base);
  }
  EXPECT_EQ(unmapped, (std::set<uint64_t>{Base(12), Base(13)}));
  EXPECT_FALSE(MappingAt(Base(12)).has_value());
  EXPECT_FALSE(MappingAt(Base(13)).has_value());
  EXPECT_TRUE(daemon_.WaitClosed(1)) << "the connection stayed open";
  uint32_t id;
  EXPECT_EQ(dsvm_node_id(&id), DSVM_ENOT_INITIALIZED);
  EXPECT_EQ(dsvm_region_close(a), DSVM_ENOT_INITIALIZED);
  // A new connection starts with request id 1 again.
  Init();
  EXPECT_EQ(daemon_.seen().back().request_id, 1u);
}

TEST_F(ClientApiTest, DaemonDeathMakesRegionsInaccessible) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(14));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("mu", 2 * 4096, 0, &addr), DSVM_OK) << LastError();
  daemon_.HangUpAll();
  // The watcher notices without any call from the application.
  bool revoked = false;
  for (int i = 0; i < 2000 && !revoked; ++i) {
    auto m = MappingAt(Base(14));
    revoked = m.has_value() && m->perms == "---s";
    if (!revoked) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(revoked) << "the region stayed accessible without its daemon";
  void* other = nullptr;
  EXPECT_EQ(dsvm_region_create("nu", 4096, 0, &other), DSVM_EUNAVAILABLE);
  EXPECT_NE(LastError().find("closed the connection"), std::string::npos) << LastError();
  EXPECT_EQ(dsvm_region_open("nu", &other, nullptr), DSVM_EUNAVAILABLE);
  EXPECT_EQ(dsvm_region_destroy("nu"), DSVM_EUNAVAILABLE);
  uint32_t id = 0;
  EXPECT_EQ(dsvm_node_id(&id), DSVM_OK);  // known locally
  // Close still releases the reservation; nobody is left to tell.
  EXPECT_EQ(dsvm_region_close(addr), DSVM_OK) << LastError();
  EXPECT_FALSE(MappingAt(Base(14)).has_value());
  EXPECT_EQ(dsvm_finalize(), DSVM_OK);
  Init();  // and a new connection works
}

TEST_F(ClientApiTest, DaemonDeathDuringARequest) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(15));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("xi", 4096, 0, &addr), DSVM_OK) << LastError();
  daemon_.Override(proto::MessageType::kRegionOpen,
                   [](const proto::Frame&) { return Answer::HangUp(); });
  void* other = nullptr;
  EXPECT_EQ(dsvm_region_open("omicron", &other, nullptr), DSVM_EUNAVAILABLE);
  auto m = MappingAt(Base(15));
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->perms, "---s");
  EXPECT_EQ(dsvm_finalize(), DSVM_OK);
  EXPECT_FALSE(MappingAt(Base(15)).has_value());
}

TEST_F(ClientApiTest, SilentDaemonTimesOut) {
  client::SetRequestTimeoutForTesting(std::chrono::milliseconds(100));
  Init();
  daemon_.Override(proto::MessageType::kRegionOpen,
                   [](const proto::Frame&) { return Answer::Silent(); });
  void* addr = nullptr;
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(dsvm_region_open("pi", &addr, nullptr), DSVM_EUNAVAILABLE);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_NE(LastError().find("did not answer"), std::string::npos) << LastError();
  // The connection is given up: a late answer could not be matched.
  EXPECT_TRUE(daemon_.WaitClosed(1));
  EXPECT_EQ(dsvm_region_destroy("pi"), DSVM_EUNAVAILABLE);
  EXPECT_NE(LastError().find("broke earlier"), std::string::npos) << LastError();
}

TEST_F(ClientApiTest, ProtocolViolationsAreInternal) {
  SKIP_WITHOUT_UFFD();
  Init();
  // A RegionReply without its memfd: the daemon broke the protocol, and the
  // connection is given up.
  daemon_.Override(proto::MessageType::kRegionOpen, [](const proto::Frame&) {
    return Answer::Reply(proto::RegionReply{1, Base(16), 4096, 4096, "rho"});
  });
  void* addr = nullptr;
  EXPECT_EQ(dsvm_region_open("rho", &addr, nullptr), DSVM_EINTERNAL);
  EXPECT_NE(LastError().find("RegionReply"), std::string::npos) << LastError();
  EXPECT_TRUE(daemon_.WaitClosed(1));
  EXPECT_EQ(dsvm_region_open("rho", &addr, nullptr), DSVM_EUNAVAILABLE);
}

TEST_F(ClientApiTest, ImplausibleRegionRepliesAreInternal) {
  SKIP_WITHOUT_UFFD();
  Init();
  UniqueFd small(::memfd_create("small", MFD_CLOEXEC));
  ASSERT_EQ(::ftruncate(small.get(), 4096), 0);
  struct Case {
    const char* why;
    proto::RegionReply reply;
  };
  const Case cases[] = {
      {"another name", {1, Base(17), 4096, 4096, "other"}},
      {"outside the window", {1, kWindowBase - kGranule, 4096, 4096, "sigma"}},
      {"past the window's end", {1, kWindowBase + kWindowSize - 4096, 8192, 4096, "sigma"}},
      {"unaligned base", {1, Base(17) + 4096, 65536, 65536, "sigma"}},
      {"bad page size", {1, Base(17), 8192, 8192, "sigma"}},
      {"memfd smaller than the region", {1, Base(17), 8192, 4096, "sigma"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.why);
    daemon_.Override(proto::MessageType::kRegionOpen,
                     [&](const proto::Frame&) { return Answer::Reply(c.reply, small.get()); });
    void* addr = nullptr;
    EXPECT_EQ(dsvm_region_open("sigma", &addr, nullptr), DSVM_EINTERNAL);
    EXPECT_EQ(addr, nullptr);
    EXPECT_FALSE(MappingAt(c.reply.base).has_value());
  }
  EXPECT_TRUE(SeenOf(proto::MessageType::kMapRegion).empty());
  // A well-formed reply still works on the same connection.
  daemon_.Override(proto::MessageType::kRegionOpen, [&](const proto::Frame&) {
    return Answer::Reply(proto::RegionReply{1, Base(17), 4096, 4096, "sigma"}, small.get());
  });
  void* addr = nullptr;
  EXPECT_EQ(dsvm_region_open("sigma", &addr, nullptr), DSVM_OK) << LastError();
  EXPECT_EQ(addr, reinterpret_cast<void*>(Base(17)));
}

TEST_F(ClientApiTest, ConcurrentCallersAreSerialised) {
  SKIP_WITHOUT_UFFD();
  Init();
  constexpr int kThreads = 4, kRounds = 5;
  // Each thread opens its own pre-made region over and over.
  for (int t = 0; t < kThreads; ++t) {
    daemon_.AddRegion("tau" + std::to_string(t), Base(20 + t), 4096, 4096);
  }
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t, &failures] {
      const std::string name = "tau" + std::to_string(t);
      for (int i = 0; i < kRounds; ++i) {
        void* addr = nullptr;
        if (dsvm_region_open(name.c_str(), &addr, nullptr) != DSVM_OK ||
            addr != reinterpret_cast<void*>(Base(20 + t)) || dsvm_region_close(addr) != DSVM_OK) {
          ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(SeenOf(proto::MessageType::kUnmapRegion).size(), size_t{kThreads * kRounds});
}

TEST_F(ClientApiTest, ForkedChildStartsUninitialised) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(30));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("upsilon", 4096, 0, &addr), DSVM_OK) << LastError();
  const pid_t pid = daemon_.ForkQuiet();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    uint32_t id;
    int code = 0;
    if (dsvm_node_id(&id) != DSVM_ENOT_INITIALIZED) code |= 1;
    if (MappingAt(Base(30)).has_value()) code |= 2;  // MADV_DONTFORK
    ::_exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  // The child's exit did not take the parent's connection with it.
  EXPECT_EQ(daemon_.connections_closed(), 0);
  EXPECT_EQ(dsvm_region_close(addr), DSVM_OK) << LastError();
}

// --- Locks and barriers ----------------------------------------------------------------------
//
// The fake daemon serves no faults, so these check the API and the atomics
// among threads of one process; across nodes: tests/integration.

struct SyncObjects {
  dsvm_lock_t lock;
  uint64_t counter;
  dsvm_barrier_t barrier;
  uint64_t slots[8];
};

TEST_F(ClientApiTest, LockArgumentsAreChecked) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(40));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("locks", 4096, 0, &addr), DSVM_OK) << LastError();
  auto* base = static_cast<uint8_t*>(addr);
  EXPECT_EQ(dsvm_lock_acquire(nullptr), DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(dsvm_lock_init(reinterpret_cast<dsvm_lock_t*>(base + 4)), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("aligned"), std::string::npos) << LastError();
  // A lock outside every region, and one that runs past the region's end.
  alignas(8) static dsvm_lock_t private_lock;
  EXPECT_EQ(dsvm_lock_acquire(&private_lock), DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("not inside a region"), std::string::npos) << LastError();
  EXPECT_EQ(dsvm_barrier_init(reinterpret_cast<dsvm_barrier_t*>(base + 4096 - 8), 2),
            DSVM_EINVALID_ARGUMENT);
  EXPECT_NE(LastError().find("past the end"), std::string::npos) << LastError();
  auto* lock = reinterpret_cast<dsvm_lock_t*>(base);
  auto* barrier = reinterpret_cast<dsvm_barrier_t*>(base + 64);
  EXPECT_EQ(dsvm_barrier_init(barrier, 0), DSVM_EINVALID_ARGUMENT);
  EXPECT_EQ(dsvm_barrier_wait(barrier), DSVM_EFAILED_PRECONDITION);  // never initialised
  EXPECT_NE(LastError().find("not initialised"), std::string::npos) << LastError();

  // Ownership: a thread holds it; releasing what it does not hold is refused.
  ASSERT_EQ(dsvm_lock_init(lock), DSVM_OK);
  EXPECT_EQ(dsvm_lock_release(lock), DSVM_EFAILED_PRECONDITION);
  EXPECT_NE(LastError().find("free"), std::string::npos) << LastError();
  ASSERT_EQ(dsvm_lock_acquire(lock), DSVM_OK) << LastError();
  EXPECT_EQ(dsvm_lock_acquire(lock), DSVM_EFAILED_PRECONDITION);
  EXPECT_EQ(dsvm_lock_try_acquire(lock), DSVM_EFAILED_PRECONDITION);
  std::thread other([&] {
    EXPECT_EQ(dsvm_lock_try_acquire(lock), DSVM_EBUSY);
    EXPECT_NE(LastError().find("another thread"), std::string::npos) << LastError();
    EXPECT_EQ(dsvm_lock_release(lock), DSVM_EFAILED_PRECONDITION);
    EXPECT_NE(LastError().find("node " + std::to_string(kNode)), std::string::npos)
        << LastError();
  });
  other.join();
  EXPECT_EQ(dsvm_lock_release(lock), DSVM_OK) << LastError();
  EXPECT_EQ(lock->word, 0u);

  // A corrupt barrier word (more arrivals than parties) is refused.
  ASSERT_EQ(dsvm_barrier_init(barrier, 2), DSVM_OK);
  barrier->word = 5;
  EXPECT_EQ(dsvm_barrier_wait(barrier), DSVM_EFAILED_PRECONDITION);
  EXPECT_NE(LastError().find("corrupt"), std::string::npos) << LastError();
  EXPECT_EQ(dsvm_region_close(addr), DSVM_OK);
  EXPECT_EQ(dsvm_lock_acquire(lock), DSVM_EINVALID_ARGUMENT);  // closed now
}

TEST_F(ClientApiTest, LockExcludesAndBarrierSeparatesRounds) {
  SKIP_WITHOUT_UFFD();
  Init();
  daemon_.SetNextBase(Base(41));
  void* addr = nullptr;
  ASSERT_EQ(dsvm_region_create("sync", 4096, 0, &addr), DSVM_OK) << LastError();
  auto* s = static_cast<SyncObjects*>(addr);
  constexpr int kThreads = 4, kIncrements = 20000, kRounds = 200;
  ASSERT_EQ(dsvm_lock_init(&s->lock), DSVM_OK);
  ASSERT_EQ(dsvm_barrier_init(&s->barrier, kThreads), DSVM_OK);
  std::atomic<int> lasts{0}, errors{0}, torn{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIncrements; ++i) {
        if (dsvm_lock_acquire(&s->lock) != DSVM_OK) ++errors;
        // Not atomic: only the lock keeps increments from being lost.
        const uint64_t v = *static_cast<volatile uint64_t*>(&s->counter);
        *static_cast<volatile uint64_t*>(&s->counter) = v + 1;
        if (dsvm_lock_release(&s->lock) != DSVM_OK) ++errors;
      }
      for (int round = 1; round <= kRounds; ++round) {
        __atomic_store_n(&s->slots[t], uint64_t(round), __ATOMIC_RELAXED);
        int rc = dsvm_barrier_wait(&s->barrier);
        if (rc == DSVM_BARRIER_LAST) ++lasts; else if (rc != DSVM_OK) ++errors;
        // Everyone wrote this round before anyone left the barrier.
        for (int o = 0; o < kThreads; ++o) {
          if (__atomic_load_n(&s->slots[o], __ATOMIC_RELAXED) < uint64_t(round)) ++torn;
        }
        rc = dsvm_barrier_wait(&s->barrier);  // nobody writes round+1 before all checked
        if (rc == DSVM_BARRIER_LAST) ++lasts; else if (rc != DSVM_OK) ++errors;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(s->counter, uint64_t{kThreads} * kIncrements);
  EXPECT_EQ(torn.load(), 0);
  EXPECT_EQ(lasts.load(), 2 * kRounds);  // one per round
  EXPECT_EQ(s->lock.word, 0u);

  // The C++ layer.
  {
    auto held = dsvm::LockGuard::Acquire(&s->lock);
    ASSERT_TRUE(held.ok()) << held.error().ToString();
    EXPECT_NE(s->lock.word, 0u);
    EXPECT_EQ(dsvm::LockGuard::Acquire(&s->lock).error().code, DSVM_EFAILED_PRECONDITION);
  }
  EXPECT_EQ(s->lock.word, 0u);
  ASSERT_EQ(dsvm_barrier_init(&s->barrier, 1), DSVM_OK);
  auto last = dsvm::BarrierWait(&s->barrier);
  ASSERT_TRUE(last.ok());
  EXPECT_TRUE(*last);
  EXPECT_EQ(dsvm_region_close(addr), DSVM_OK);
}

// --- The C++ API ---------------------------------------------------------------------------

TEST_F(ClientApiTest, CppClientAndRegion) {
  SKIP_WITHOUT_UFFD();
  auto client = dsvm::Client::Init(daemon_.path());
  ASSERT_TRUE(client.ok()) << client.error().ToString();
  ASSERT_TRUE(client->connected());
  auto id = client->NodeId();
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, kNode);
  EXPECT_EQ(dsvm::Client::Init(daemon_.path()).error().code, DSVM_EFAILED_PRECONDITION);

  daemon_.SetNextBase(Base(31));
  {
    auto region = dsvm::Region::Create("phi", 10000);
    ASSERT_TRUE(region.ok()) << region.error().ToString();
    EXPECT_EQ(region->data(), reinterpret_cast<void*>(Base(31)));
    EXPECT_EQ(region->size(), 10000u);
    EXPECT_EQ(region->name(), "phi");
    region->as<uint64_t>()[3] = 77;
    dsvm::Region moved = std::move(*region);
    EXPECT_EQ(region->data(), nullptr);
    EXPECT_EQ(moved.as<uint64_t>()[3], 77u);
    EXPECT_TRUE(MappingAt(Base(31)).has_value());
  }  // ~Region closes
  EXPECT_EQ(SeenOf(proto::MessageType::kUnmapRegion).size(), 1u);
  EXPECT_FALSE(MappingAt(Base(31)).has_value());

  auto opened = dsvm::Region::Open("phi");
  ASSERT_TRUE(opened.ok()) << opened.error().ToString();
  EXPECT_EQ(opened->size(), 3u * 4096);
  EXPECT_TRUE(opened->Close().ok());
  EXPECT_FALSE(opened->is_open());
  EXPECT_TRUE(opened->Close().ok());  // closing twice does nothing

  auto missing = dsvm::Region::Open("chi");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, DSVM_ENOT_FOUND);
  EXPECT_NE(missing.error().message.find("chi"), std::string::npos);
  EXPECT_NE(missing.error().ToString().find("no such region"), std::string::npos);
  auto bad = dsvm::Region::Create("", 4096);
  EXPECT_EQ(bad.error().code, DSVM_EINVALID_ARGUMENT);

  EXPECT_TRUE(dsvm::Region::Destroy("phi").ok());
  EXPECT_EQ(dsvm::Region::Destroy("phi").error().code, DSVM_ENOT_FOUND);

  daemon_.SetNextBase(Base(32));
  auto last = dsvm::Region::Create("psi", 4096);
  ASSERT_TRUE(last.ok());
  EXPECT_TRUE(client->Finalize().ok());  // closes psi
  EXPECT_FALSE(client->connected());
  EXPECT_FALSE(MappingAt(Base(32)).has_value());
  EXPECT_TRUE(client->Finalize().ok());  // nothing left to do
  // psi's destructor runs after finalize: harmless.
}

// The C++ wrappers of stats, access attributes, tokens, prefetch and advice
// send what the C calls send.
TEST_F(ClientApiTest, CppStatsPrefetchAdviceAndAccess) {
  SKIP_WITHOUT_UFFD();
  auto client = dsvm::Client::Init(daemon_.path());
  ASSERT_TRUE(client.ok()) << client.error().ToString();
  proto::NodeStatsReply reply{kNode, 1, {}};
  reply.counters.read_faults = 5;
  daemon_.Override(proto::MessageType::kNodeStats,
                   [&](const proto::Frame&) { return Answer::Reply(reply); });
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok()) << stats.error().ToString();
  EXPECT_EQ(stats->read_faults, 5u);

  int prefetches = 0, advice = 0;
  daemon_.Override(proto::MessageType::kPrefetch, [&](const proto::Frame& f) {
    const auto& m = std::get<proto::Prefetch>(f.message);
    prefetches += m.address == Base(33) + 4096 && m.length == 8192 && m.write == 1;
    return Answer::WithStatus(StatusCode::kOk, "");
  });
  daemon_.Override(proto::MessageType::kAdvise, [&](const proto::Frame& f) {
    const auto& m = std::get<proto::Advise>(f.message);
    advice += m.address == Base(33) && m.length == 3 * 4096 &&
              m.advice == proto::Advice::kReadMostly;
    return Answer::WithStatus(StatusCode::kOk, "");
  });
  daemon_.SetNextBase(Base(33));
  dsvm_region_attr_t attr{};
  attr.mode = 0660;
  attr.token = "omega-token";
  auto region = dsvm::Region::Create("omega", 3 * 4096, attr);
  ASSERT_TRUE(region.ok()) << region.error().ToString();
  EXPECT_TRUE(region->Prefetch(4096, 8192, DSVM_PREFETCH_WRITE).ok());
  EXPECT_TRUE(region->Advise(0, 3 * 4096, DSVM_ADVICE_READ_MOSTLY).ok());
  EXPECT_EQ(prefetches, 1);
  EXPECT_EQ(advice, 1);
  EXPECT_EQ(region->Prefetch(0, 4 * 4096).error().code, DSVM_EINVALID_ARGUMENT)
      << "past the region's end";
  EXPECT_EQ(region->Advise(0, 4096, 77).error().code, DSVM_EINVALID_ARGUMENT);
  EXPECT_TRUE(region->Close().ok());
  auto again = dsvm::Region::Open("omega", "omega-token");
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  EXPECT_EQ(dsvm::Region::Open("omega", "").error().code, DSVM_EINVALID_ARGUMENT);
}

TEST_F(ClientApiTest, CppClientFinalizesInItsDestructor) {
  {
    auto client = dsvm::Client::Init(daemon_.path());
    ASSERT_TRUE(client.ok()) << client.error().ToString();
    dsvm::Client moved = std::move(*client);
    EXPECT_FALSE(client->connected());
    EXPECT_TRUE(moved.connected());
  }
  uint32_t id;
  EXPECT_EQ(dsvm_node_id(&id), DSVM_ENOT_INITIALIZED);
  EXPECT_TRUE(daemon_.WaitClosed(1));
}

TEST(ClientCpp, ExpectedAbortsOnAFailedValue) {
  dsvm::Expected<int> failed(dsvm::Error{DSVM_ENOT_FOUND, "no"});
  EXPECT_FALSE(failed.ok());
  EXPECT_DEATH(failed.value(), "value of a failed dsvm::Expected");
  dsvm::Expected<int> fine(3);
  EXPECT_EQ(*fine, 3);
  EXPECT_EQ(fine.error().code, DSVM_OK);
}

}  // namespace
}  // namespace dsvm
