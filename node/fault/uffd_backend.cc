#include "node/fault/uffd_backend.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>

#include "node/fault/fd_passing.h"
#include "node/fault/uffd_client.h"
#include "node/fault/uffd_defs.h"
#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {
namespace {

// Bound on retries of an ioctl refused with EAGAIN while the client's address
// space changes under it (mmap_changing).
constexpr int kMaxBusyRetries = 100;
// Messages read from one userfaultfd per read(2).
constexpr size_t kReadBatch = 32;
// epoll events taken per ReadEvents.
constexpr int kEpollBatch = 16;

std::string ErrnoText(const char* what, int err) {
  return std::string(what) + ": " + std::strerror(err);
}

uint64_t SmallPage() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)); }

uint64_t EpollKey(MappingId id, bool pidfd) { return (id << 1) | (pidfd ? 1 : 0); }

// Whether UFFDIO_CONTINUE accepts CONTINUE_MODE_WP on shmem here: tried on
// a one-page memfd of our own.
Result<bool> ProbeContinueWp() {
  const uint64_t small = SmallPage();
  UniqueFd memfd(memfd_create("dsvm-uffd-probe", MFD_CLOEXEC));
  if (!memfd || ftruncate(memfd.get(), static_cast<off_t>(small)) != 0) {
    return IoError(ErrnoText("probe memfd", errno));
  }
  void* a = mmap(nullptr, small, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.get(), 0);
  if (a == MAP_FAILED) return IoError(ErrnoText("probe mmap", errno));
  void* b = mmap(nullptr, small, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.get(), 0);
  if (b == MAP_FAILED) {
    munmap(a, small);
    return IoError(ErrnoText("probe mmap", errno));
  }
  static_cast<volatile char*>(a)[0] = 1;  // the page is in the page cache now
  bool supported = false;
  Status status;
  auto u = CreateUserfaultfd();
  if (!u.ok()) {
    status = u.status();
  } else {
    uffdio_api api{};
    api.api = UFFD_API;
    api.features =
        UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_PAGEFAULT_FLAG_WP;
    uffdio_register reg{};
    reg.range = {reinterpret_cast<uint64_t>(b), small};
    reg.mode = UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP;
    if (ioctl(u->fd.get(), UFFDIO_API, &api) != 0 ||
        ioctl(u->fd.get(), UFFDIO_REGISTER, &reg) != 0) {
      status = IoError(ErrnoText("probe UFFDIO_API/REGISTER", errno));
    } else {
      uffdio_continue c{};
      c.range = reg.range;
      c.mode = UFFDIO_CONTINUE_MODE_DONTWAKE | uffd::kContinueModeWp;
      supported = ioctl(u->fd.get(), UFFDIO_CONTINUE, &c) == 0;
    }
  }
  munmap(a, small);
  munmap(b, small);
  if (!status.ok()) return status;
  return supported;
}

std::string FeatureNames(uint64_t features) {
  std::string s;
  auto add = [&](uint64_t f, const char* name) {
    if (features & f) s += std::string(s.empty() ? "" : ", ") + name;
  };
  add(UFFD_FEATURE_MISSING_SHMEM, "missing faults on shmem");
  add(UFFD_FEATURE_MINOR_SHMEM, "minor faults on shmem");
  add(UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "write-protect on shmem");
  add(UFFD_FEATURE_PAGEFAULT_FLAG_WP, "write-protect faults");
  return s;
}

// Whether `fd` is an anonymous inode of the kind named (as /proc shows it:
// "[userfaultfd]", "[pidfd]").
bool IsAnonInode(int fd, std::string_view kind) {
  char path[64];
  char target[64] = {};
  std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(path, target, sizeof(target) - 1);
  return n > 0 && std::string_view(target, static_cast<size_t>(n)) ==
                      std::string("anon_inode:") + std::string(kind);
}

}  // namespace

