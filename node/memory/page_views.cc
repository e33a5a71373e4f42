#include "node/memory/page_views.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <unordered_set>

#include "proto/log.h"

// Linux 5.14; older C libraries lack the name.
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

// UCX's memory hooks (libucm), where the process has UCX: weak, so that
// the memory layer needs no UCX (the GPU tier's tests run without it).
extern "C" void ucm_vm_munmap(void* addr, size_t length) __attribute__((weak));

namespace dsvm::node {

struct PageViews::Registry {
  int fd = -1;  // -1 once closed
  uint32_t page_size = 0;
  std::unordered_map<uint64_t, std::vector<View*>> by_offset;  // views not detached
  size_t count = 0;
  // Receiving views detached before their transfer ended: what they hold
  // may lack what a peer or a NIC wrote to the page meanwhile.
  std::unordered_set<const uint8_t*> torn;
  uint64_t detached = 0;
};

struct PageViews::View {
  std::shared_ptr<Registry> registry;
  uint8_t* addr = nullptr;
  uint64_t offset = 0;
  bool writable = false;
  bool detached = false;
  bool adopted = false;

  ~View() {
    if (detached) {
      registry->torn.erase(addr);
    } else {
      Unregister();
    }
    ::munmap(addr, registry->page_size);
    // A page received in place that no one installed goes back to a hole.
    if (writable && !detached && !adopted && registry->fd >= 0 &&
        ::fallocate(registry->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset), registry->page_size) != 0) {
      LogError(std::string("punching a page received in place but not installed: ") +
               std::strerror(errno));
    }
  }

  void Unregister() {
    auto it = registry->by_offset.find(offset);
    if (it == registry->by_offset.end()) return;
    std::erase(it->second, this);
    if (it->second.empty()) registry->by_offset.erase(it);
    --registry->count;
  }

  // Puts a private copy of the bytes where the view was, in one step: the
  // CPU, reading or writing through this process's page tables (the daemon
  // for tcp, a peer's CMA read), finds the page or the copy, never neither.
  // UCX, which holds the address, goes on with the copy. Memory a NIC has
  // pinned (verbs) keeps the page itself: the store puts new bytes in a
  // fresh page rather than this one (PageStore::Fill), and a receive
  // detached before it ended is not trusted (Intact).
  void DetachNow() {
    const size_t len = registry->page_size;
    void* copy = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    // The system call itself: UCX's memory hooks (libucm) replace mremap
    // in every process that loads UCX, and theirs drops MREMAP_FIXED's
    // new address (the copy went to address 0 in a test). So UCX is told
    // by hand that the view's pages left the address: a registration of
    // them it cached (verbs) must not be used for the copy.
    if (copy == MAP_FAILED ||
        (std::memcpy(copy, addr, len),
         ::syscall(SYS_mremap, copy, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, addr) !=
             reinterpret_cast<long>(addr))) {
      // Left as it is, the transfer may see the page change or fault a
      // punched page in again; nothing else can be done here.
      LogError(std::string("detaching a page's view from the region memfd: ") +
               std::strerror(errno));
      if (copy != MAP_FAILED) ::munmap(copy, len);
    } else if (ucm_vm_munmap != nullptr) {
      ucm_vm_munmap(addr, len);
    }
    Unregister();
    detached = true;
    if (writable) registry->torn.insert(addr);
    ++registry->detached;
  }
};

PageViews::PageViews(int fd, uint32_t page_size) : registry_(std::make_shared<Registry>()) {
  registry_->fd = fd;
  registry_->page_size = page_size;
}

PageViews::~PageViews() { Close(); }

