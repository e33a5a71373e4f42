// Unit tests for the uffd fault backend and descriptor passing.
//
// The test process plays the node daemon; forked children play client
// processes. A child maps the region's memfd at the region's address,
// hands its userfaultfd and pidfd over a SOCK_SEQPACKET socketpair
// (SCM_RIGHTS), then performs the loads and stores the parent asks for and
// replies with what it read. A child blocked in a fault simply does not
// reply until the parent resolves the fault.
//
// Runs as root, and unprivileged too (UFFD_USER_MODE_ONLY is what
// vm.unprivileged_userfaultfd=0 still allows). Skipped with a message where
// userfaultfd is refused outright (no CONFIG_USERFAULTFD, a seccomp filter)
// or the kernel lacks minor or write-protect faults on shmem.
#include "node/fault/uffd_backend.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "node/fault/fault_backend.h"
#include "node/fault/fd_passing.h"
#include "node/fault/mixed_backend.h"
#include "node/fault/uffd_client.h"
#include "node/memory/page_store.h"
#include "proto/status.h"

namespace dsvm::node {

// Test names say which mode runs; gtest prints the parameter with this.
struct UffdTestMode {
  const char* name;
  UffdBackendOptions options;
  uint32_t page_size;
  // -1: the UffdBackend alone. 0 or 1: inside a MixedBackend of two
  // UffdBackends, the region served by that one (the daemon's kmod backend
  // is such a pair, dsvm.ko first): the whole suite then checks that ids,
  // tokens and calls find their way through it.
  int mixed_slot = -1;
};
void PrintTo(const UffdTestMode& m, std::ostream* os) { *os << m.name; }

namespace {

constexpr PageAddr kBase = 0x200000000000ull;  // the coordinator's default window base
constexpr uint32_t kSmallPage = 4096;
// The region's page size, set by the fixture from the test's mode.
uint32_t g_page = kSmallPage;
constexpr uint64_t kPages = 16;
constexpr int kTimeoutMs = 2000;

PageAddr Page(uint64_t i) { return kBase + i * g_page; }

std::vector<uint8_t> Filled(uint64_t word) {
  std::vector<uint8_t> v(g_page);
  for (size_t i = 0; i < g_page; i += sizeof(word)) std::memcpy(v.data() + i, &word, sizeof(word));
  return v;
}

uint64_t WordOf(PageStore& s, PageAddr page) {
  std::vector<uint8_t> v(g_page);
  EXPECT_TRUE(s.ReadPage(page, v).ok());
  uint64_t w;
  std::memcpy(&w, v.data(), sizeof(w));
  return w;
}

// ---------------------------------------------------------------------------
// The client process.

enum Op : uint8_t { kLoad = 1, kStore = 2, kDropPte = 3, kUnmapRegion = 4, kExit = 5 };
struct Command {
  Op op;
  uint64_t offset;  // from the region's base
  uint64_t value;
};

[[noreturn]] void ClientMain(int sock, int memfd) {
  // Keep only the socket and the memfd: no copies of other clients'
  // descriptors, which the parent holds.
  sock = fcntl(sock, F_DUPFD_CLOEXEC, 500);
  memfd = fcntl(memfd, F_DUPFD_CLOEXEC, 500);
  if (sock < 0 || memfd < 0) _exit(20);
  syscall(SYS_close_range, 3u, 499u, 0u);
  syscall(SYS_close_range, 502u, ~0u, 0u);
  // The default action, not a handler a linked library installed: a SIGBUS
  // must end the client.
  signal(SIGBUS, SIG_DFL);

  auto m = UffdClientMapRegion(memfd, kBase, kPages * g_page);
  if (!m.ok()) _exit(21);
  const uint8_t hello = 'M';
  const int fds[2] = {m->uffd.fd.get(), m->pidfd.get()};
  if (!SendFds(sock, {&hello, 1}, fds).ok()) _exit(22);
  m->uffd.fd.reset();  // the daemon holds the only copy
  m->pidfd.reset();
  for (;;) {
    Command c;
    if (recv(sock, &c, sizeof(c), 0) != static_cast<ssize_t>(sizeof(c))) _exit(0);
    auto* word = reinterpret_cast<volatile uint64_t*>(kBase + c.offset);
    uint64_t reply = 0;
    switch (c.op) {
      case kLoad:
        reply = *word;
        break;
      case kStore:
        *word = c.value;
        break;
      case kDropPte:  // as the kernel may do under reclaim: the PTE goes, the page stays
        madvise(reinterpret_cast<void*>((kBase + c.offset) & ~uint64_t{kSmallPage - 1}), kSmallPage,
                MADV_DONTNEED);
        break;
      case kUnmapRegion:
        munmap(reinterpret_cast<void*>(kBase), kPages * g_page);
        break;
      case kExit:
        _exit(0);
    }
    send(sock, &reply, sizeof(reply), MSG_NOSIGNAL);
  }
}

struct Client {
  pid_t pid = -1;
  UniqueFd sock;
  MappingId mapping = 0;
};

// ---------------------------------------------------------------------------

class UffdBackendTest : public ::testing::TestWithParam<UffdTestMode> {
 protected:
  void SetUp() override {
    g_page = GetParam().page_size;
    auto b = UffdBackend::Create(GetParam().options);
    if (!b.ok()) {
      const StatusCode c = b.status().code();
      if (c == StatusCode::kPermissionDenied || c == StatusCode::kUnavailable ||
          c == StatusCode::kFailedPrecondition) {
        GTEST_SKIP() << "userfaultfd unusable here: " << b.status().ToString();
      }
      FAIL() << b.status().ToString();
    }
    uffd_ = b->get();
    backend_ = std::move(b).value();
    if (const int slot = GetParam().mixed_slot; slot >= 0) {
      auto other = UffdBackend::Create();
      ASSERT_TRUE(other.ok()) << other.status().ToString();
      std::unique_ptr<FaultBackend> first = std::move(backend_), second = std::move(*other);
      if (slot == 1) std::swap(first, second);
      const uint32_t page = g_page;
      auto mixed = MixedBackend::Create(
          std::move(first), [slot, page](uint64_t size) { return (size == page) == (slot == 0); },
          std::move(second));
      ASSERT_TRUE(mixed.ok()) << mixed.status().ToString();
      mixed_ = mixed->get();
      backend_ = std::move(*mixed);
    }
    auto s = PageStore::Create(kBase, kPages * g_page, g_page);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
    ASSERT_TRUE(backend_->AddRegion(store_.get()).ok());
    if (mixed_ != nullptr) {
      ASSERT_EQ(mixed_->BackendOf(kBase), GetParam().mixed_slot);
    }
  }