Result<std::unique_ptr<UffdBackend>> UffdBackend::Create(UffdBackendOptions options) {
  if (options.max_mappings == 0) return InvalidArgument("max_mappings must be positive");
  DSVM_ASSIGN_OR_RETURN(Userfaultfd probe, CreateUserfaultfd());
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = 0;
  if (ioctl(probe.fd.get(), UFFDIO_API, &api) != 0) {
    return IoError(ErrnoText("UFFDIO_API", errno));
  }
  UffdFeatures f;
  f.api_features = api.features;
  const uint64_t missing = uffd::kRequiredFeatures & ~api.features;
  if (missing != 0) {
    return FailedPrecondition("this kernel's userfaultfd lacks " + FeatureNames(missing) +
                              " (Linux 5.19 or later has them); use the kmod fault backend");
  }
  f.thread_id = (api.features & UFFD_FEATURE_THREAD_ID) != 0;
  f.poison = options.use_poison && (api.features & uffd::kFeaturePoison) != 0;
  if (options.use_continue_wp) {
    DSVM_ASSIGN_OR_RETURN(f.continue_wp, ProbeContinueWp());
  }
  if (!f.continue_wp) {
    LogWarning(
        "uffd backend: no UFFDIO_CONTINUE_MODE_WP; a page installed Shared is writable for the "
        "moment between UFFDIO_CONTINUE and UFFDIO_WRITEPROTECT");
  }
  UniqueFd epoll(epoll_create1(EPOLL_CLOEXEC));
  if (!epoll) return IoError(ErrnoText("epoll_create1", errno));
  return std::unique_ptr<UffdBackend>(new UffdBackend(options, f, std::move(epoll)));
}

UffdBackend::UffdBackend(UffdBackendOptions options, UffdFeatures features, UniqueFd epoll)
    : options_(options), features_(features), epoll_(std::move(epoll)) {}

UffdBackend::~UffdBackend() = default;

// ---------------------------------------------------------------------------
// Regions and mappings

Status UffdBackend::AddRegion(PageStore* store) {
  if (store == nullptr) return InvalidArgument("no page store");
  const PageAddr base = store->base();
  if (regions_.count(base) != 0) return AlreadyExists("region " + Hex(base) + " is registered");
  auto next = regions_.lower_bound(base);
  if (next != regions_.end() && next->first < base + store->size()) {
    return InvalidArgument("region " + Hex(base) + " overlaps region " + Hex(next->first));
  }
  if (next != regions_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.store->size() > base) {
      return InvalidArgument("region " + Hex(base) + " overlaps region " + Hex(prev->first));
    }
  }
  Region r;
  r.store = store;
  r.access.assign(store->page_count(), kNone);
  regions_.emplace(base, std::move(r));
  return Status::Ok();
}

Status UffdBackend::RemoveRegion(PageAddr base) {
  auto it = regions_.find(base);
  if (it == regions_.end()) return NotFound("no region at " + Hex(base));
  if (!it->second.mappings.empty()) {
    return FailedPrecondition("region " + Hex(base) + " still has " +
                              std::to_string(it->second.mappings.size()) + " mappings");
  }
  regions_.erase(it);
  return Status::Ok();
}

UffdBackend::Region* UffdBackend::FindRegion(PageAddr page) {
  auto it = regions_.upper_bound(page);
  if (it == regions_.begin()) return nullptr;
  --it;
  if (page - it->first >= it->second.store->size()) return nullptr;
  return &it->second;
}

