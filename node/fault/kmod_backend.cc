#include "node/fault/kmod_backend.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "kmod/uapi/dsvm_uapi.h"
#include "node/fault/fd_passing.h"
#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {

namespace {

constexpr uint64_t kPageSize = DSVM_PAGE_SIZE_4K;
constexpr size_t kEventBatch = 64;
// epoll data of the control file; a mapping's pidfd carries its id (>= 1).
constexpr uint64_t kControlKey = 0;

std::string ErrnoText(const std::string& what, int err) {
  return what + ": " + std::strerror(err);
}

// A failed ioctl as a Status: the module's errno meanings (kmod/uapi).
Status IoctlError(const std::string& what, int err) {
  switch (err) {
    case EINVAL: return Internal(ErrnoText(what, err) + " (a field dsvm.ko refuses)");
    case ENOENT: return NotFound(ErrnoText(what, err));
    case EEXIST: return AlreadyExists(ErrnoText(what, err));
    case EADDRINUSE: return InvalidArgument(ErrnoText(what, err) + " (overlaps a region)");
    case ENOMEM:
    case ENOSPC: return ResourceExhausted(ErrnoText(what, err));
    case EPERM: return FailedPrecondition(ErrnoText(what, err) + " (not the control file)");
    case ENODATA: return FailedPrecondition(ErrnoText(what, err) + " (page not installed)");
    default: return IoError(ErrnoText(what, err));
  }
}

int Ioctl(int fd, unsigned long request, void* arg) {
  int r;
  do {
    r = ::ioctl(fd, request, arg);
  } while (r < 0 && errno == EINTR);
  return r;
}

// The character device behind `fd` (0 when it is none).
dev_t DeviceOf(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISCHR(st.st_mode)) return 0;
  return st.st_rdev;
}

}  // namespace

Result<std::unique_ptr<KmodBackend>> KmodBackend::Create(KmodBackendOptions options) {
  UniqueFd control(::open(options.device.c_str(), O_RDWR | O_CLOEXEC | O_NONBLOCK));
  if (!control) {
    const int err = errno;
    if (err == ENOENT || err == ENODEV || err == ENXIO) {
      return Unavailable(options.device + " is missing: dsvm.ko is not loaded");
    }
    return IoError(ErrnoText("open " + options.device, err));
  }
  dsvm_hello hello{};
  hello.user_version = DSVM_ABI_VERSION;
  hello.flags = DSVM_HELLO_CONTROL;
  if (Ioctl(control.get(), DSVM_IOC_HELLO, &hello) != 0) {
    const int err = errno;
    if (err == EPROTO) {
      return FailedPrecondition("dsvm.ko speaks ABI " + std::to_string(hello.module_version) +
                                ", this daemon " + std::to_string(DSVM_ABI_VERSION));
    }
    if (err == ENOSPC) {
      return ResourceExhausted("dsvm.ko has no room for another control file (too many "
                               "dsvm-node daemons on this host)");
    }
    if (err == EINVAL) {
      return FailedPrecondition("dsvm.ko is too old for a control file (no fault events)");
    }
    return IoctlError("DSVM_IOC_HELLO", err);
  }
  const uint64_t needed = DSVM_FEATURE_REGIONS | DSVM_FEATURE_EVENTS | DSVM_FEATURE_WRITEBACK |
                          DSVM_FEATURE_DOMAINS;
  if ((hello.features & needed) != needed) {
    return FailedPrecondition("dsvm.ko lacks fault events, writeback or domains (features " +
                              Hex(hello.features) + ")");
  }
  // Clients map regions through a file of their own, attached to this
  // daemon's domain: it maps our regions and nobody else's, and changes no
  // table. One is shared by all clients.
  UniqueFd client(::open(options.device.c_str(), O_RDWR | O_CLOEXEC));
  if (!client) return IoError(ErrnoText("open " + options.device, errno));
  dsvm_attach attach{};
  attach.fd = client.get();
  if (Ioctl(control.get(), DSVM_IOC_ATTACH, &attach) != 0) {
    return IoctlError("DSVM_IOC_ATTACH", errno);
  }
  UniqueFd epoll(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll) return IoError(ErrnoText("epoll_create1", errno));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kControlKey;
  if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, control.get(), &ev) != 0) {
    return IoError(ErrnoText("epoll_ctl", errno));
  }
  return std::unique_ptr<KmodBackend>(new KmodBackend(std::move(options), std::move(control),
                                                      std::move(client), std::move(epoll),
                                                      hello.features));
}