  void TearDown() override {
    for (Client& c : clients_) {
      if (c.pid > 0) {
        kill(c.pid, SIGKILL);
        waitpid(c.pid, nullptr, 0);
      }
    }
  }

  // Forks a client and adds its mapping.
  Client& StartClient() {
    clients_.emplace_back();
    Client& c = clients_.back();
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    c.pid = fork();
    if (c.pid == 0) {
      close(sv[0]);
      ClientMain(sv[1], store_->fd());
    }
    close(sv[1]);
    c.sock.reset(sv[0]);
    uint8_t hello = 0;
    auto r = ReceiveFds(c.sock.get(), {&hello, 1});
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok() || r->fds.size() != 2) return c;
    MappingRequest req;
    req.region = kBase;
    req.pid = c.pid;
    req.fault_fd = std::move(r->fds[0]);
    req.pidfd = std::move(r->fds[1]);
    auto id = backend_->AddMapping(std::move(req));
    EXPECT_TRUE(id.ok()) << id.status().ToString();
    if (id.ok()) c.mapping = *id;
    return c;
  }

  void Send(Client& c, Op op, uint64_t offset, uint64_t value = 0) {
    Command cmd{op, offset, value};
    ASSERT_EQ(send(c.sock.get(), &cmd, sizeof(cmd), MSG_NOSIGNAL),
              static_cast<ssize_t>(sizeof(cmd)));
  }

