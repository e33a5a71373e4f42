// The node daemon's kmod fault backend (node/fault/kmod_backend.h) against
// the real dsvm.ko, in the QEMU guest of tests/kmod/run.sh (built static:
// the guest has no libc). This process plays the daemon: it holds a
// PageStore and the backend and answers fault events as the coherence agent
// would have them answered; a forked child plays a client process that maps
// the region through /dev/dsvm (node/fault/kmod_client.h) and touches it.
// Prints TAP lines like dsvm_selftest; exits 1 when a case fails.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "kmod/uapi/dsvm_uapi.h"
#include "node/fault/kmod_backend.h"
#include "node/fault/kmod_client.h"
#include "node/memory/page_store.h"

using namespace dsvm;
using namespace dsvm::node;

namespace {

constexpr uint64_t kBase = 0x300000000000ull;
constexpr uint64_t kPage = 4096;
constexpr uint64_t kPages = 8;

int g_case = 0;
int g_failed = 0;

void Check(bool ok, const std::string& name) {
  ++g_case;
  std::printf("%sok %d - %s\n", ok ? "" : "not ", g_case, name.c_str());
  std::fflush(stdout);
  if (!ok) ++g_failed;
}

void CheckOk(const Status& st, const std::string& name) {
  Check(st.ok(), name + (st.ok() ? "" : ": " + st.ToString()));
}

uint64_t StoreWord(PageStore& store, uint64_t page) {
  std::vector<uint8_t> b(kPage);
  if (!store.ReadPage(kBase + page * kPage, b).ok()) return ~0ull;
  uint64_t v;
  std::memcpy(&v, b.data(), 8);
  return v;
}

Status SetStoreWord(PageStore& store, uint64_t page, uint64_t v) {
  std::vector<uint8_t> b(kPage, 0);
  std::memcpy(b.data(), &v, 8);
  return store.WritePage(kBase + page * kPage, b);
}

// The client: maps the region through `dev` (the descriptor its daemon
// handed it), then runs the step the parent names (one byte on `cmd`) and
// reports a word on `out` after each.
[[noreturn]] void Client(int dev, int cmd, int out) {
  auto m = KmodClientMapRegion(dev, kBase, kPages * kPage);
  uint64_t word = m.ok() ? 1 : 0;
  if (::write(out, &word, 8) != 8 || !m.ok()) ::_exit(2);
  auto* mem = static_cast<volatile uint64_t*>(m->addr);
  auto at = [&](uint64_t page) { return mem + page * kPage / 8; };
  for (;;) {
    char c = 0;
    if (::read(cmd, &c, 1) != 1) ::_exit(0);
    switch (c) {
      case 'r': word = *at(0); break;                 // read page 0
      case 'w': *at(0) = 0x2222; word = *at(0); break;  // write page 0
      case 'h':                                        // 100 reads of page 0
        for (int i = 0; i < 100; ++i) word = *at(0);
        break;
      case 'x': word = *at(1); break;                 // read page 1 (to be failed)
      case 'y': word = *at(2); break;                 // read page 2 (forgotten once)
      default: ::_exit(3);
    }
    if (::write(out, &word, 8) != 8) ::_exit(4);
  }
}

struct Harness {
  std::unique_ptr<KmodBackend> backend;
  std::unique_ptr<PageStore> store;
  pid_t child = -1;
  int cmd = -1, out = -1;
  std::set<uint64_t> fail_pages;  // pages whose faults are answered with an error
  std::set<uint64_t> forget_once;  // pages whose first fault is ended unserved (kRetry)
  std::vector<FaultEvent> seen;

