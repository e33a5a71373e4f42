// libdsvm's C API (include/dsvm/dsvm.h) over one DaemonConnection.
//
// State: one Library per process while initialised, behind g_mu. Every entry
// point that touches it holds g_mu for its whole run, daemon round trips
// included: requests are rare (regions are opened once, then used through
// plain loads and stores), and one request in flight keeps the connection's
// request/reply pairing trivial.
//
// Lock order: g_mu only. The watcher thread takes g_mu after its poll wakes,
// never while polling, so dsvm_finalize releases g_mu before joining it.
//
// Region lifecycle in this process (PROTOCOL.md, "Client plane"):
//   RegionCreate/RegionOpen -> RegionReply + memfd
//   -> mmap at base + a userfaultfd and pidfd (node::ClientMapRegion; with
//      the kmod backend the descriptor is /dev/dsvm's and goes back itself)
//   -> MapRegion{base} + [uffd, pidfd] -> StatusReply OK: the daemon serves
//      the range's faults; only now does the caller get the address; this
//      process drops its copies of the uffd and pidfd
//   ... dsvm_region_close: UnmapRegion{base} -> StatusReply, then munmap.
//
// Every C entry point catches exceptions (only std::bad_alloc can arise):
// nothing unwinds into C callers.
#include <dsvm/dsvm.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <variant>
#include <vector>