  // Reads whatever events there are now; each is recorded and given to
  // `handler`.
  void Drain(const std::function<void(const FaultEvent&)>& handler) {
    FaultEvent batch[8];
    for (;;) {
      auto n = backend_->ReadEvents(batch);
      ASSERT_TRUE(n.ok()) << n.status().ToString();
      if (*n == 0) return;
      for (size_t i = 0; i < *n; ++i) {
        events_.push_back(batch[i]);
        if (handler) handler(batch[i]);
      }
    }
  }

  // Serves events with `handler` until `c` replies; the reply, or an error
  // when the client died or kTimeoutMs passed.
  Result<uint64_t> Await(Client& c, const std::function<void(const FaultEvent&)>& handler = {}) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
    for (;;) {
      Drain(handler);
      const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                            deadline - std::chrono::steady_clock::now())
                                            .count());
      if (left <= 0) return Unavailable("timed out waiting for the client");
      pollfd p[2] = {{backend_->event_fd(), POLLIN, 0}, {c.sock.get(), POLLIN, 0}};
      if (poll(p, 2, left) < 0) return IoError("poll");
      if (p[1].revents & POLLIN) {
        uint64_t v = 0;
        if (recv(c.sock.get(), &v, sizeof(v), 0) == static_cast<ssize_t>(sizeof(v))) {
          Drain(handler);
          return v;
        }
        return Unavailable("the client died");
      }
      if (p[1].revents & (POLLHUP | POLLERR)) return Unavailable("the client died");
    }
  }

  // Serves events until one matches `want` (one seen already counts); false
  // on timeout.
  bool AwaitEvent(const std::function<bool(const FaultEvent&)>& want, FaultEvent* got) {
    for (const FaultEvent& e : events_) {
      if (want(e)) {
        *got = e;
        return true;
      }
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
    bool found = false;
    while (!found && std::chrono::steady_clock::now() < deadline) {
      pollfd p{backend_->event_fd(), POLLIN, 0};
      poll(&p, 1, 10);
      Drain([&](const FaultEvent& e) {
        if (!found && want(e)) {
          found = true;
          *got = e;
        }
      });
    }
    return found;
  }

  // Installs `word` into `page` as the daemon would for a grant, then maps it.
  void Install(PageAddr page, uint64_t word, bool writable) {
    ASSERT_TRUE(store_->WritePage(page, Filled(word)).ok());
    Status s = writable ? backend_->MapWrite(page) : backend_->MapRead(page);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  size_t FaultCount() const {
    size_t n = 0;
    for (const FaultEvent& e : events_) n += e.kind == FaultEventKind::kFault;
    return n;
  }

  std::unique_ptr<FaultBackend> backend_;
  UffdBackend* uffd_ = nullptr;     // the one serving the region (backend_ or inside it)
  MixedBackend* mixed_ = nullptr;   // backend_, in the mixed modes
  std::unique_ptr<PageStore> store_;
  std::deque<Client> clients_;
  std::vector<FaultEvent> events_;
};

TEST_P(UffdBackendTest, ReadOfAMissingPageFaultsAndSeesTheInstalledBytes) {
  Client& c = StartClient();
  ASSERT_NE(c.mapping, 0u);
  Send(c, kLoad, 3 * g_page + g_page / 2 + 8);  // mid-page: the event names the page
  auto v = Await(c, [&](const FaultEvent& e) {
    ASSERT_EQ(e.kind, FaultEventKind::kFault);
    EXPECT_EQ(e.mapping, c.mapping);
    EXPECT_EQ(e.page, Page(3));
    EXPECT_FALSE(e.write);
    Install(e.page, 0xfeedface, false);
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
  });
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 0xfeedfaceu);
  EXPECT_EQ(FaultCount(), 1u);
}