  // Answers fault events as the agent would, until the client reports a
  // word (or dies, or 10 s pass). Returns the word, or nullopt.
  bool Step(char c, uint64_t* word) {
    if (::write(cmd, &c, 1) != 1) return false;
    for (int waited = 0; waited < 10000;) {
      pollfd p[2] = {{out, POLLIN, 0}, {backend->event_fd(), POLLIN, 0}};
      if (::poll(p, 2, 10) == 0) {
        waited += 10;
        continue;
      }
      FaultEvent ev[16];
      auto n = backend->ReadEvents(ev);
      for (size_t i = 0; n.ok() && i < *n; ++i) {
        if (ev[i].kind != FaultEventKind::kFault) {
          seen.push_back(ev[i]);
          continue;
        }
        seen.push_back(ev[i]);
        const uint64_t index = (ev[i].page - kBase) / kPage;
        if (fail_pages.count(index)) {
          backend->Resolve(ev[i].token, Resolution::kError).IgnoreError();
          continue;
        }
        if (forget_once.erase(index)) {  // as a daemon that dropped its state
          Status st = backend->Resolve(ev[i].token, Resolution::kRetry);
          if (!st.ok()) std::printf("# retry of page %lu: %s\n", index, st.ToString().c_str());
          continue;
        }
        Status st = ev[i].write ? backend->MapWrite(ev[i].page) : backend->MapRead(ev[i].page);
        if (st.ok()) st = backend->Resolve(ev[i].token, Resolution::kRetry);
        if (!st.ok()) std::printf("# answering page %lu: %s\n", index, st.ToString().c_str());
      }
      if (p[0].revents & POLLIN) return ::read(out, word, 8) == 8;
      if (p[0].revents & (POLLHUP | POLLERR)) return false;
    }
    return false;
  }
  // Forks the client with the daemon's client descriptor; false on failure.
  bool StartClient() {
    int to_child[2], from_child[2];
    if (::pipe(to_child) != 0 || ::pipe(from_child) != 0) return false;
    const int dev = backend->client_map_fd(*store);
    std::fflush(stdout);
    child = ::fork();
    if (child == 0) {
      ::close(to_child[1]);
      ::close(from_child[0]);
      Client(dev, to_child[0], from_child[1]);
    }
    ::close(to_child[0]);
    ::close(from_child[1]);
    cmd = to_child[1];
    out = from_child[0];
    uint64_t word = 0;
    return ::read(out, &word, 8) == 8 && word == 1;
  }
  size_t faults_seen() const {
    size_t n = 0;
    for (const FaultEvent& e : seen) n += e.kind == FaultEventKind::kFault;
    return n;
  }
};

}  // namespace