Status UffdBackend::CheckClientRange(const Mapping& m, const Region& r) const {
  struct stat st {};
  if (fstat(r.store->fd(), &st) != 0) return IoError(ErrnoText("fstat of the region memfd", errno));
  const std::string path = "/proc/" + std::to_string(m.pid) + "/maps";
  std::ifstream in(path);
  if (!in) {
    if (kill(m.pid, 0) != 0 && errno == ESRCH) {
      return Unavailable("client " + std::to_string(m.pid) + " is gone");
    }
    return PermissionDenied("cannot read " + path + " to check the client's mapping");
  }
  const uint64_t base = r.store->base();
  const uint64_t end = base + r.store->size();
  uint64_t covered = 0;
  std::string line;
  while (std::getline(in, line)) {
    uint64_t start = 0, stop = 0, offset = 0, inode = 0;
    unsigned int major_no = 0, minor_no = 0;
    char perms[8] = {};
    if (std::sscanf(line.c_str(), "%" SCNx64 "-%" SCNx64 " %7s %" SCNx64 " %x:%x %" SCNu64, &start,
                    &stop, perms, &offset, &major_no, &minor_no, &inode) != 7) {
      continue;
    }
    if (stop <= base || start >= end) continue;
    const std::string where = "client " + std::to_string(m.pid) + ": [" + Hex(start) + ", " +
                              Hex(stop) + ") in region " + Hex(base);
    if (start < base || stop > end) return InvalidArgument(where + " crosses the region's bounds");
    if (inode != st.st_ino || major_no != major(st.st_dev) || minor_no != minor(st.st_dev) ||
        offset != start - base) {
      return InvalidArgument(where + " is not the region's memfd at its offset");
    }
    if (perms[0] != 'r' || perms[1] != 'w' || perms[3] != 's') {
      return InvalidArgument(where + " is not mapped shared read-write (" + perms + ")");
    }
    covered += stop - start;
  }
  if (covered != r.store->size()) {
    return InvalidArgument("client " + std::to_string(m.pid) + " maps " + std::to_string(covered) +
                           " of the " + std::to_string(r.store->size()) + " bytes of region " +
                           Hex(base));
  }
  return Status::Ok();
}

Result<MappingId> UffdBackend::AddMapping(MappingRequest request) {
  auto rit = regions_.find(request.region);
  if (rit == regions_.end()) return NotFound("no region at " + Hex(request.region));
  Region& r = rit->second;
  if (mappings_.size() >= options_.max_mappings) {
    return ResourceExhausted(std::to_string(options_.max_mappings) + " mappings, the bound");
  }
  if (!request.fault_fd || !IsAnonInode(request.fault_fd.get(), "[userfaultfd]")) {
    return InvalidArgument("the client's fault descriptor is not a userfaultfd");
  }
  const int uffd = request.fault_fd.get();
  const int fl = fcntl(uffd, F_GETFL);
  if (fl < 0 || fcntl(uffd, F_SETFL, fl | O_NONBLOCK) != 0) {
    return IoError(ErrnoText("fcntl of the userfaultfd", errno));
  }
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = uffd::kRequiredFeatures | (uffd::kOptionalFeatures & features_.api_features);
  if (ioctl(uffd, UFFDIO_API, &api) != 0) {
    return InvalidArgument(ErrnoText("UFFDIO_API on the client's userfaultfd", errno) +
                           " (hand it over uninitialised)");
  }

  Mapping m;
  m.id = next_mapping_++;
  m.region = request.region;
  m.uffd = std::move(request.fault_fd);
  m.pidfd = std::move(request.pidfd);
  m.pid = request.pid;
  if (m.pidfd) {
    DSVM_ASSIGN_OR_RETURN(m.pid, CheckClientPidfd(m.pidfd.get(), m.pid));
  }
  if (m.pid <= 0) return InvalidArgument("no client pid");
  if (!m.pidfd) {
    m.pidfd.reset(static_cast<int>(syscall(SYS_pidfd_open, m.pid, 0)));
    if (!m.pidfd) {
      if (errno == ESRCH) return Unavailable("client " + std::to_string(m.pid) + " is gone");
      return IoError(ErrnoText("pidfd_open", errno));
    }
  }
  DSVM_RETURN_IF_ERROR(CheckClientRange(m, r));

  uffdio_register reg{};
  reg.range = {r.store->base(), r.store->size()};
  reg.mode = uffd::kRegisterModes;
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
    const int err = errno;
    if (err == ESRCH || err == ENOMEM) {
      return Unavailable("client " + std::to_string(m.pid) + " is gone");
    }
    return InvalidArgument(ErrnoText("UFFDIO_REGISTER of the client's region mapping", err));
  }
  const uint64_t needed =
      (1ull << _UFFDIO_WAKE) | (1ull << _UFFDIO_CONTINUE) | (1ull << _UFFDIO_WRITEPROTECT);
  if ((reg.ioctls & needed) != needed) {
    return FailedPrecondition("the kernel offers no CONTINUE or WRITEPROTECT on this mapping");
  }

  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = EpollKey(m.id, false);
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, m.uffd.get(), &ev) != 0) {
    return IoError(ErrnoText("epoll_ctl", errno));
  }
  ev.data.u64 = EpollKey(m.id, true);
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, m.pidfd.get(), &ev) != 0) {
    epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, m.uffd.get(), nullptr);
    return IoError(ErrnoText("epoll_ctl", errno));
  }
  const MappingId id = m.id;
  Mapping& added = mappings_.emplace(id, std::move(m)).first->second;
  r.mappings.push_back(id);

  // Every page valid on the node becomes accessible now, in runs.
  const uint64_t ps = r.store->page_size();
  Status status;
  for (size_t i = 0; i < r.access.size() && status.ok() && !added.closed;) {
    const Access a = static_cast<Access>(r.access[i]);
    size_t j = i + 1;
    while (j < r.access.size() && r.access[j] == a) ++j;
    if (a != kNone) status = Install(added, r, r.store->base() + i * ps, (j - i) * ps, a, false);
    i = j;
  }
  if (status.ok() && added.closed) {
    status = Unavailable("client " + std::to_string(added.pid) + " went away while mapped");
  }
  if (!status.ok()) {
    RemoveMapping(id).IgnoreError();  // cannot fail: the mapping exists
    return status;
  }
  return id;
}