TEST_P(UffdBackendTest, WriteToASharedPageIsAWriteFault) {
  Install(Page(2), 11, false);
  Client& c = StartClient();
  Send(c, kLoad, 2 * g_page);
  auto v = Await(c);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 11u);
  EXPECT_EQ(FaultCount(), 0u) << "a Shared page reads without a fault";

  Send(c, kStore, 2 * g_page, 12);
  v = Await(c, [&](const FaultEvent& e) {
    ASSERT_EQ(e.kind, FaultEventKind::kFault);
    EXPECT_EQ(e.page, Page(2));
    EXPECT_TRUE(e.write);
    EXPECT_EQ(WordOf(*store_, Page(2)), 11u) << "the write must wait";
    ASSERT_TRUE(backend_->MapWrite(e.page).ok());
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
  });
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(FaultCount(), 1u);
  EXPECT_EQ(WordOf(*store_, Page(2)), 12u);
}

// A run of neighbouring pages installed together (a batch received) is
// written with one WritePages and mapped with MapRange: one UFFDIO_CONTINUE
// per part whose pages share their access, not one per page; pages mapped
// already keep working, a writable one becomes read-only.
TEST_P(UffdBackendTest, ARunOfPagesIsMappedTogether) {
  Client& c = StartClient();
  Install(Page(5), 1, false);
  Install(Page(6), 1, true);
  std::vector<std::vector<uint8_t>> bytes;
  for (uint64_t i = 4; i < 12; ++i) bytes.push_back(Filled(500 + i));
  std::vector<std::span<const uint8_t>> spans(bytes.begin(), bytes.end());
  ASSERT_TRUE(store_->WritePages(Page(4), spans).ok());
  const uint64_t ioctls = uffd_->stats().map_ioctls;
  Status st = backend_->MapRange(Page(4), 8, g_page, false);
  ASSERT_TRUE(st.ok()) << st.ToString();
  // Parts: page 4 (new), 5 (read already: nothing), 6 (writable: protect),
  // 7..11 (new): three calls for the client's mapping, five where
  // UFFDIO_CONTINUE cannot write-protect (CONTINUE, then WRITEPROTECT),
  // against seven (or thirteen) page by page.
  EXPECT_LE(uffd_->stats().map_ioctls - ioctls, 5u);
  for (uint64_t i = 4; i < 12; ++i) {
    Send(c, kLoad, i * g_page + 8);
    auto v = Await(c);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    EXPECT_EQ(*v, 500 + i) << "page " << i;
  }
  EXPECT_EQ(FaultCount(), 0u);
  Send(c, kStore, 6 * g_page, 7);  // read-only now: the write waits for the daemon
  auto v = Await(c, [&](const FaultEvent& e) {
    ASSERT_EQ(e.kind, FaultEventKind::kFault);
    EXPECT_EQ(e.page, Page(6));
    EXPECT_TRUE(e.write);
    ASSERT_TRUE(backend_->MapWrite(e.page).ok());
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
  });
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(FaultCount(), 1u);
  // A run over a page without bytes fails as MapRead does.
  EXPECT_EQ(backend_->MapRange(Page(12), 2, g_page, false).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(backend_->MapRange(Page(4), 2, g_page * 2, false).code(),
            mixed_ != nullptr || uffd_ == backend_.get() ? StatusCode::kInvalidArgument
                                                         : StatusCode::kOk);
}

TEST_P(UffdBackendTest, InvalidateMakesTheNextReadFaultAgain) {
  Client& c = StartClient();
  Install(Page(5), 50, false);
  Send(c, kLoad, 5 * g_page);
  auto v = Await(c);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 50u);
  EXPECT_EQ(FaultCount(), 0u);

  ASSERT_TRUE(backend_->Invalidate(Page(5)).ok());
  ASSERT_TRUE(store_->Discard(Page(5)).ok());
  Send(c, kLoad, 5 * g_page);
  v = Await(c, [&](const FaultEvent& e) {
    EXPECT_EQ(e.page, Page(5));
    EXPECT_FALSE(e.write);
    Install(e.page, 51, false);
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
  });
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 51u);
  EXPECT_EQ(FaultCount(), 1u);
}