#include "client/lib/api_errors.h"
#include "client/lib/client_testing.h"
#include "client/lib/daemon_connection.h"
#include "client/lib/gpu_ipc.h"
#include "client/lib/open_regions.h"
#include "node/fault/client_mapping.h"
#include "proto/log.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::client {
namespace {

static_assert(kMaxStatusCode < 32, "DSVM_E* codes -1..-31 mirror StatusCode; dsvm.h must grow");
static_assert(DSVM_MAX_NAME_LENGTH == proto::kMaxNameLength);
static_assert(DSVM_PAGE_SIZE_2M == proto::kMaxPageSize);

// --- Argument checks ----------------------------------------------------------

// The coordinator's rule (coordinator/cluster/region_table.cc), checked here
// too so a bad name is refused before any round trip, with the same words.
Status ValidateName(const char* name) {
  if (name == nullptr) return InvalidArgument("region name is NULL");
  const size_t n = strnlen(name, proto::kMaxNameLength + 1);
  if (n == 0) return InvalidArgument("region name is empty");
  if (n > proto::kMaxNameLength) {
    return InvalidArgument("region name longer than " + std::to_string(proto::kMaxNameLength));
  }
  if (name[0] == '.') return InvalidArgument("region name starts with '.'");
  for (size_t i = 0; i < n; ++i) {
    const char c = name[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) {
      char buf[96];
      std::snprintf(buf, sizeof(buf),
                    "region name has byte 0x%02x at position %zu, outside [A-Za-z0-9._-]",
                    static_cast<unsigned char>(c), i);
      return InvalidArgument(buf);
    }
  }
  return Status::Ok();
}

bool ValidPageSize(uint64_t p) {
  return p == DSVM_PAGE_SIZE_4K || p == DSVM_PAGE_SIZE_64K || p == DSVM_PAGE_SIZE_2M;
}

// For messages: a name already validated.
std::string Quoted(const char* name) { return std::string("'") + name + "'"; }

// --- Process state ---------------------------------------------------------------

struct OpenRegion {
  std::string name;
  uint64_t base = 0;
  uint64_t size = 0;
  uint32_t page_size = 0;
};

// A node daemon's GPU arena as this process reaches it (dsvm_gpu_map):
// mapped once, kept until dsvm_finalize.
struct GpuArena {
  proto::DeviceKind kind = proto::DeviceKind::kInvalid;
  void* base = nullptr;  // emulated: our mapping of its memfd; cuda: our IPC device pointer
  uint64_t bytes = 0;
  // Which allocation this is: the daemon's arena id is its device address,
  // which a later arena may get again once this one is freed (the daemon
  // gives empty arenas back). emulated: the memfd's (device, inode); cuda:
  // the IPC handle's bytes.
  std::vector<uint8_t> identity;
};

struct Library {
  DaemonConnection conn;
  std::string socket_path;
  proto::NodeId node = proto::kNoNode;
  uint64_t window_base = 0;
  uint64_t window_size = 0;
  std::map<uint64_t, OpenRegion> regions;  // by base
  std::map<uint64_t, GpuArena> gpu_arenas;  // by the daemon's arena id
  // Zero-copy maps registered with CUDA, by (address, length): how many.
  std::map<std::pair<uint64_t, uint64_t>, int> cuda_host_maps;
  std::string broken_why;                  // non-empty once the connection broke
  node::UniqueFd wake;                     // eventfd: dsvm_finalize stops the watcher
  pthread_t watcher{};
  bool watcher_started = false;
};

std::mutex g_mu;
Library* g_lib = nullptr;                                              // GUARDED_BY(g_mu)
std::chrono::milliseconds g_request_timeout = kDefaultRequestTimeout;  // GUARDED_BY(g_mu)
std::once_flag g_atfork_once;

// The connection is gone (or this side gave up on it): the daemon no longer
// serves this process's faults, so its regions would silently become
// private, incoherent views of the node's memfds. Make them inaccessible
// (kept reserved, so nothing else is mapped there before close), and refuse
// further requests. REQUIRES: g_mu held.
void BreakLocked(Library* lib, const std::string& why) {
  if (!lib->broken_why.empty()) return;
  lib->broken_why = why;
  for (auto& [base, r] : lib->regions) {
    ::mprotect(reinterpret_cast<void*>(base), r.size, PROT_NONE);
  }
  lib->conn.Shutdown();
  // The caller of the request that failed hears of it; the regions' users,
  // whose next access faults, only from this line.
  if (lib->regions.empty()) return;
  std::string regions;
  for (auto& [base, r] : lib->regions) regions += " '" + r.name + "'@" + Hex(base);
  LogError("libdsvm: lost the node daemon at " + lib->socket_path + " (" + why +
           "); these regions are no longer accessible:" + regions);
}

// One request to the daemon. A failure breaks the connection (see
// DaemonConnection). REQUIRES: g_mu held.
Result<DaemonReply> CallLocked(Library* lib, const proto::Message& m,
                               std::span<const int> fds = {}) {
  if (!lib->broken_why.empty()) {
    return Unavailable("the connection to the node daemon broke earlier (" + lib->broken_why +
                       "); dsvm_finalize, then dsvm_init, to connect again");
  }
  auto r = lib->conn.Call(m, fds);
  if (!r.ok()) BreakLocked(lib, r.status().message());
  return r;
}

// The daemon broke the protocol: stop talking to it. REQUIRES: g_mu held.
Status ProtocolViolation(Library* lib, const proto::Message& request, const std::string& what) {
  const std::string why = "the node daemon answered " +
                          std::string(proto::TypeName(proto::TypeOf(request))) + " with " + what;
  BreakLocked(lib, why);
  return Internal(why);
}

std::string Described(const DaemonReply& r) {
  return std::string(proto::TypeName(proto::TypeOf(r.message))) + " carrying " +
         std::to_string(r.fds.size()) + " descriptors";
}

// A request answered by a StatusReply. REQUIRES: g_mu held.
Status StatusCallLocked(Library* lib, const proto::Message& m, std::span<const int> fds = {}) {
  auto r = CallLocked(lib, m, fds);
  if (!r.ok()) return r.status();
  const auto* st = std::get_if<proto::StatusReply>(&r->message);
  if (st == nullptr || !r->fds.empty()) return ProtocolViolation(lib, m, Described(*r));
  return proto::FromReply(*st);
}

// A RegionCreate or RegionOpen: a RegionReply with the region's memfd, or
// the daemon's refusal. REQUIRES: g_mu held.
Result<std::pair<proto::RegionReply, node::UniqueFd>> RegionCallLocked(Library* lib,
                                                                       const proto::Message& m) {
  auto r = CallLocked(lib, m);
  if (!r.ok()) return r.status();
  if (const auto* st = std::get_if<proto::StatusReply>(&r->message);
      st != nullptr && st->code != 0 && r->fds.empty()) {
    return proto::FromReply(*st);
  }
  auto* region = std::get_if<proto::RegionReply>(&r->message);
  if (region == nullptr || r->fds.size() != 1) return ProtocolViolation(lib, m, Described(*r));
  return std::make_pair(std::move(*region), std::move(r->fds[0]));
}

// Checks a RegionReply for region `name` against the window the daemon
// announced and the memfd that came with it. Errors: kInternal. Unlike a
// malformed record, an implausible reply keeps the connection: no state of
// the daemon's depends on this client mapping the region.
Status ValidateRegionReply(const Library& lib, const proto::RegionReply& r, const char* name,
                           int memfd) {
  auto bad = [&](const std::string& what) {
    return Internal("the node daemon's reply for region " + Quoted(name) + " " + what);
  };
  if (r.name != name) return bad("names region '" + r.name + "'");
  if (!ValidPageSize(r.page_size)) return bad("has page size " + std::to_string(r.page_size));
  if (r.size == 0 || r.size % r.page_size != 0 || r.base == 0 || r.base % r.page_size != 0) {
    return bad("has a range not aligned to its pages: base " + Hex(r.base) + ", size " +
               std::to_string(r.size));
  }
  if (r.base < lib.window_base || r.size > lib.window_size ||
      r.base - lib.window_base > lib.window_size - r.size) {
    return bad("lies outside the cluster window: base " + Hex(r.base) + ", size " +
               std::to_string(r.size));
  }
  struct stat st {};
  if (::fstat(memfd, &st) == 0 && S_ISCHR(st.st_mode)) return Status::Ok();  // /dev/dsvm (kmod)
  if (::fstat(memfd, &st) != 0 || !S_ISREG(st.st_mode) ||
      static_cast<uint64_t>(st.st_size) < r.size) {
    // Touching a page past the end of the file would be SIGBUS.
    return bad("came with a descriptor that is neither /dev/dsvm nor a memfd of the region's size");
  }
  return Status::Ok();
}

// Has the daemon serve this process's mapping [addr, addr + size) of region
// `r` (`attach`: the fault descriptor, then a pidfd if there is one), and
// records the region as open; undoes the mapping when the daemon refuses.
// REQUIRES: g_mu held.
Status ServeMappingLocked(Library* lib, const proto::RegionReply& r, void* addr, size_t size,
                          const std::vector<int>& attach) {
  Status st = StatusCallLocked(lib, proto::MapRegion{r.base}, attach);
  if (!st.ok()) {
    ::munmap(addr, size);
    return st;
  }
  lib->regions[r.base] = OpenRegion{r.name, r.base, r.size, r.page_size};
  return Status::Ok();
}

// Maps region `r` from its memfd and has the daemon serve the mapping.
// Errors: those of ValidateRegionReply and node::ClientMapRegion
// (kResourceExhausted: the range is taken here; kPermissionDenied: no
// userfaultfd), the daemon's MapRegion refusal, the connection's.
// REQUIRES: g_mu held.
Status MapLocked(Library* lib, const proto::RegionReply& r, node::UniqueFd memfd,
                 const char* name) {
  DSVM_RETURN_IF_ERROR(ValidateRegionReply(*lib, r, name, memfd.get()));
  // A memfd (uffd backend) or dsvm.ko's /dev/dsvm (kmod backend).
  auto mapping = node::ClientMapRegion(std::move(memfd), r.base, r.size);
  if (!mapping.ok()) {
    if (mapping.status().code() == StatusCode::kResourceExhausted) {
      return ResourceExhausted("something else is mapped at the region's range " + Hex(r.base) +
                               ".." + Hex(r.base + r.size) + " in this process");
    }
    return mapping.status();
  }
  // `mapping` goes out of scope after the call: this process keeps no copy
  // of a userfaultfd (node/fault/uffd_client.h), so the daemon's death
  // unregisters the range.
  return ServeMappingLocked(lib, r, mapping->addr, mapping->size, mapping->attach());
}

const OpenRegion* FindByName(const Library& lib, const char* name) {
  for (const auto& [base, r] : lib.regions) {
    if (r.name == name) return &r;
  }
  return nullptr;
}

// --- Watcher thread -------------------------------------------------------------

// Notices the daemon's death while the application is not calling libdsvm
// (it is using its regions): polls the connection for a hang-up only, so it
// never consumes a reply meant for a request in flight.
void* WatchDaemon(void* arg) {
  auto* lib = static_cast<Library*>(arg);
  pollfd p[2] = {{lib->conn.fd(), POLLRDHUP, 0}, {lib->wake.get(), POLLIN, 0}};
  for (;;) {
    const int n = ::poll(p, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      LogError(std::string("libdsvm: watching the node daemon's connection: ") +
               std::strerror(errno));
      return nullptr;
    }
    if (p[1].revents != 0) return nullptr;  // dsvm_finalize
    if (p[0].revents != 0) break;
  }
  std::lock_guard<std::mutex> l(g_mu);
  if (g_lib == lib) BreakLocked(lib, "the node daemon closed the connection");
  return nullptr;
}

// Around fork(): the child is single-threaded and owns nothing of the
// parent's: regions are MADV_DONTFORK, and the connection belongs to the
// parent (closing the child's copy of the descriptor does not shut it down).
void AtForkPrepare() { g_mu.lock(); }
void AtForkParent() { g_mu.unlock(); }
void AtForkChild() {
  if (g_lib != nullptr) {
    g_lib->regions.clear();
    delete g_lib;  // closes descriptors; never joins: the watcher is not in this process
    g_lib = nullptr;
  }
  g_mu.unlock();
}

Status StartWatcher(Library* lib) {
  lib->wake.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!lib->wake) return IoError(std::string("eventfd: ") + std::strerror(errno));
  // The thread takes no signal meant for the application.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  const int rc = pthread_create(&lib->watcher, nullptr, WatchDaemon, lib);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (rc != 0) return ResourceExhausted(std::string("pthread_create: ") + std::strerror(rc));
  lib->watcher_started = true;
  return Status::Ok();
}