Status UffdBackend::RemoveMapping(MappingId id) {
  auto it = mappings_.find(id);
  if (it == mappings_.end()) return NotFound("no mapping " + std::to_string(id));
  Mapping& m = it->second;
  // Either may be out of the set already (closed); ENOENT is expected then.
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, m.uffd.get(), nullptr);
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, m.pidfd.get(), nullptr);
  if (auto rit = regions_.find(m.region); rit != regions_.end()) {
    auto& v = rit->second.mappings;
    v.erase(std::remove(v.begin(), v.end(), id), v.end());
  }
  closed_notices_.erase(std::remove(closed_notices_.begin(), closed_notices_.end(), id),
                        closed_notices_.end());
  // Closing the last reference to the userfaultfd unregisters the range and
  // releases any thread still waiting in it.
  mappings_.erase(it);
  return Status::Ok();
}

void UffdBackend::MarkClosed(Mapping& m, const std::string& why) {
  if (m.closed) return;
  m.closed = true;
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, m.uffd.get(), nullptr);
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, m.pidfd.get(), nullptr);
  closed_notices_.push_back(m.id);
  DSVM_CHECK(closed_notices_.size() <= mappings_.size());
  ++stats_.mappings_closed;
  LogInfo("uffd: mapping " + std::to_string(m.id) + " of client " + std::to_string(m.pid) +
          " closed: " + why);
}

Status UffdBackend::MappingError(Mapping& m, const char* what, int err) {
  if (err == ESRCH || err == ENOENT) {
    // ESRCH: the address space is gone (the client exited). ENOENT: no
    // registered mapping at the range any more (the client unmapped it).
    MarkClosed(m, ErrnoText(what, err));
    return Status::Ok();
  }
  if (err == EINVAL) return Internal(ErrnoText(what, err));
  return IoError(ErrnoText(what, err));
}

// ---------------------------------------------------------------------------
// Page tables of the clients

Status UffdBackend::WriteProtect(Mapping& m, uint64_t addr, uint64_t len, bool protect) {
  uffdio_writeprotect w{};
  w.range = {addr, len};
  // Waking is Resolve's job; WP mode never wakes, and DONTWAKE is only
  // accepted without it.
  w.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
  for (int retry = 0;; ++retry) {
    ++stats_.map_ioctls;
    if (ioctl(m.uffd.get(), UFFDIO_WRITEPROTECT, &w) == 0) return Status::Ok();
    if (errno != EAGAIN || retry == kMaxBusyRetries) {
      return MappingError(m, "UFFDIO_WRITEPROTECT", errno);
    }
  }
}