TEST_P(UffdBackendTest, PagesValidOnTheNodeAreReadWithoutEvents) {
  // Valid before the client comes (mapped when it is added) and after.
  Install(Page(0), 100, false);
  Install(Page(1), 101, true);
  Client& c = StartClient();
  Install(Page(7), 107, false);
  Install(Page(8), 108, true);
  for (uint64_t i : {0, 1, 7, 8}) {
    Send(c, kLoad, i * g_page + 16);
    auto v = Await(c);
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    EXPECT_EQ(*v, 100 + i);
  }
  Send(c, kStore, 8 * g_page, 208);  // Modified: writes need no fault either
  ASSERT_TRUE(Await(c).ok());
  EXPECT_EQ(WordOf(*store_, Page(8)), 208u);
  EXPECT_EQ(FaultCount(), 0u);
  EXPECT_EQ(uffd_->stats().fault_events, 0u);
  EXPECT_EQ(uffd_->stats().local_hits, 0u) << "eager mapping: not even a minor fault";

  // Where the kernel dropped a PTE, the access costs one minor fault that the
  // backend resolves itself: still no event for the daemon.
  if (store_->hugetlb()) return;  // no 4 KiB PTE to drop
  Send(c, kDropPte, 7 * g_page);
  ASSERT_TRUE(Await(c).ok());
  Send(c, kLoad, 7 * g_page);
  auto v = Await(c);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 107u);
  EXPECT_EQ(FaultCount(), 0u);
  EXPECT_EQ(uffd_->stats().local_hits, 1u);
}

TEST_P(UffdBackendTest, BytesDroppedBehindTheBackendsBackFaultToTheDaemon) {
  Client& c = StartClient();
  Install(Page(11), 110, false);
  ASSERT_TRUE(store_->Discard(Page(11)).ok());  // not through Invalidate: a daemon bug
  Send(c, kLoad, 11 * g_page);
  auto v = Await(c, [&](const FaultEvent& e) {
    EXPECT_EQ(e.page, Page(11));
    Install(e.page, 111, false);
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
  });
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 111u);
  EXPECT_EQ(FaultCount(), 1u);
}

TEST_P(UffdBackendTest, TwoProcessesSeeEachOthersWritesThroughTheMemfd) {
  Install(Page(4), 1, true);
  Client& a = StartClient();
  Client& b = StartClient();
  Send(a, kStore, 4 * g_page + 8, 0xa11ce);
  ASSERT_TRUE(Await(a).ok());
  Send(b, kLoad, 4 * g_page + 8);
  auto v = Await(b);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 0xa11ceu);
  Send(b, kStore, 4 * g_page + 16, 0xb0b);
  ASSERT_TRUE(Await(b).ok());
  Send(a, kLoad, 4 * g_page + 16);
  v = Await(a);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 0xb0bu);
  EXPECT_EQ(FaultCount(), 0u);

  // A downgrade reaches both processes.
  ASSERT_TRUE(backend_->MapRead(Page(4)).ok());
  Send(b, kStore, 4 * g_page, 9);
  v = Await(b, [&](const FaultEvent& e) {
    EXPECT_EQ(e.mapping, b.mapping);
    EXPECT_TRUE(e.write);
    ASSERT_TRUE(backend_->MapWrite(e.page).ok());
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
  });
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(FaultCount(), 1u);
}

TEST_P(UffdBackendTest, UnmapKeepsTheBytesUntilMappedAgain) {
  Client& c = StartClient();
  Install(Page(6), 60, true);
  Send(c, kStore, 6 * g_page, 61);
  ASSERT_TRUE(Await(c).ok());
  ASSERT_TRUE(backend_->Unmap(Page(6)).ok());
  EXPECT_TRUE(store_->IsRetained(Page(6)));
  EXPECT_EQ(WordOf(*store_, Page(6)), 61u);
  Send(c, kLoad, 6 * g_page);
  auto v = Await(c, [&](const FaultEvent& e) {
    EXPECT_EQ(e.page, Page(6));
    ASSERT_TRUE(backend_->MapRead(e.page).ok());  // e.g. the eviction was refused
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
  });
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 61u);
  EXPECT_FALSE(store_->IsRetained(Page(6)));
}