void StopWatcher(Library* lib) {
  if (!lib->watcher_started) return;
  const uint64_t one = 1;
  ssize_t ignored = ::write(lib->wake.get(), &one, sizeof(one));
  (void)ignored;
  pthread_join(lib->watcher, nullptr);
  lib->watcher_started = false;
}

// --- Entry points -------------------------------------------------------------------

int Init(const char* socket_path) {
  std::call_once(g_atfork_once, [] { pthread_atfork(AtForkPrepare, AtForkParent, AtForkChild); });
  std::string path;
  if (socket_path != nullptr) {
    path = socket_path;
    if (path.empty()) return Fail(DSVM_EINVALID_ARGUMENT, "dsvm_init: the socket path is empty");
  } else if (const char* env = std::getenv("DSVM_SOCKET"); env != nullptr && env[0] != '\0') {
    path = env;
  } else {
    path = DSVM_DEFAULT_SOCKET;
  }
  const std::string what = "dsvm_init(" + path + ")";

  std::lock_guard<std::mutex> l(g_mu);
  if (g_lib != nullptr) {
    return Fail(DSVM_EFAILED_PRECONDITION, what + ": already initialised (connected to " +
                                               g_lib->socket_path + "); call dsvm_finalize first");
  }
  auto conn = DaemonConnection::Connect(path, g_request_timeout);
  if (!conn.ok()) return FailWith(what, conn.status());
  auto lib = std::make_unique<Library>();
  lib->conn = std::move(conn).value();
  lib->socket_path = path;

  const proto::ClientHello hello{proto::kClientAbi};
  auto r = CallLocked(lib.get(), hello);
  if (!r.ok()) return FailWith(what, r.status());
  if (const auto* st = std::get_if<proto::StatusReply>(&r->message);
      st != nullptr && st->code != 0 && r->fds.empty()) {
    const Status s = proto::FromReply(*st);
    if (s.code() == StatusCode::kInvalidArgument) {
      // A ClientHello carries nothing but the ABI.
      return Fail(DSVM_EFAILED_PRECONDITION, what + ": the daemon refused this library's ABI " +
                                                 std::to_string(proto::kClientAbi) + ": " +
                                                 s.message());
    }
    return FailWith(what, s);
  }
  const auto* reply = std::get_if<proto::ClientHelloReply>(&r->message);
  if (reply == nullptr || !r->fds.empty()) {
    return FailWith(what, ProtocolViolation(lib.get(), hello, Described(*r)));
  }
  if (reply->node == proto::kNoNode || reply->window_size == 0 ||
      reply->window_base % DSVM_PAGE_SIZE_4K != 0 ||
      reply->window_base + reply->window_size < reply->window_base) {
    return FailWith(what, ProtocolViolation(lib.get(), hello,
                                            "node " + std::to_string(reply->node) + ", window " +
                                                Hex(reply->window_base) + " + " +
                                                std::to_string(reply->window_size)));
  }
  lib->node = reply->node;
  lib->window_base = reply->window_base;
  lib->window_size = reply->window_size;
  if (Status st = StartWatcher(lib.get()); !st.ok()) return FailWith(what, st);
  g_lib = lib.release();
  return Succeed();
}