KmodBackend::KmodBackend(KmodBackendOptions options, UniqueFd control, UniqueFd client,
                         UniqueFd epoll, uint64_t features)
    : options_(std::move(options)),
      control_(std::move(control)),
      client_(std::move(client)),
      epoll_(std::move(epoll)),
      features_(features),
      buf_(kPageSize) {}

// ---------------------------------------------------------------------------
// Regions and mappings

Status KmodBackend::AddRegion(PageStore* store) {
  if (store->page_size() != kPageSize) {
    return InvalidArgument("dsvm.ko serves 4 KiB pages only; region " + Hex(store->base()) +
                           " has " + std::to_string(store->page_size()) +
                           "-byte pages (run dsvm-node with --fault-backend=uffd)");
  }
  if (regions_.count(store->base())) {
    return AlreadyExists("region " + Hex(store->base()) + " is registered already");
  }
  dsvm_region_create c{};
  c.region_id = next_region_id_;
  c.base = store->base();
  c.size = store->size();
  c.page_size = static_cast<uint32_t>(kPageSize);
  if (Ioctl(control_.get(), DSVM_IOC_REGION_CREATE, &c) != 0) {
    return IoctlError("DSVM_IOC_REGION_CREATE of " + Hex(store->base()), errno);
  }
  Region r;
  r.store = store;
  r.id = next_region_id_++;
  r.held.assign(store->page_count(), kNone);
  bases_[r.id] = store->base();
  regions_.emplace(store->base(), std::move(r));
  return Status::Ok();
}

Status KmodBackend::RemoveRegion(PageAddr base) {
  auto it = regions_.find(base);
  if (it == regions_.end()) return NotFound("no region registered at " + Hex(base));
  size_t live = 0;
  for (MappingId id : it->second.mappings) live += mappings_.at(id).closed ? 0 : 1;
  if (live > 0) {
    return FailedPrecondition("region " + Hex(base) + " still has " + std::to_string(live) +
                              " mappings");
  }
  dsvm_region_destroy d{};
  d.region_id = it->second.id;
  if (Ioctl(control_.get(), DSVM_IOC_REGION_DESTROY, &d) != 0) {
    return IoctlError("DSVM_IOC_REGION_DESTROY of " + Hex(base), errno);
  }
  for (MappingId id : it->second.mappings) mappings_.erase(id);
  std::erase_if(closed_notices_, [&](MappingId id) { return !mappings_.count(id); });
  bases_.erase(it->second.id);
  regions_.erase(it);
  return Status::Ok();
}

Result<MappingId> KmodBackend::AddMapping(MappingRequest request) {
  auto it = regions_.find(request.region);
  if (it == regions_.end()) return NotFound("no region registered at " + Hex(request.region));
  if (mappings_.size() >= options_.max_mappings) {
    return ResourceExhausted("too many mappings (" + std::to_string(mappings_.size()) + ")");
  }
  const dev_t ours = DeviceOf(client_.get());
  if (!request.fault_fd || DeviceOf(request.fault_fd.get()) != ours || ours == 0) {
    return InvalidArgument("the client's descriptor is not " + options_.device);
  }
  Mapping m;
  m.region = request.region;
  m.pid = request.pid;
  m.pidfd = std::move(request.pidfd);
  // As the uffd backend: a passed pidfd must name the client itself, or the
  // mapping would end with another process.
  if (m.pidfd) {
    DSVM_ASSIGN_OR_RETURN(m.pid, CheckClientPidfd(m.pidfd.get(), m.pid));
  }
  m.id = next_mapping_++;
  if (!m.pidfd) {
    m.pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, m.pid, 0)));
    if (!m.pidfd) {
      if (errno == ESRCH) return Unavailable("client " + std::to_string(m.pid) + " is gone");
      return IoError(ErrnoText("pidfd_open", errno));
    }
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = m.id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, m.pidfd.get(), &ev) != 0) {
    return IoError(ErrnoText("epoll_ctl", errno));
  }
  const MappingId id = m.id;
  it->second.mappings.push_back(id);
  mappings_.emplace(id, std::move(m));
  return id;
}