// UnmapRange takes a run of pages, writable and read-only mixed, from the
// client as Unmap takes one: each access faults, the bytes (a write
// included) kept until mapped again.
TEST_P(UffdBackendTest, UnmapRangeTakesEveryPageOfTheRun) {
  Client& c = StartClient();
  for (uint64_t i = 4; i < 10; ++i) Install(Page(i), 40 + i, i % 2 == 0);
  Send(c, kStore, 6 * g_page, 66);
  ASSERT_TRUE(Await(c).ok());
  for (uint64_t i = 4; i < 10; ++i) {  // every page mapped in the client
    Send(c, kLoad, i * g_page);
    ASSERT_TRUE(Await(c).ok());
  }
  const uint64_t faults = FaultCount();
  Status st = backend_->UnmapRange(Page(4), 6, g_page);
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (uint64_t i = 4; i < 10; ++i) {
    EXPECT_TRUE(store_->IsRetained(Page(i))) << i;
    Send(c, kLoad, i * g_page);
    auto v = Await(c, [&](const FaultEvent& e) {
      EXPECT_EQ(e.page, Page(i));
      ASSERT_TRUE(backend_->MapRead(e.page).ok());
      ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
    });
    ASSERT_TRUE(v.ok()) << v.status().ToString();
    EXPECT_EQ(*v, i == 6 ? 66u : 40 + i) << i;
  }
  EXPECT_EQ(FaultCount() - faults, 6u);
  EXPECT_EQ(backend_->UnmapRange(Page(4), 2, g_page * 2).code(),
            mixed_ != nullptr || uffd_ == backend_.get() ? StatusCode::kInvalidArgument
                                                         : StatusCode::kOk);
}

TEST_P(UffdBackendTest, AKilledClientBlockedInAFaultDoesNotWedgeTheDaemon) {
  Client& a = StartClient();
  Client& b = StartClient();
  Send(a, kLoad, 9 * g_page);
  FaultEvent fault;
  ASSERT_TRUE(
      AwaitEvent([&](const FaultEvent& e) { return e.kind == FaultEventKind::kFault; }, &fault));
  EXPECT_EQ(fault.mapping, a.mapping);
  ASSERT_EQ(kill(a.pid, SIGKILL), 0);
  FaultEvent closed;
  ASSERT_TRUE(AwaitEvent(
      [&](const FaultEvent& e) {
        return e.kind == FaultEventKind::kMappingClosed && e.mapping == a.mapping;
      },
      &closed));
  int status = 0;
  ASSERT_EQ(waitpid(a.pid, &status, 0), a.pid);
  a.pid = -1;
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

  // The late answer to the dead client's fault is harmless.
  EXPECT_EQ(backend_->Resolve(fault.token, Resolution::kRetry).code(), StatusCode::kNotFound);
  ASSERT_TRUE(backend_->RemoveMapping(a.mapping).ok());
  EXPECT_EQ(uffd_->mapping_count(), 1u);

  // The daemon goes on serving: the page the dead client wanted, and others.
  Install(Page(9), 90, false);
  Send(b, kLoad, 9 * g_page);
  auto v = Await(b);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 90u);
  Send(b, kLoad, 10 * g_page);
  v = Await(b, [&](const FaultEvent& e) {
    Install(e.page, 91, false);
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kRetry).ok());
  });
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 91u);
  ASSERT_TRUE(backend_->Invalidate(Page(9)).ok());
}