Status UffdBackend::Install(Mapping& m, Region& r, uint64_t addr, uint64_t len, Access access,
                            bool mapped) {
  DSVM_CHECK(access != kNone);
  const bool read_only = access == kRead;
  if (mapped) return WriteProtect(m, addr, len, read_only);
  const uint64_t step = r.store->hugetlb() ? r.store->page_size() : SmallPage();
  bool existed = false;
  uint64_t done = 0;
  int retries = 0;
  while (done < len) {
    uffdio_continue c{};
    c.range = {addr + done, len - done};
    c.mode = UFFDIO_CONTINUE_MODE_DONTWAKE;
    if (read_only && features_.continue_wp) c.mode |= uffd::kContinueModeWp;
    ++stats_.map_ioctls;
    if (ioctl(m.uffd.get(), UFFDIO_CONTINUE, &c) == 0) break;
    const int err = errno;
    if (c.mapped > 0) {  // a partial run: go on after it
      done += static_cast<uint64_t>(c.mapped);
      continue;
    }
    if (err == EEXIST) {  // this process has the page mapped already
      existed = true;
      done += step;
      continue;
    }
    if (err == EAGAIN && ++retries <= kMaxBusyRetries) continue;
    if (err == EFAULT) {  // a hole: nothing in the page cache to map
      return FailedPrecondition("page " + Hex(addr + done) +
                                " has no bytes to map (install them "
                                "first)");
    }
    return MappingError(m, "UFFDIO_CONTINUE", err);
  }
  if (existed || (read_only && !features_.continue_wp)) {
    return WriteProtect(m, addr, len, read_only);
  }
  return Status::Ok();
}

Status UffdBackend::Wake(Mapping& m, uint64_t addr, uint64_t len) {
  uffdio_range range{addr, len};
  if (ioctl(m.uffd.get(), UFFDIO_WAKE, &range) != 0) return MappingError(m, "UFFDIO_WAKE", errno);
  return Status::Ok();
}

Status UffdBackend::Poison(Mapping& m, Region& r, uint64_t addr, uint64_t len) {
  const uint64_t step = r.store->hugetlb() ? r.store->page_size() : SmallPage();
  uint64_t done = 0;
  int retries = 0;
  uint64_t unmarked = ~uint64_t{0};  // the piece whose write-protect marker was cleared
  while (done < len) {
    uffd::UffdioPoison p{};
    p.range = {addr + done, len - done};
    p.mode = uffd::kPoisonModeDontWake;
    if (ioctl(m.uffd.get(), uffd::kIoctlPoison, &p) == 0) break;
    const int err = errno;
    if (p.updated > 0) {
      done += static_cast<uint64_t>(p.updated);
      continue;
    }
    if (err == EEXIST) {
      // Either that piece is mapped (not what faulted), or the page table
      // holds a write-protect marker where a read-only page was punched out:
      // the kernel keeps it and POISON will not replace it. With no bytes
      // in the memfd it is the marker: clear it and poison again, once.
      const uint64_t piece = addr + done;
      const PageAddr page = r.store->base() + (piece - r.store->base()) / r.store->page_size() *
                                                  r.store->page_size();
      auto present = r.store->IsPresent(page);
      if (unmarked != piece && present.ok() && !*present) {
        unmarked = piece;
        DSVM_RETURN_IF_ERROR(WriteProtect(m, piece, step, false));
        if (m.closed) return Status::Ok();
        continue;
      }
      done += step;
      continue;
    }
    if (err == EAGAIN && ++retries <= kMaxBusyRetries) continue;
    return MappingError(m, "UFFDIO_POISON", err);
  }
  return Status::Ok();
}