int Finalize() {
  std::unique_ptr<Library> lib;
  {
    std::lock_guard<std::mutex> l(g_mu);
    if (g_lib == nullptr) {
      return Fail(DSVM_ENOT_INITIALIZED, "dsvm_finalize: libdsvm is not initialised");
    }
    for (auto& [base, r] : g_lib->regions) {
      // The daemon stops serving before the range goes (PROTOCOL.md). A
      // failure breaks the connection, which tells the daemon as much.
      if (g_lib->broken_why.empty()) {
        StatusCallLocked(g_lib, proto::UnmapRegion{base}).IgnoreError();
      }
      ::munmap(reinterpret_cast<void*>(base), r.size);
    }
    g_lib->regions.clear();
    for (auto& [id, a] : g_lib->gpu_arenas) {
      if (a.kind == proto::DeviceKind::kEmulated) ::munmap(a.base, a.bytes);
      if (a.kind == proto::DeviceKind::kCuda) CloseCudaArena(a.base);
    }
    g_lib->gpu_arenas.clear();
    for (auto& [range, n] : g_lib->cuda_host_maps) {
      UnregisterCudaHost(reinterpret_cast<void*>(range.first));
    }
    g_lib->cuda_host_maps.clear();
    lib.reset(g_lib);
    g_lib = nullptr;
  }
  // Outside g_mu: the watcher may be waiting for it.
  StopWatcher(lib.get());
  return Succeed();  // ~Library closes the connection
}

int NotInitialized(const std::string& what) {
  return Fail(DSVM_ENOT_INITIALIZED, what + ": libdsvm is not initialised; call dsvm_init");
}

// A token argument: NULL, or 1..255 bytes. Fills *out.
Status ValidateToken(const char* token, std::string* out) {
  out->clear();
  if (token == nullptr) return Status::Ok();
  const size_t n = ::strnlen(token, proto::kMaxTokenLength + 1);
  if (n == 0) return InvalidArgument("the token is empty (pass NULL for none)");
  if (n > proto::kMaxTokenLength) {
    return InvalidArgument("the token is longer than " + std::to_string(proto::kMaxTokenLength) +
                           " bytes");
  }
  out->assign(token, n);
  return Status::Ok();
}

int RegionCreate(const char* name, size_t size, const dsvm_region_attr_t* attr, void** addr,
                 const char* fn) {
  std::string what = fn;
  if (Status s = ValidateName(name); !s.ok()) return FailWith(what, s);
  what += "(" + Quoted(name) + ")";
  if (addr == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, what + ": addr is NULL");
  if (size == 0) return Fail(DSVM_EINVALID_ARGUMENT, what + ": size is 0");
  size_t page_size = attr->page_size;
  proto::RegionCreate request;
  request.name = name;
  request.size = size;
  request.mode = attr->mode == 0 ? proto::kDefaultRegionMode : attr->mode;
  if (attr->mode > proto::kMaxRegionMode) {
    return Fail(DSVM_EINVALID_ARGUMENT, what + ": mode " + std::to_string(attr->mode) +
                                            " has bits beyond 0777");
  }
  if (Status s = ValidateToken(attr->token, &request.token); !s.ok()) return FailWith(what, s);
  if (page_size == 0) page_size = DSVM_PAGE_SIZE_4K;
  if (!ValidPageSize(page_size)) {
    return Fail(DSVM_EINVALID_ARGUMENT, what + ": page size " + std::to_string(page_size) +
                                            " is not 4096, 65536 or 2097152");
  }
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  if (size > lib->window_size) {
    return Fail(DSVM_ERESOURCE_EXHAUSTED, what + ": " + std::to_string(size) +
                                              " bytes is larger than the cluster window (" +
                                              std::to_string(lib->window_size) + " bytes)");
  }
  const uint64_t rounded = (size + page_size - 1) / page_size * page_size;
  request.page_size = static_cast<uint32_t>(page_size);
  auto r = RegionCallLocked(lib, request);
  if (!r.ok()) return FailWith(what, r.status());
  auto& [region, memfd] = *r;
  Status st;
  if (region.page_size != page_size || region.size < rounded) {
    st = Internal("the node daemon's reply for region " + Quoted(name) + " has size " +
                  std::to_string(region.size) + " and page size " +
                  std::to_string(region.page_size) + ", not what was asked");
  } else {
    st = MapLocked(lib, region, std::move(memfd), name);
  }
  if (!st.ok()) {
    // Create is create-and-map: leave no region this caller does not know of.
    std::string undo = "; the region was deleted again";
    if (!lib->broken_why.empty() ||
        !StatusCallLocked(lib, proto::RegionDelete{.name = name}).ok()) {
      undo = "; deleting the region again failed too: dsvm_region_destroy it";
    }
    return Fail(CodeOf(st.code()), what + ": " + st.message() + undo);
  }
  *addr = reinterpret_cast<void*>(region.base);
  return Succeed();
}