Status KmodBackend::RemoveMapping(MappingId id) {
  auto it = mappings_.find(id);
  if (it == mappings_.end()) return NotFound("no mapping " + std::to_string(id));
  if (!it->second.closed) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->second.pidfd.get(), nullptr);
  auto r = regions_.find(it->second.region);
  if (r != regions_.end()) std::erase(r->second.mappings, id);
  std::erase(closed_notices_, id);
  mappings_.erase(it);
  return Status::Ok();
}

void KmodBackend::MarkClosed(Mapping& m, const std::string& why) {
  if (m.closed) return;
  m.closed = true;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, m.pidfd.get(), nullptr);
  closed_notices_.push_back(m.id);
  ++stats_.mappings_closed;
  LogInfo("kmod: mapping " + std::to_string(m.id) + " of client " + std::to_string(m.pid) +
          " closed: " + why);
}

uint64_t KmodBackend::local_hits() const {
  dsvm_stats s{};
  if (Ioctl(control_.get(), DSVM_IOC_STATS, &s) != 0) return 0;
  return s.faults;
}

// ---------------------------------------------------------------------------
// Events

Result<size_t> KmodBackend::ReadEvents(std::span<FaultEvent> out) {
  size_t n = 0;
  auto drain_closed = [&] { DrainClosedNotices(&closed_notices_, out, &n); };
  drain_closed();
  epoll_event evs[16];
  const int k = ::epoll_wait(epoll_.get(), evs, 16, 0);
  if (k < 0 && errno != EINTR) return IoError(ErrnoText("epoll_wait", errno));
  for (int i = 0; i < k; ++i) {
    if (evs[i].data.u64 == kControlKey) continue;  // read below in any case
    auto it = mappings_.find(evs[i].data.u64);
    if (it != mappings_.end()) MarkClosed(it->second, "the process exited");
  }
  drain_closed();
  while (n < out.size()) {
    dsvm_fault_event got[kEventBatch];
    const size_t want = std::min(kEventBatch, out.size() - n);
    const ssize_t r = ::read(control_.get(), got, want * sizeof(dsvm_fault_event));
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      return IoError(ErrnoText("read of dsvm.ko's fault events", errno));
    }
    const size_t events = static_cast<size_t>(r) / sizeof(dsvm_fault_event);
    for (size_t i = 0; i < events; ++i) {
      auto base = bases_.find(got[i].region_id);
      const uint32_t kind = got[i].kind;
      if (base == bases_.end() ||
          (kind != DSVM_FAULT_READ && kind != DSVM_FAULT_WRITE && kind != DSVM_FAULT_UPGRADE)) {
        LogWarning("kmod: an event of unknown region " + std::to_string(got[i].region_id) +
                   " or kind " + std::to_string(kind) + " ignored");
        continue;
      }
      const PageAddr page = base->second + got[i].page_index * kPageSize;
      FaultEvent& e = out[n++];
      e = FaultEvent{};
      e.kind = FaultEventKind::kFault;
      e.page = page;
      e.address = page;
      e.write = kind != DSVM_FAULT_READ;
      e.token = FaultToken{0, page};
      ++stats_.fault_events;
    }
    if (events < want) break;
  }
  return n;
}