Status UffdBackend::SetAccessRange(PageAddr first, size_t count, Access access) {
  Region* r = FindRegion(first);
  if (r == nullptr) return NotFound("page " + Hex(first) + " is in no registered region");
  if (count == 0) return Status::Ok();
  const uint64_t ps = r->store->page_size();
  DSVM_RETURN_IF_ERROR(r->store->CheckPage(first));
  DSVM_RETURN_IF_ERROR(r->store->CheckPage(first + (count - 1) * ps));
  const uint64_t index = r->store->IndexOf(first);
  // Parts of the run whose pages have the same access now take one
  // Install per mapping each.
  for (size_t i = 0, j = 0; i < count; i = j) {
    const Access old = static_cast<Access>(r->access[index + i]);
    for (j = i + 1; j < count && r->access[index + j] == old; ++j) {
    }
    if (old == access) continue;
    const PageAddr at = first + i * ps;
    if (old == kNone) {
      for (size_t k = i; k < j; ++k) DSVM_RETURN_IF_ERROR(r->store->Restore(first + k * ps));
    }
    Status failed;
    size_t live = 0;
    for (MappingId id : r->mappings) {
      Mapping& m = mappings_.at(id);
      if (m.closed) continue;
      ++live;
      Status s = Install(m, *r, at, (j - i) * ps, access, old != kNone);
      if (!s.ok() && failed.ok()) failed = s;
      // No bytes (a caller's bug) fails alike everywhere: stop at the first.
      if (s.code() == StatusCode::kFailedPrecondition) break;
    }
    if (live == 0 && old == kNone) {
      // UFFDIO_CONTINUE checks that the bytes are there; with no mapping to
      // map into, check here, so the bug shows now and not at the next client.
      for (size_t k = i; k < j; ++k) {
        DSVM_ASSIGN_OR_RETURN(bool present, r->store->IsPresent(first + k * ps));
        if (!present) {
          return FailedPrecondition("page " + Hex(first + k * ps) +
                                    " has no bytes to map (install them first)");
        }
      }
    }
    if (!failed.ok()) return failed;
    std::fill(r->access.begin() + static_cast<ptrdiff_t>(index + i),
              r->access.begin() + static_cast<ptrdiff_t>(index + j), static_cast<uint8_t>(access));
  }
  return Status::Ok();
}

Status UffdBackend::MapRead(PageAddr page) { return SetAccess(page, kRead); }

Status UffdBackend::MapWrite(PageAddr page) { return SetAccess(page, kWrite); }

Status UffdBackend::MapRange(PageAddr first, size_t count, uint64_t page_size, bool write) {
  Region* r = FindRegion(first);
  if (r == nullptr) return NotFound("page " + Hex(first) + " is in no registered region");
  if (page_size != r->store->page_size()) {
    return InvalidArgument("pages of " + std::to_string(page_size) + " bytes in a region of " +
                           std::to_string(r->store->page_size()));
  }
  return SetAccessRange(first, count, write ? kWrite : kRead);
}

Status UffdBackend::Unmap(PageAddr page) {
  Region* r = FindRegion(page);
  if (r == nullptr) return NotFound("page " + Hex(page) + " is in no registered region");
  // Retain copies the bytes aside and then punches the page out of every
  // process's page tables. A writable page is write-protected everywhere
  // first: a store landing between the copy and the punch would be lost
  // (the writer now blocks on a write-protect fault, resolved after the
  // page is back or elsewhere).
  const uint64_t index = r->store->IndexOf(page);
  if (r->access[index] == kWrite) {
    for (MappingId id : r->mappings) {
      Mapping& m = mappings_.at(id);
      if (!m.closed) DSVM_RETURN_IF_ERROR(WriteProtect(m, page, r->store->page_size(), true));
    }
  }
  DSVM_RETURN_IF_ERROR(r->store->Retain(page));
  r->access[index] = kNone;
  return Status::Ok();
}