TEST_P(UffdBackendTest, AClientThatUnmappedTheRegionIsClosedNotAnError) {
  Client& a = StartClient();
  Client& b = StartClient();
  Send(a, kUnmapRegion, 0);
  ASSERT_TRUE(Await(a).ok());
  // The next coherence operation finds a's range gone: a's mapping is
  // reported closed, the operation itself succeeds for b.
  Install(Page(3), 33, false);
  FaultEvent closed;
  ASSERT_TRUE(AwaitEvent(
      [&](const FaultEvent& e) {
        return e.kind == FaultEventKind::kMappingClosed && e.mapping == a.mapping;
      },
      &closed));
  ASSERT_TRUE(backend_->RemoveMapping(a.mapping).ok());
  Send(b, kLoad, 3 * g_page);
  auto v = Await(b);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 33u);
  EXPECT_EQ(FaultCount(), 0u);
}

TEST_P(UffdBackendTest, AnErrorResolutionEndsTheAccessWithSigbus) {
  Client& c = StartClient();
  Send(c, kLoad, 12 * g_page);
  auto v = Await(c, [&](const FaultEvent& e) {
    if (e.kind != FaultEventKind::kFault) return;
    ASSERT_TRUE(backend_->Resolve(e.token, Resolution::kError).ok());  // e.g. DATA_LOSS
  });
  EXPECT_FALSE(v.ok());
  int status = 0;
  ASSERT_EQ(waitpid(c.pid, &status, 0), c.pid);
  c.pid = -1;
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS) << status;
  FaultEvent closed;
  EXPECT_TRUE(AwaitEvent(
      [&](const FaultEvent& e) { return e.kind == FaultEventKind::kMappingClosed; }, &closed));
}