Status KmodBackend::Resolve(const FaultToken& token, Resolution how) {
  uint64_t index = 0;
  DSVM_ASSIGN_OR_RETURN(Region * r, Find(token.cookie, &index));
  switch (how) {
    case Resolution::kRetry:
      // The install, upgrade or downgrade that made the access possible
      // answered the module's event already (the usual case: no ioctl on
      // the fault path). A wait the daemon ends with nothing installed (it
      // forgot the page: declared dead, region dropped) still has its
      // thread asleep: wake it, so it faults anew.
      if (r->held[index] != kNone || (features_ & DSVM_FEATURE_WAKE) == 0) return Status::Ok();
      return RangeIoctl(DSVM_IOC_PAGE_WAKE, "DSVM_IOC_PAGE_WAKE", *r, index, 1);
    case Resolution::kError:
      if ((features_ & DSVM_FEATURE_POISON) == 0) {
        return FailedPrecondition("dsvm.ko cannot fail a page's faults (no DSVM_FEATURE_POISON)");
      }
      DSVM_RETURN_IF_ERROR(RangeIoctl(DSVM_IOC_PAGE_POISON, "DSVM_IOC_PAGE_POISON", *r, index, 1));
      r->held[index] = kNone;
      return Status::Ok();
    case Resolution::kInvalid:
      break;
  }
  return InvalidArgument("invalid resolution");
}

// ---------------------------------------------------------------------------
// Pages

Result<KmodBackend::Region*> KmodBackend::Find(PageAddr page, uint64_t* index) {
  auto it = regions_.upper_bound(page);
  if (it == regions_.begin()) return NotFound("page " + Hex(page) + " is in no registered region");
  --it;
  Region& r = it->second;
  if (page - r.store->base() >= r.store->size()) {
    return NotFound("page " + Hex(page) + " is in no registered region");
  }
  DSVM_RETURN_IF_ERROR(r.store->CheckPage(page));
  *index = r.store->IndexOf(page);
  return &r;
}

Status KmodBackend::Install(Region& r, PageAddr page, uint64_t index, uint32_t state) {
  DSVM_ASSIGN_OR_RETURN(bool present, r.store->IsPresent(page));
  if (!present) {
    return FailedPrecondition("page " + Hex(page) + " has no bytes to map (install them first)");
  }
  DSVM_RETURN_IF_ERROR(r.store->ReadPage(page, buf_));
  dsvm_page_install in{};
  in.region_id = r.id;
  in.page_index = index;
  in.data = reinterpret_cast<uint64_t>(buf_.data());
  in.state = state;
  if (Ioctl(control_.get(), DSVM_IOC_PAGE_INSTALL, &in) != 0) {
    return IoctlError("DSVM_IOC_PAGE_INSTALL of " + Hex(page), errno);
  }
  ++stats_.installs;
  r.held[index] = state == DSVM_PAGE_STATE_MODIFIED ? kModified : kShared;
  return Status::Ok();
}

Status KmodBackend::RangeIoctl(unsigned long request, const char* what, const Region& r,
                               uint64_t first, uint64_t count) {
  dsvm_page_range range{};
  range.region_id = r.id;
  range.first = first;
  range.count = count;
  if (Ioctl(control_.get(), request, &range) != 0) {
    return IoctlError(std::string(what) + " of " + Hex(r.store->base() + first * kPageSize), errno);
  }
  return Status::Ok();
}

Status KmodBackend::CopyBack(Region& r, PageAddr page, uint64_t index, uint32_t flags) {
  dsvm_page_writeback wb{};
  wb.region_id = r.id;
  wb.page_index = index;
  wb.data = reinterpret_cast<uint64_t>(buf_.data());
  wb.flags = flags;
  if (Ioctl(control_.get(), DSVM_IOC_PAGE_WRITEBACK, &wb) != 0) {
    return IoctlError("DSVM_IOC_PAGE_WRITEBACK of " + Hex(page), errno);
  }
  ++stats_.writebacks;
  // A clean page's bytes are the store's already (installed from it).
  if (wb.dirty) DSVM_RETURN_IF_ERROR(r.store->WritePage(page, buf_));
  if (flags & DSVM_PAGE_WRITEBACK_INVALIDATE) r.held[index] = kNone;
  if (flags & DSVM_PAGE_WRITEBACK_DOWNGRADE) r.held[index] = kShared;
  return Status::Ok();
}