Status UffdBackend::UnmapRange(PageAddr first, size_t count, uint64_t page_size) {
  Region* r = FindRegion(first);
  if (r == nullptr) return NotFound("page " + Hex(first) + " is in no registered region");
  if (count == 0) return Status::Ok();
  if (page_size != r->store->page_size()) {
    return InvalidArgument("pages of " + std::to_string(page_size) + " bytes in a region of " +
                           std::to_string(r->store->page_size()));
  }
  DSVM_RETURN_IF_ERROR(r->store->CheckPage(first));
  DSVM_RETURN_IF_ERROR(r->store->CheckPage(first + (count - 1) * page_size));
  const uint64_t index = r->store->IndexOf(first);
  // As Unmap: writes stopped before the bytes are copied aside.
  for (size_t i = 0, j = 0; i < count; i = j) {
    for (j = i + 1; j < count && (r->access[index + j] == kWrite) == (r->access[index + i] == kWrite);
         ++j) {
    }
    if (r->access[index + i] != kWrite) continue;
    for (MappingId id : r->mappings) {
      Mapping& m = mappings_.at(id);
      if (!m.closed) {
        DSVM_RETURN_IF_ERROR(WriteProtect(m, first + i * page_size, (j - i) * page_size, true));
      }
    }
  }
  Status retained = r->store->RetainRange(first, count);
  if (!retained.ok()) {  // the runs retained before the failure are unmapped
    for (size_t i = 0; i < count; ++i) {
      if (r->store->IsRetained(first + i * page_size)) r->access[index + i] = kNone;
    }
    return retained;
  }
  std::fill(r->access.begin() + static_cast<ptrdiff_t>(index),
            r->access.begin() + static_cast<ptrdiff_t>(index + count), static_cast<uint8_t>(kNone));
  return Status::Ok();
}

Status UffdBackend::Invalidate(PageAddr page) {
  Region* r = FindRegion(page);
  if (r == nullptr) return NotFound("page " + Hex(page) + " is in no registered region");
  DSVM_RETURN_IF_ERROR(r->store->Discard(page));
  r->access[r->store->IndexOf(page)] = kNone;
  return Status::Ok();
}

Status UffdBackend::InvalidateAll(PageAddr base) {
  auto it = regions_.find(base);
  if (it == regions_.end()) return NotFound("no region registered at " + Hex(base));
  Region& r = it->second;
  DSVM_RETURN_IF_ERROR(r.store->DiscardAll());
  std::fill(r.access.begin(), r.access.end(), kNone);
  return Status::Ok();
}

Status UffdBackend::WriteBack(PageAddr page) {
  Region* r = FindRegion(page);
  if (r == nullptr) return NotFound("page " + Hex(page) + " is in no registered region");
  return r->store->CheckPage(page);
}

// ---------------------------------------------------------------------------
// Events