int main() {
  std::printf("# kmod backend test\n");
  Harness h;
  auto backend = KmodBackend::Create();
  CheckOk(backend.status(), "the backend opens /dev/dsvm and claims the control file");
  if (!backend.ok()) return 1;
  h.backend = std::move(*backend);
  auto store = PageStore::Create(kBase, kPages * kPage, kPage);
  CheckOk(store.status(), "a page store");
  if (!store.ok()) return 1;
  h.store = std::move(*store);
  auto big = PageStore::Create(kBase + (1ull << 30), 2ull << 20, 2u << 20);
  if (big.ok()) {
    Check(h.backend->AddRegion(big->get()).code() == StatusCode::kInvalidArgument,
          "a region of 2 MiB pages is refused with a sentence");
  }
  CheckOk(h.backend->AddRegion(h.store.get()), "AddRegion");
  Check(h.backend->AddRegion(h.store.get()).code() == StatusCode::kAlreadyExists,
        "AddRegion twice is kAlreadyExists");
  CheckOk(SetStoreWord(*h.store, 0, 0x1111), "the store holds page 0");

  Check(h.StartClient(), "the client maps the region through the daemon's /dev/dsvm file");
  {
    UniqueFd own(::open("/dev/dsvm", O_RDWR | O_CLOEXEC));
    Check(KmodClientMapRegion(own.get(), kBase, kPages * kPage).status().code() ==
              StatusCode::kInvalidArgument,
          "a /dev/dsvm file the daemon did not attach cannot map its region");
  }
  uint64_t word = 0;

  // A second daemon on the host (a test cluster): its own domain, with a
  // region at the same address holding other bytes, and its own client.
  {
    Harness h2;
    auto backend2 = KmodBackend::Create();
    CheckOk(backend2.status(), "a second backend on the host claims a control file of its own");
    auto store2 = PageStore::Create(kBase, kPages * kPage, kPage);
    if (backend2.ok() && store2.ok()) {
      h2.backend = std::move(*backend2);
      h2.store = std::move(*store2);
      CheckOk(h2.backend->AddRegion(h2.store.get()), "it registers a region at the same base");
      CheckOk(SetStoreWord(*h2.store, 0, 0x9999), "its store holds other bytes for page 0");
      Check(h2.StartClient(), "its client maps the region through its file");
      Check(h2.Step('r', &word) && word == 0x9999 && h2.faults_seen() == 1,
            "the second daemon's client reads the second daemon's bytes");
      FaultEvent ev[4];
      auto n = h.backend->ReadEvents(ev);
      Check(n.ok() && *n == 0, "the first daemon saw none of its faults");
      ::close(h2.cmd);  // the client exits on EOF
      int status = 0;
      Check(::waitpid(h2.child, &status, 0) == h2.child && WIFEXITED(status) &&
                WEXITSTATUS(status) == 0,
            "the second client exits cleanly");
      CheckOk(h2.backend->InvalidateAll(kBase), "the second daemon invalidates its region");
      CheckOk(h2.backend->RemoveRegion(kBase), "and removes it");
    }
  }

  MappingRequest req;
  req.region = kBase;
  req.pid = h.child;
  req.fault_fd = UniqueFd(::dup(h.backend->client_map_fd(*h.store)));
  auto mapping = h.backend->AddMapping(std::move(req));
  CheckOk(mapping.status(), "AddMapping with the client's device descriptor");
  MappingRequest bad;
  bad.region = kBase;
  bad.pid = h.child;
  bad.fault_fd = UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  Check(h.backend->AddMapping(std::move(bad)).status().code() == StatusCode::kInvalidArgument,
        "AddMapping with a descriptor not of /dev/dsvm is refused");
  MappingRequest other;
  other.region = kBase;
  other.pid = h.child;
  other.fault_fd = UniqueFd(::dup(h.backend->client_map_fd(*h.store)));
  other.pidfd = UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  Check(other.pidfd && h.backend->AddMapping(std::move(other)).status().code() ==
                           StatusCode::kInvalidArgument,
        "AddMapping with a pidfd of another process than the client is refused");

  Check(h.Step('r', &word) && word == 0x1111, "a read miss becomes an event; MapRead installs the store's bytes");
  Check(h.faults_seen() == 1 && !h.seen.back().write, "one read event");
  const size_t before = h.faults_seen();
  Check(h.Step('h', &word) && word == 0x1111 && h.faults_seen() == before,
        "reads of an installed page never reach the daemon");
  Check(h.backend->local_hits() > 0, "the module counts the faults it resolved itself");
  Check(h.Step('w', &word) && word == 0x2222, "a write to a Shared page: upgrade event, MapWrite upgrades in place");
  Check(h.seen.back().write, "the upgrade event is a write");
  CheckOk(h.backend->WriteBack(kBase), "WriteBack");
  Check(StoreWord(*h.store, 0) == 0x2222, "WriteBack brings the client's write into the store");
  CheckOk(h.backend->Unmap(kBase), "Unmap (give up: copy back and drop)");
  Check(StoreWord(*h.store, 0) == 0x2222, "the bytes stay in the store after Unmap");
  const size_t before_unmap = h.faults_seen();
  Check(h.Step('r', &word) && word == 0x2222 && h.faults_seen() == before_unmap + 1,
        "after Unmap a read faults again and sees the bytes");
  CheckOk(SetStoreWord(*h.store, 0, 0x3333), "the daemon changes the store's bytes");
  CheckOk(h.backend->Refresh(kBase), "Refresh");
  Check(h.Step('r', &word) && word == 0x3333, "after Refresh the client sees the new bytes");
  CheckOk(SetStoreWord(*h.store, 2, 0x4444), "the store holds page 2");
  h.forget_once.insert(2);
  const size_t before_forget = h.faults_seen();
  Check(h.Step('y', &word) && word == 0x4444 && h.faults_seen() == before_forget + 2,
        "a wait ended unserved (kRetry) wakes the thread, which faults again and is served");
  Check(h.backend->RemoveRegion(kBase).code() == StatusCode::kFailedPrecondition,
        "RemoveRegion is refused while a client maps the region");

  if (h.backend->features() & DSVM_FEATURE_POISON) {
    h.fail_pages.insert(1);
    h.Step('x', &word);  // the client dies of SIGBUS instead of answering
    int status = 0;
    Check(::waitpid(h.child, &status, 0) == h.child && WIFSIGNALED(status) &&
              WTERMSIG(status) == SIGBUS,
          "a fault answered with an error is SIGBUS in the client");
  } else {
    std::printf("# no DSVM_FEATURE_POISON: the error case is skipped\n");
    ::kill(h.child, SIGKILL);
    ::waitpid(h.child, nullptr, 0);
  }
  // The client is gone: its mapping is reported closed.
  bool closed = false;
  for (const FaultEvent& e : h.seen) {  // Step may have read it already
    if (e.kind == FaultEventKind::kMappingClosed && e.mapping == *mapping) closed = true;
  }
  for (int i = 0; i < 200 && !closed; ++i) {
    ::poll(nullptr, 0, 10);
    FaultEvent ev[4];
    auto n = h.backend->ReadEvents(ev);
    for (size_t k = 0; n.ok() && k < *n; ++k) {
      if (ev[k].kind == FaultEventKind::kMappingClosed && ev[k].mapping == *mapping) closed = true;
    }
  }
  Check(closed, "the client's exit is a kMappingClosed event");
  CheckOk(h.backend->RemoveMapping(*mapping), "RemoveMapping");
  CheckOk(h.backend->InvalidateAll(kBase), "InvalidateAll");
  CheckOk(h.backend->RemoveRegion(kBase), "RemoveRegion once no client maps it");
  h.backend.reset();
  std::printf("1..%d\n# %d passed, %d failed\n", g_case, g_case - g_failed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