int RegionOpen(const char* name, const char* token, void** addr, size_t* size, const char* fn) {
  std::string what = fn;
  if (Status s = ValidateName(name); !s.ok()) return FailWith(what, s);
  what += "(" + Quoted(name) + ")";
  if (addr == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, what + ": addr is NULL");
  proto::RegionOpen request;
  request.name = name;
  if (Status s = ValidateToken(token, &request.token); !s.ok()) return FailWith(what, s);
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  if (const OpenRegion* open = FindByName(*lib, name); open != nullptr) {
    return Fail(DSVM_EFAILED_PRECONDITION,
                what + ": this process has it open already at " + Hex(open->base));
  }
  auto r = RegionCallLocked(lib, request);
  if (!r.ok()) return FailWith(what, r.status());
  auto& [region, memfd] = *r;
  if (Status st = MapLocked(lib, region, std::move(memfd), name); !st.ok()) {
    return FailWith(what, st);
  }
  *addr = reinterpret_cast<void*>(region.base);
  if (size != nullptr) *size = region.size;
  return Succeed();
}

int RegionClose(void* addr) {
  const std::string what = "dsvm_region_close(" + Hex(reinterpret_cast<uintptr_t>(addr)) + ")";
  if (addr == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, what + ": addr is NULL");
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  const uint64_t a = reinterpret_cast<uintptr_t>(addr);
  auto it = lib->regions.find(a);
  if (it == lib->regions.end()) {
    auto after = lib->regions.upper_bound(a);
    if (after != lib->regions.begin()) {
      const OpenRegion& r = std::prev(after)->second;
      if (a - r.base < r.size) {
        return Fail(DSVM_EINVALID_ARGUMENT, what + ": the address is inside region '" + r.name +
                                                "'; pass its start, " + Hex(r.base));
      }
    }
    return Fail(DSVM_EINVALID_ARGUMENT,
                what + ": not the address of a region open in this process");
  }
  // The daemon stops serving the mapping before it goes (PROTOCOL.md). With
  // the connection broken there is nobody to tell: the daemon dropped every
  // mapping of this client when it closed.
  Status told;
  if (lib->broken_why.empty()) told = StatusCallLocked(lib, proto::UnmapRegion{a});
  const std::string name = it->second.name;
  ::munmap(addr, it->second.size);
  lib->regions.erase(it);
  if (!told.ok()) {
    return Fail(CodeOf(told.code()), what + " '" + name +
                                         "': released here, but the node "
                                         "daemon was not told: " +
                                         told.message());
  }
  return Succeed();
}

int RegionDestroy(const char* name) {
  std::string what = "dsvm_region_destroy";
  if (Status s = ValidateName(name); !s.ok()) return FailWith(what, s);
  what += "(" + Quoted(name) + ")";
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  if (const OpenRegion* open = FindByName(*lib, name); open != nullptr) {
    return Fail(DSVM_EFAILED_PRECONDITION, what + ": this process has it open at " +
                                               Hex(open->base) + "; dsvm_region_close it first");
  }
  if (Status st = StatusCallLocked(lib, proto::RegionDelete{.name = name}); !st.ok()) {
    return FailWith(what, st);
  }
  return Succeed();
}

int NodeId(uint32_t* id) {
  if (id == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, "dsvm_node_id: id is NULL");
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized("dsvm_node_id");
  *id = lib->node;
  return Succeed();
}

// A request about [addr, addr + len) of a region open here. REQUIRES: g_mu
// not held (FindOpenRange takes it).
int RangeCall(const std::string& what, const void* addr, size_t len, const proto::Message& m) {
  if (addr == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, what + ": addr is NULL");
  OpenRange range;
  if (int rc = FindOpenRange(what, reinterpret_cast<uintptr_t>(addr), len, &range); rc != DSVM_OK) {
    return rc;
  }
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  if (Status st = StatusCallLocked(lib, m); !st.ok()) return FailWith(what, st);
  return Succeed();
}

int Prefetch(const void* addr, size_t len, unsigned flags) {
  const std::string what = "dsvm_prefetch(" + Hex(reinterpret_cast<uintptr_t>(addr)) + ", " +
                           std::to_string(len) + ")";
  if ((flags & ~DSVM_PREFETCH_WRITE) != 0) {
    return Fail(DSVM_EINVALID_ARGUMENT, what + ": unknown flags " + Hex(flags));
  }
  proto::Prefetch m;
  m.address = reinterpret_cast<uintptr_t>(addr);
  m.length = len;
  m.write = (flags & DSVM_PREFETCH_WRITE) != 0;
  return RangeCall(what, addr, len, m);
}

// The arena a GpuMapReply names, reached in this process (cached per
// arena id). REQUIRES: g_mu held.
Result<void*> ArenaOfLocked(Library* lib, const proto::GpuMapReply& r, DaemonReply& reply) {
  GpuArena a;
  a.kind = r.kind;
  a.bytes = r.arena_bytes;
  struct stat st {};
  if (r.kind == proto::DeviceKind::kEmulated) {
    if (reply.fds.empty() || ::fstat(reply.fds[0].get(), &st) != 0 || !S_ISREG(st.st_mode) ||
        static_cast<uint64_t>(st.st_size) < r.arena_bytes) {
      return Internal("the node daemon's arena descriptor is not a memfd of the arena's size");
    }
    a.identity.resize(sizeof(st.st_dev) + sizeof(st.st_ino));
    std::memcpy(a.identity.data(), &st.st_dev, sizeof(st.st_dev));
    std::memcpy(a.identity.data() + sizeof(st.st_dev), &st.st_ino, sizeof(st.st_ino));
  } else {
    a.identity = r.ipc_handle;
  }
  auto it = lib->gpu_arenas.find(r.arena);
  if (it != lib->gpu_arenas.end()) {
    if (it->second.identity == a.identity) {
      if (it->second.kind != r.kind || it->second.bytes != r.arena_bytes) {
        return Internal("the node daemon named arena " + Hex(r.arena) + " with another size or kind");
      }
      return it->second.base;
    }
    // The arena we knew at that address was freed, and this is a new one:
    // our view of the old one goes (no map can be in a freed arena).
    if (it->second.kind == proto::DeviceKind::kCuda) {
      CloseCudaArena(it->second.base);
    } else {
      ::munmap(it->second.base, it->second.bytes);
    }
    lib->gpu_arenas.erase(it);
  }
  if (r.kind == proto::DeviceKind::kEmulated) {
    const int fd = reply.fds[0].get();
    void* p = ::mmap(nullptr, r.arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      return ResourceExhausted(std::string("mapping the GPU arena: ") + std::strerror(errno));
    }
    ::madvise(p, r.arena_bytes, MADV_DONTFORK);  // as regions: a child inherits none
    a.base = p;
  } else {
    DSVM_ASSIGN_OR_RETURN(a.base, OpenCudaArena(r.gpu, r.ipc_handle));
  }
  lib->gpu_arenas[r.arena] = a;
  return a.base;
}