Status KmodBackend::MapRead(PageAddr page) {
  uint64_t index = 0;
  DSVM_ASSIGN_OR_RETURN(Region * r, Find(page, &index));
  switch (r->held[index]) {
    case kNone:
      return Install(*r, page, index, DSVM_PAGE_STATE_SHARED);
    case kModified:
      // The bytes stay in the module (dirty); WriteBack fetches them.
      DSVM_RETURN_IF_ERROR(RangeIoctl(DSVM_IOC_PAGE_DOWNGRADE, "DSVM_IOC_PAGE_DOWNGRADE", *r, index, 1));
      r->held[index] = kShared;
      return Status::Ok();
    default:
      return Status::Ok();
  }
}

Status KmodBackend::MapWrite(PageAddr page) {
  uint64_t index = 0;
  DSVM_ASSIGN_OR_RETURN(Region * r, Find(page, &index));
  switch (r->held[index]) {
    case kNone:
      return Install(*r, page, index, DSVM_PAGE_STATE_MODIFIED);
    case kShared:
      DSVM_RETURN_IF_ERROR(RangeIoctl(DSVM_IOC_PAGE_UPGRADE, "DSVM_IOC_PAGE_UPGRADE", *r, index, 1));
      r->held[index] = kModified;
      return Status::Ok();
    default:
      return Status::Ok();
  }
}

Status KmodBackend::Unmap(PageAddr page) {
  uint64_t index = 0;
  DSVM_ASSIGN_OR_RETURN(Region * r, Find(page, &index));
  if (r->held[index] == kNone) return Status::Ok();
  // Dropped and copied in one step: no write lands after the copy.
  return CopyBack(*r, page, index, DSVM_PAGE_WRITEBACK_INVALIDATE);
}

Status KmodBackend::WriteBack(PageAddr page) {
  uint64_t index = 0;
  DSVM_ASSIGN_OR_RETURN(Region * r, Find(page, &index));
  if (r->held[index] == kNone) return Status::Ok();  // the store has the bytes
  // A Modified page stays writable: callers that need the bytes to hold
  // still downgrade first (fault_backend.h, "a consistent copy").
  return CopyBack(*r, page, index, 0);
}

Status KmodBackend::Refresh(PageAddr page) {
  uint64_t index = 0;
  DSVM_ASSIGN_OR_RETURN(Region * r, Find(page, &index));
  const Held held = static_cast<Held>(r->held[index]);
  if (held == kNone) return Status::Ok();
  DSVM_RETURN_IF_ERROR(RangeIoctl(DSVM_IOC_PAGE_INVALIDATE, "DSVM_IOC_PAGE_INVALIDATE", *r, index, 1));
  r->held[index] = kNone;
  return Install(*r, page, index,
                 held == kModified ? DSVM_PAGE_STATE_MODIFIED : DSVM_PAGE_STATE_SHARED);
}

Status KmodBackend::Invalidate(PageAddr page) {
  uint64_t index = 0;
  DSVM_ASSIGN_OR_RETURN(Region * r, Find(page, &index));
  DSVM_RETURN_IF_ERROR(RangeIoctl(DSVM_IOC_PAGE_INVALIDATE, "DSVM_IOC_PAGE_INVALIDATE", *r, index, 1));
  r->held[index] = kNone;
  return Status::Ok();
}

Status KmodBackend::InvalidateAll(PageAddr base) {
  auto it = regions_.find(base);
  if (it == regions_.end()) return NotFound("no region registered at " + Hex(base));
  Region& r = it->second;
  DSVM_RETURN_IF_ERROR(
      RangeIoctl(DSVM_IOC_PAGE_INVALIDATE, "DSVM_IOC_PAGE_INVALIDATE", r, 0, r.held.size()));
  std::fill(r.held.begin(), r.held.end(), kNone);
  return r.store->DiscardAll();
}

}  // namespace dsvm::node