TEST_P(UffdBackendTest, RefusesBadRequests) {
  // Not a userfaultfd.
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  close(p[1]);
  MappingRequest req;
  req.region = kBase;
  req.pid = getpid();
  req.fault_fd.reset(p[0]);
  EXPECT_EQ(backend_->AddMapping(std::move(req)).status().code(), StatusCode::kInvalidArgument);

  // A process descriptor that is not one, or names another process.
  for (bool other_process : {false, true}) {
    auto uf = CreateUserfaultfd();
    ASSERT_TRUE(uf.ok());
    int q[2];
    ASSERT_EQ(pipe(q), 0);
    close(q[1]);
    MappingRequest bad_pid;
    bad_pid.region = kBase;
    bad_pid.pid = other_process ? getppid() : getpid();
    bad_pid.fault_fd = std::move(uf->fd);
    bad_pid.pidfd.reset(other_process ? static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0))
                                      : q[0]);
    if (other_process) close(q[0]);
    EXPECT_EQ(backend_->AddMapping(std::move(bad_pid)).status().code(),
              StatusCode::kInvalidArgument);
  }

  // A region nobody registered.
  MappingRequest other;
  other.region = kBase + (1ull << 30);
  EXPECT_EQ(backend_->AddMapping(std::move(other)).status().code(), StatusCode::kNotFound);

  // This process's range holds anonymous memory, not the region's memfd.
  void* anon = mmap(reinterpret_cast<void*>(kBase), kPages * g_page, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  ASSERT_EQ(anon, reinterpret_cast<void*>(kBase));
  auto u = CreateUserfaultfd();
  ASSERT_TRUE(u.ok());
  MappingRequest wrong;
  wrong.region = kBase;
  wrong.pid = getpid();
  wrong.fault_fd = std::move(u->fd);
  auto r = backend_->AddMapping(std::move(wrong));
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("not the region's memfd"), std::string::npos)
      << r.status().message();
  munmap(anon, kPages * g_page);

  // Pages and tokens.
  EXPECT_EQ(backend_->MapRead(kBase + (1ull << 30)).code(), StatusCode::kNotFound);
  EXPECT_EQ(backend_->MapRead(Page(1) + 8).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->WriteBack(Page(1) + 8).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->WriteBack(kBase + (1ull << 30)).code(), StatusCode::kNotFound);
  EXPECT_TRUE(backend_->WriteBack(Page(1)).ok());
  EXPECT_EQ(backend_->MapWrite(Page(1)).code(), StatusCode::kFailedPrecondition)
      << "a page with no bytes cannot be mapped";
  EXPECT_EQ(backend_->Resolve({12345, Page(0)}, Resolution::kRetry).code(), StatusCode::kNotFound);
  Client& c = StartClient();
  EXPECT_EQ(backend_->MapRead(Page(2)).code(), StatusCode::kFailedPrecondition)
      << "nor with a client to map it into";
  EXPECT_EQ(backend_->Resolve({c.mapping, Page(0) + 1}, Resolution::kRetry).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->Resolve({c.mapping, Page(0)}, Resolution::kInvalid).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->RemoveRegion(kBase).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(backend_->AddRegion(store_.get()).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(backend_->RemoveMapping(999).code(), StatusCode::kNotFound);
}

TEST_P(UffdBackendTest, ReportsWhatTheKernelOffers) {
  const UffdFeatures& f = uffd_->features();
  std::printf("uffd features 0x%llx: continue_wp=%d poison=%d thread_id=%d\n",
              static_cast<unsigned long long>(f.api_features), f.continue_wp, f.poison,
              f.thread_id);
  if (!GetParam().options.use_continue_wp) {
    EXPECT_FALSE(f.continue_wp);
  }
  if (!GetParam().options.use_poison) {
    EXPECT_FALSE(f.poison);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Modes, UffdBackendTest,
    ::testing::Values(UffdTestMode{"Default", {}, kSmallPage},
                      UffdTestMode{
                          "ContinueThenWriteProtect", {.use_continue_wp = false}, kSmallPage},
                      UffdTestMode{"SigbusBySignal", {.use_poison = false}, kSmallPage},
                      UffdTestMode{"TwoMiBPages", {}, 2u << 20},
                      UffdTestMode{"MixedFirst", {}, kSmallPage, 0},
                      UffdTestMode{"MixedSecond", {}, kSmallPage, 1},
                      UffdTestMode{"MixedSecondTwoMiBPages", {}, 2u << 20, 1}),
    [](const ::testing::TestParamInfo<UffdTestMode>& info) { return info.param.name; });

// ---------------------------------------------------------------------------
// SCM_RIGHTS

TEST(FdPassingTest, DescriptorsTravelWithTheirPayload) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  UniqueFd rd(p[0]), wr(p[1]);
  const uint8_t payload[3] = {1, 2, 3};
  const int fds[2] = {rd.get(), wr.get()};
  ASSERT_TRUE(SendFds(a.get(), payload, fds).ok());

  uint8_t buf[8] = {};
  auto r = ReceiveFds(b.get(), buf);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->bytes, 3u);
  EXPECT_EQ(buf[2], 3);
  ASSERT_EQ(r->fds.size(), 2u);
  EXPECT_EQ(fcntl(r->fds[0].get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  // The received write end feeds the original read end.
  ASSERT_EQ(write(r->fds[1].get(), "x", 1), 1);
  char c = 0;
  ASSERT_EQ(read(rd.get(), &c, 1), 1);
  EXPECT_EQ(c, 'x');

  // A message without descriptors, and a closed peer.
  ASSERT_TRUE(SendFds(a.get(), payload, {}).ok());
  r = ReceiveFds(b.get(), buf);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->fds.empty());
  a.reset();
  EXPECT_EQ(ReceiveFds(b.get(), buf).status().code(), StatusCode::kUnavailable);
}

TEST(FdPassingTest, RefusesWhatItCannotCarry) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  const uint8_t payload[1] = {7};
  std::vector<int> many(kMaxPassedFds + 1, 0);
  EXPECT_EQ(SendFds(a.get(), payload, many).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SendFds(a.get(), {}, {}).code(), StatusCode::kInvalidArgument);
  const int bad[1] = {-1};
  EXPECT_EQ(SendFds(a.get(), payload, bad).code(), StatusCode::kInvalidArgument);

  // A payload larger than the receiver's buffer is refused, its descriptors
  // closed.
  const uint8_t big[16] = {};
  const int one[1] = {0};
  ASSERT_TRUE(SendFds(a.get(), big, one).ok());
  uint8_t small[4];
  EXPECT_EQ(ReceiveFds(b.get(), small).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dsvm::node