int GpuMap(const void* addr, size_t len, int gpu, unsigned mode, void** device_ptr) {
  const std::string what = "dsvm_gpu_map(" + Hex(reinterpret_cast<uintptr_t>(addr)) + ", " +
                           std::to_string(len) + ", gpu " + std::to_string(gpu) + ")";
  if (addr == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, what + ": addr is NULL");
  if (device_ptr == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, what + ": device_ptr is NULL");
  if (gpu < 0) return Fail(DSVM_EINVALID_ARGUMENT, what + ": gpu is negative");
  if (mode == 0 || (mode & ~(DSVM_GPU_READ | DSVM_GPU_WRITE)) != 0) {
    return Fail(DSVM_EINVALID_ARGUMENT,
                what + ": mode " + Hex(mode) + " is not DSVM_GPU_READ and/or DSVM_GPU_WRITE");
  }
  const uint64_t a = reinterpret_cast<uintptr_t>(addr);
  OpenRange range;
  if (int rc = FindOpenRange(what, a, len, &range); rc != DSVM_OK) return rc;
  if (a % range.page_size != 0 || len % range.page_size != 0) {
    return Fail(DSVM_EINVALID_ARGUMENT, what + ": address and length must be multiples of the "
                                               "region's page size, " +
                                            std::to_string(range.page_size) + " bytes");
  }
  proto::GpuMap m;
  m.address = a;
  m.length = len;
  m.gpu = static_cast<uint32_t>(gpu);
  m.write = (mode & DSVM_GPU_WRITE) != 0;
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  auto r = CallLocked(lib, m);
  if (!r.ok()) return FailWith(what, r.status());
  if (const auto* st = std::get_if<proto::StatusReply>(&r->message);
      st != nullptr && r->fds.empty() && st->code != 0) {
    return FailWith(what, proto::FromReply(*st));
  }
  const auto* reply = std::get_if<proto::GpuMapReply>(&r->message);
  const size_t fds = reply == nullptr ? 0 : (reply->kind == proto::DeviceKind::kEmulated ? 1 : 0);
  if (reply == nullptr || r->fds.size() != fds || reply->length != len || reply->gpu != m.gpu) {
    return FailWith(what, ProtocolViolation(lib, m, Described(*r)));
  }
  if (reply->kind == proto::DeviceKind::kEmulatedHost || reply->kind == proto::DeviceKind::kCudaHost) {
    // Zero-copy (accessed-by advice): the device reaches the host copy.
    if (reply->arena != a || reply->offset != 0) {
      return FailWith(what, ProtocolViolation(lib, m, Described(*r)));
    }
    if (reply->kind == proto::DeviceKind::kEmulatedHost) {
      *device_ptr = const_cast<void*>(addr);
      return Succeed();
    }
    Result<void*> dev = RegisterCudaHost(m.gpu, const_cast<void*>(addr), len,
                                         lib->cuda_host_maps.count({a, len}) != 0);
    if (!dev.ok()) {
      if (lib->broken_why.empty()) StatusCallLocked(lib, proto::GpuUnmap{a, len}).IgnoreError();
      return FailWith(what, dev.status());
    }
    lib->cuda_host_maps[{a, len}] += 1;
    *device_ptr = *dev;
    return Succeed();
  }
  Result<void*> base = ArenaOfLocked(lib, *reply, *r);
  if (!base.ok()) {
    // The daemon holds the map: end it, or its pages stay held until exit.
    if (lib->broken_why.empty()) StatusCallLocked(lib, proto::GpuUnmap{a, len}).IgnoreError();
    return FailWith(what, base.status());
  }
  *device_ptr = static_cast<uint8_t*>(*base) + reply->offset;
  return Succeed();
}

int GpuPrefetch(const void* addr, size_t len, int gpu, unsigned flags) {
  const std::string what = "dsvm_gpu_prefetch(" + Hex(reinterpret_cast<uintptr_t>(addr)) + ", " +
                           std::to_string(len) + ", gpu " + std::to_string(gpu) + ")";
  if (addr == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, what + ": addr is NULL");
  if (gpu < 0) return Fail(DSVM_EINVALID_ARGUMENT, what + ": gpu is negative");
  if ((flags & ~DSVM_PREFETCH_WRITE) != 0) {
    return Fail(DSVM_EINVALID_ARGUMENT, what + ": unknown flags " + Hex(flags));
  }
  const uint64_t a = reinterpret_cast<uintptr_t>(addr);
  OpenRange range;
  if (int rc = FindOpenRange(what, a, len, &range); rc != DSVM_OK) return rc;
  // Whole pages (the range lies inside one region, whose base is aligned).
  proto::GpuPrefetch m;
  m.address = a / range.page_size * range.page_size;
  m.length = (a + len + range.page_size - 1) / range.page_size * range.page_size - m.address;
  m.gpu = static_cast<uint32_t>(gpu);
  m.write = (flags & DSVM_PREFETCH_WRITE) != 0;
  return RangeCall(what, addr, len, m);
}