namespace {

Result<uint8_t*> MapPage(int fd, uint64_t offset, size_t len, bool writable) {
  // Populated now: the page's mapping (and, for a receive, its allocation
  // and zeroing) is paid here, not inside the transfer.
  void* p = ::mmap(nullptr, len, writable ? PROT_READ | PROT_WRITE : PROT_READ,
                   writable ? MAP_SHARED : MAP_SHARED | MAP_POPULATE, fd,
                   static_cast<off_t>(offset));
  if (p == MAP_FAILED) {
    return IoError(std::string("mmap of a page of the region memfd: ") + std::strerror(errno));
  }
  // A hole is allocated here, where a shortage (no hugetlb page left) is
  // an error, not a SIGBUS inside the receive. MAP_POPULATE would say nothing.
  if (writable && ::madvise(p, len, MADV_POPULATE_WRITE) != 0) {
    const int err = errno;
    ::munmap(p, len);
    return IoError(std::string("allocating a page of the region memfd to receive into: ") +
                   std::strerror(err));
  }
  // Children the daemon forks must not share it.
  ::madvise(p, len, MADV_DONTFORK);
  return static_cast<uint8_t*>(p);
}

}  // namespace

Result<std::shared_ptr<const uint8_t>> PageViews::MapForSend(uint64_t offset) {
  Registry& r = *registry_;
  if (r.fd < 0) return FailedPrecondition("page views: closed");
  auto it = r.by_offset.find(offset);
  if (it != r.by_offset.end() &&
      std::any_of(it->second.begin(), it->second.end(), [](View* v) { return v->writable; })) {
    return FailedPrecondition("page views: the page is being received in place");
  }
  DSVM_ASSIGN_OR_RETURN(uint8_t* addr, MapPage(r.fd, offset, r.page_size, false));
  auto view = std::make_shared<View>();
  view->registry = registry_;
  view->addr = addr;
  view->offset = offset;
  r.by_offset[offset].push_back(view.get());
  ++r.count;
  return std::shared_ptr<const uint8_t>(view, addr);
}

Result<std::shared_ptr<uint8_t>> PageViews::MapForReceive(uint64_t offset) {
  Registry& r = *registry_;
  if (r.fd < 0) return FailedPrecondition("page views: closed");
  if (r.by_offset.count(offset) != 0) return FailedPrecondition("page views: the page has a view");
  DSVM_ASSIGN_OR_RETURN(uint8_t* addr, MapPage(r.fd, offset, r.page_size, true));
  auto view = std::make_shared<View>();
  view->registry = registry_;
  view->addr = addr;
  view->offset = offset;
  view->writable = true;
  r.by_offset[offset].push_back(view.get());
  ++r.count;
  return std::shared_ptr<uint8_t>(view, addr);
}

bool PageViews::Adopt(uint64_t offset, const uint8_t* bytes) {
  auto it = registry_->by_offset.find(offset);
  if (it == registry_->by_offset.end()) return false;
  for (View* v : it->second) {
    if (v->writable && v->addr == bytes) {
      v->adopted = true;
      return true;
    }
  }
  return false;
}

bool PageViews::Detach(uint64_t offset, uint64_t bytes) {
  Registry& r = *registry_;
  if (r.count == 0) return false;
  std::vector<View*> hit;
  if (bytes / r.page_size <= r.by_offset.size()) {
    for (uint64_t at = offset; at < offset + bytes; at += r.page_size) {
      if (auto it = r.by_offset.find(at); it != r.by_offset.end()) {
        hit.insert(hit.end(), it->second.begin(), it->second.end());
      }
    }
  } else {
    for (const auto& [at, views] : r.by_offset) {
      if (at >= offset && at < offset + bytes) hit.insert(hit.end(), views.begin(), views.end());
    }
  }
  for (View* v : hit) v->DetachNow();
  return !hit.empty();
}

bool PageViews::Intact(const uint8_t* bytes) const { return registry_->torn.count(bytes) == 0; }

bool PageViews::Has(uint64_t offset) const { return registry_->by_offset.count(offset) != 0; }

void PageViews::Close() { registry_->fd = -1; }

bool PageViews::empty() const { return registry_->count == 0; }
size_t PageViews::count() const { return registry_->count; }
uint64_t PageViews::detached() const { return registry_->detached; }

}  // namespace dsvm::node