void UffdBackend::HandleMessages(Mapping& m, std::span<FaultEvent> out, size_t* n) {
  const size_t want = std::min(kReadBatch, out.size() - *n);
  if (want == 0) return;
  uffd_msg msgs[kReadBatch];
  const ssize_t got = read(m.uffd.get(), msgs, want * sizeof(uffd_msg));
  if (got < 0) {
    if (errno == EAGAIN || errno == EINTR) return;
    MarkClosed(m, ErrnoText("read of the userfaultfd", errno));
    return;
  }
  if (got % sizeof(uffd_msg) != 0) {
    ++stats_.bad_events;
    LogWarning("uffd: mapping " + std::to_string(m.id) + ": read a partial message");
  }
  Region& r = regions_.at(m.region);
  const uint64_t base = r.store->base();
  const uint64_t ps = r.store->page_size();
  for (size_t i = 0; i < static_cast<size_t>(got) / sizeof(uffd_msg) && !m.closed; ++i) {
    const uffd_msg& msg = msgs[i];
    if (msg.event != UFFD_EVENT_PAGEFAULT) {
      ++stats_.bad_events;
      LogWarning("uffd: mapping " + std::to_string(m.id) + ": unexpected event " +
                 std::to_string(msg.event) + " ignored");
      continue;
    }
    const uint64_t addr = msg.arg.pagefault.address;
    if (addr < base || addr - base >= r.store->size()) {
      ++stats_.bad_events;
      LogWarning("uffd: mapping " + std::to_string(m.id) + ": fault at " + Hex(addr) +
                 " outside region " + Hex(base) + " ignored");
      continue;
    }
    const PageAddr page = base + (addr - base) / ps * ps;
    const uint64_t flags = msg.arg.pagefault.flags;
    const bool write = (flags & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP)) != 0;
    const Access access = static_cast<Access>(r.access[(page - base) / ps]);
    if (access == kWrite || (access == kRead && !write)) {
      // The node's state allows the access: this process just lacks the PTE
      // (or its write bit). Resolved here, without the coherence agent, and
      // only for the piece that faulted (one PTE of a larger page).
      const uint64_t step = r.store->hugetlb() ? ps : SmallPage();
      const uint64_t piece = addr / step * step;
      Status s = Install(m, r, piece, step, access, false);
      if (s.ok() && !m.closed) s = Wake(m, piece, step);
      if (m.closed) break;
      if (s.ok()) {
        ++stats_.local_hits;
        continue;
      }
      if (s.code() == StatusCode::kFailedPrecondition) {
        // The bytes left the memfd without Unmap/Invalidate: the page is
        // not valid here, whatever the access state said.
        r.access[(page - base) / ps] = kNone;
      }
      LogWarning("uffd: local resolution of " + Hex(page) +
                 " failed, asking the agent: " + s.ToString());
    }
    FaultEvent& e = out[(*n)++];
    e = FaultEvent{};
    e.kind = FaultEventKind::kFault;
    e.mapping = m.id;
    e.page = page;
    e.address = addr;
    e.write = write;
    e.thread = features_.thread_id ? msg.arg.pagefault.feat.ptid : 0;
    e.token = FaultToken{m.id, page};
    ++stats_.fault_events;
  }
}

Result<size_t> UffdBackend::ReadEvents(std::span<FaultEvent> out) {
  size_t n = 0;
  auto drain_closed = [&] { DrainClosedNotices(&closed_notices_, out, &n); };
  drain_closed();
  if (n == out.size()) return n;
  epoll_event evs[kEpollBatch];
  const int k = epoll_wait(epoll_.get(), evs, kEpollBatch, 0);
  if (k < 0) {
    if (errno == EINTR) return n;
    return IoError(ErrnoText("epoll_wait", errno));
  }
  for (int i = 0; i < k && n < out.size(); ++i) {
    auto it = mappings_.find(evs[i].data.u64 >> 1);
    if (it == mappings_.end() || it->second.closed) continue;
    if (evs[i].data.u64 & 1) {
      MarkClosed(it->second, "the process exited");
    } else {
      HandleMessages(it->second, out, &n);
    }
  }
  drain_closed();
  return n;
}

Status UffdBackend::Resolve(const FaultToken& token, Resolution how) {
  auto it = mappings_.find(token.mapping);
  if (it == mappings_.end()) return NotFound("no mapping " + std::to_string(token.mapping));
  Mapping& m = it->second;
  if (m.closed) return NotFound("mapping " + std::to_string(m.id) + " is closed");
  Region& r = regions_.at(m.region);
  DSVM_RETURN_IF_ERROR(r.store->CheckPage(token.cookie));
  const uint64_t ps = r.store->page_size();
  switch (how) {
    case Resolution::kRetry:
      return Wake(m, token.cookie, ps);
    case Resolution::kError:
      if (features_.poison) {
        DSVM_RETURN_IF_ERROR(Poison(m, r, token.cookie, ps));
      } else if (syscall(SYS_pidfd_send_signal, m.pidfd.get(), SIGBUS, nullptr, 0) != 0) {
        return MappingError(m, "pidfd_send_signal", errno);
      }
      if (m.closed) return Status::Ok();
      return Wake(m, token.cookie, ps);
    case Resolution::kInvalid:
      break;
  }
  return InvalidArgument("invalid resolution");
}

}  // namespace dsvm::node