int GpuUnmap(const void* addr, size_t len) {
  const std::string what = "dsvm_gpu_unmap(" + Hex(reinterpret_cast<uintptr_t>(addr)) + ", " +
                           std::to_string(len) + ")";
  proto::GpuUnmap m;
  m.address = reinterpret_cast<uintptr_t>(addr);
  m.length = len;
  // Not RangeCall: a map outlives the region's close (it is lost then),
  // and the daemon knows this process's maps.
  if (addr == nullptr || len == 0) return Fail(DSVM_EINVALID_ARGUMENT, what + ": NULL or empty");
  if (m.address % proto::kMinPageSize != 0 || len % proto::kMinPageSize != 0) {
    return Fail(DSVM_EINVALID_ARGUMENT, what + ": no map has a range not aligned to its pages");
  }
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  // A zero-copy map registered with CUDA: the device stops reaching the
  // pages before the daemon may take them away. Only a map of exactly this
  // range: any other unmap is refused by the daemon, and must leave a live
  // map's registration alone.
  auto it = lib->cuda_host_maps.find({m.address, m.length});
  if (it != lib->cuda_host_maps.end() && --it->second == 0) {
    UnregisterCudaHost(const_cast<void*>(addr));
    lib->cuda_host_maps.erase(it);
  }
  if (Status st = StatusCallLocked(lib, m); !st.ok()) return FailWith(what, st);
  return Succeed();
}

int Advise(const void* addr, size_t len, int advice, uint32_t node) {
  const std::string what = "dsvm_advise(" + Hex(reinterpret_cast<uintptr_t>(addr)) + ", " +
                           std::to_string(len) + ", " + std::to_string(advice) + ")";
  proto::Advise m;
  switch (advice) {
    case DSVM_ADVICE_NORMAL:
      m.advice = proto::Advice::kNormal;
      break;
    case DSVM_ADVICE_READ_MOSTLY:
      m.advice = proto::Advice::kReadMostly;
      break;
    case DSVM_ADVICE_PREFERRED_NODE:
      m.advice = proto::Advice::kPreferredNode;
      break;
    case DSVM_ADVICE_PREFERRED_GPU:
      m.advice = proto::Advice::kPreferredGpu;
      break;
    case DSVM_ADVICE_ACCESSED_BY:
      m.advice = proto::Advice::kAccessedBy;
      break;
    default:
      return Fail(DSVM_EINVALID_ARGUMENT, what + ": unknown advice");
  }
  if (advice == DSVM_ADVICE_PREFERRED_NODE) {
    if (node == 0) return Fail(DSVM_EINVALID_ARGUMENT, what + ": preferred-node advice needs a node");
    m.node = node;
  } else if (advice == DSVM_ADVICE_PREFERRED_GPU || advice == DSVM_ADVICE_ACCESSED_BY) {
    m.node = node;  // the GPU: 0 is one; the daemon knows how many it has
  } else if (node != 0) {
    return Fail(DSVM_EINVALID_ARGUMENT,
                what + ": node " + std::to_string(node) + " given, but this advice names no node");
  }
  m.address = reinterpret_cast<uintptr_t>(addr);
  m.length = len;
  return RangeCall(what, addr, len, m);
}

int Stats(dsvm_node_stats_t* out) {
  if (out == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, "dsvm_stats: stats is NULL");
  const std::string what = "dsvm_stats";
  std::lock_guard<std::mutex> l(g_mu);
  Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  const proto::NodeStats request;
  auto r = CallLocked(lib, request);
  if (!r.ok()) return FailWith(what, r.status());
  const auto* reply = std::get_if<proto::NodeStatsReply>(&r->message);
  if (reply == nullptr || !r->fds.empty() || reply->node != lib->node) {
    return FailWith(what, ProtocolViolation(lib, request, Described(*r)));
  }
  const proto::NodeCounters& c = reply->counters;
  *out = dsvm_node_stats_t{};
  out->node = reply->node;
  out->clients = reply->clients;
  out->read_faults = c.read_faults;
  out->write_faults = c.write_faults;
  out->local_hits = c.local_hits;
  out->pages_fetched = c.pages_fetched;
  out->pages_sent = c.pages_sent;
  out->bytes_fetched = c.bytes_fetched;
  out->bytes_sent = c.bytes_sent;
  out->invalidations = c.invalidations;
  out->downgrades = c.downgrades;
  out->prefetched_pages = c.prefetched_pages;
  out->gpu_maps = c.gpu_maps;
  out->gpu_zero_copy_maps = c.gpu_zero_copy_maps;
  out->gpu_maps_lost = c.gpu_maps_lost;
  out->gpu_placed_pages = c.gpu_placed_pages;
  out->gpu_pages_in = c.gpu_pages_in;
  out->gpu_pages_out = c.gpu_pages_out;
  out->fences = c.fences;
  out->fenced_accesses = c.fenced_accesses;
  out->direct_reads = c.direct_reads;
  out->direct_reads_served = c.direct_reads_served;
  out->gpu_direct_pages_in = c.gpu_direct_pages_in;
  out->gpu_direct_pages_out = c.gpu_direct_pages_out;
  return Succeed();
}

}  // namespace

int FindOpenRange(const std::string& what, uint64_t addr, uint64_t len, OpenRange* out) {
  if (len == 0) return Fail(DSVM_EINVALID_ARGUMENT, what + ": length is 0");
  std::lock_guard<std::mutex> l(g_mu);
  const Library* lib = g_lib;
  if (lib == nullptr) return NotInitialized(what);
  auto after = lib->regions.upper_bound(addr);
  if (after != lib->regions.begin()) {
    const OpenRegion& r = std::prev(after)->second;
    if (addr - r.base < r.size && len <= r.size - (addr - r.base)) {
      *out = OpenRange{r.base, r.size, r.page_size, lib->node};
      return DSVM_OK;
    }
    if (addr - r.base < r.size) {
      return Fail(DSVM_EINVALID_ARGUMENT, what + ": " + std::to_string(len) + " bytes from " +
                                              Hex(addr) + " run past the end of region '" +
                                              r.name + "' at " + Hex(r.base + r.size));
    }
  }
  return Fail(DSVM_EINVALID_ARGUMENT,
              what + ": " + Hex(addr) + " is not inside a region open in this process");
}

void SetRequestTimeoutForTesting(std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> l(g_mu);
  g_request_timeout = timeout;
}

}  // namespace dsvm::client

// --- The C ABI ------------------------------------------------------------------------

using dsvm::client::Guarded;

extern "C" {

int dsvm_init(const char* socket_path) {
  return Guarded("dsvm_init", [&] { return dsvm::client::Init(socket_path); });
}

int dsvm_finalize(void) {
  return Guarded("dsvm_finalize", [] { return dsvm::client::Finalize(); });
}

int dsvm_region_create(const char* name, size_t size, size_t page_size, void** addr) {
  return Guarded("dsvm_region_create", [&] {
    dsvm_region_attr_t attr{};
    attr.page_size = page_size;
    return dsvm::client::RegionCreate(name, size, &attr, addr, "dsvm_region_create");
  });
}

int dsvm_region_create_attr(const char* name, size_t size, const dsvm_region_attr_t* attr,
                            void** addr) {
  return Guarded("dsvm_region_create_attr", [&] {
    if (attr == nullptr) {
      return dsvm::client::Fail(DSVM_EINVALID_ARGUMENT, "dsvm_region_create_attr: attr is NULL");
    }
    return dsvm::client::RegionCreate(name, size, attr, addr, "dsvm_region_create_attr");
  });
}

int dsvm_region_open(const char* name, void** addr, size_t* size) {
  return Guarded("dsvm_region_open", [&] {
    return dsvm::client::RegionOpen(name, nullptr, addr, size, "dsvm_region_open");
  });
}

int dsvm_region_open_token(const char* name, const char* token, void** addr, size_t* size) {
  return Guarded("dsvm_region_open_token", [&] {
    if (token == nullptr) {
      return dsvm::client::Fail(DSVM_EINVALID_ARGUMENT, "dsvm_region_open_token: token is NULL");
    }
    return dsvm::client::RegionOpen(name, token, addr, size, "dsvm_region_open_token");
  });
}

int dsvm_region_close(void* addr) {
  return Guarded("dsvm_region_close", [&] { return dsvm::client::RegionClose(addr); });
}

int dsvm_region_destroy(const char* name) {
  return Guarded("dsvm_region_destroy", [&] { return dsvm::client::RegionDestroy(name); });
}

int dsvm_node_id(uint32_t* id) {
  return Guarded("dsvm_node_id", [&] { return dsvm::client::NodeId(id); });
}

int dsvm_prefetch(const void* addr, size_t len, unsigned flags) {
  return Guarded("dsvm_prefetch", [&] { return dsvm::client::Prefetch(addr, len, flags); });
}

int dsvm_advise(const void* addr, size_t len, int advice, uint32_t node) {
  return Guarded("dsvm_advise", [&] { return dsvm::client::Advise(addr, len, advice, node); });
}

int dsvm_gpu_map(const void* addr, size_t len, int gpu, unsigned mode, void** device_ptr) {
  return Guarded("dsvm_gpu_map",
                 [&] { return dsvm::client::GpuMap(addr, len, gpu, mode, device_ptr); });
}

int dsvm_gpu_prefetch(const void* addr, size_t len, int gpu, unsigned flags) {
  return Guarded("dsvm_gpu_prefetch",
                 [&] { return dsvm::client::GpuPrefetch(addr, len, gpu, flags); });
}

int dsvm_gpu_unmap(const void* addr, size_t len) {
  return Guarded("dsvm_gpu_unmap", [&] { return dsvm::client::GpuUnmap(addr, len); });
}

int dsvm_stats(dsvm_node_stats_t* stats) {
  return Guarded("dsvm_stats", [&] { return dsvm::client::Stats(stats); });
}

const char* dsvm_strerror(int err) {
  switch (err) {
    case DSVM_OK:
      return "success";
    case DSVM_EINVALID_ARGUMENT:
      return "invalid argument";
    case DSVM_ENOT_FOUND:
      return "no such region";
    case DSVM_EALREADY_EXISTS:
      return "region already exists";
    case DSVM_EPERMISSION_DENIED:
      return "permission denied";
    case DSVM_EUNAVAILABLE:
      return "node daemon unavailable";
    case DSVM_EDATA_LOSS:
      return "data lost with a failed node";
    case DSVM_ECORRUPTION:
      return "corrupt data";
    case DSVM_EIO:
      return "I/O or system error";
    case DSVM_ERESOURCE_EXHAUSTED:
      return "resource exhausted";
    case DSVM_EFAILED_PRECONDITION:
      return "operation not allowed in the current state";
    case DSVM_EINTERNAL:
      return "internal error";
    case DSVM_ENOT_INITIALIZED:
      return "libdsvm not initialised";
    case DSVM_EBUSY:
      return "lock held by another thread";
  }
  return "unknown dsvm error code";
}

const char* dsvm_last_error(void) { return dsvm::client::LastError(); }

}  // extern "C"
