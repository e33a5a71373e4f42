// KmodBackend: the fault backend on dsvm.ko (kmod/, docs/KMOD.md).
//
// The module keeps the node's pages itself: a page the daemon maps is
// installed into the module's table (its bytes copied in from the PageStore),
// and a fault on an installed page is resolved in the kernel, without the
// daemon. Only real misses reach the daemon, as fault events on its control
// file (one per page and kind; every thread faulting on the page waits on
// it). An event is answered by any change of its page (install, upgrade,
// downgrade, invalidate, poison), after which the waiting threads retry.
//
// Bytes: while a page is installed, the module's copy is the one processes
// see and write; WriteBack copies it back into the store (the rule in
// fault_backend.h: the daemon writes back before it reads a page's bytes),
// and Unmap copies it back as it drops the page.
//
// Clients map a region by mmap of /dev/dsvm at the region's base (offset =
// base), through a descriptor the daemon hands them (client_map_fd); the
// module serves every process that maps it, so a mapping here only tracks
// the client's life (its pidfd), for kMappingClosed and RemoveRegion's
// check. 4 KiB pages only: the module refuses other page sizes (a region
// of another size needs the uffd backend).
//
// Thread safety: one owner, the daemon's fault strand.
#ifndef DSVM_NODE_FAULT_KMOD_BACKEND_H_
#define DSVM_NODE_FAULT_KMOD_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "node/fault/fault_backend.h"
#include "node/memory/page_store.h"
#include "node/memory/unique_fd.h"
#include "proto/status.h"

namespace dsvm::node {

struct KmodBackendOptions {
  std::string device = "/dev/dsvm";
  size_t max_mappings = 256;
};

struct KmodBackendStats {
  uint64_t fault_events = 0;  // events handed to the daemon
  uint64_t installs = 0;      // pages copied into the module
  uint64_t writebacks = 0;    // pages copied back into the store
  uint64_t mappings_closed = 0;
};

class KmodBackend final : public FaultBackend {
 public:
  // Opens the device and claims the node's control file. Errors:
  // kUnavailable (no device: the module is not loaded), kFailedPrecondition
  // (the module speaks another ABI, lacks fault events or writeback, or
  // another daemon holds the control file), kIoError.
  static Result<std::unique_ptr<KmodBackend>> Create(KmodBackendOptions options = {});
  ~KmodBackend() override = default;

  std::string_view name() const override { return "kmod"; }
  // Besides FaultBackend's errors: kInvalidArgument for a page size other
  // than 4 KiB.
  Status AddRegion(PageStore* store) override;
  Status RemoveRegion(PageAddr base) override;
  // `request.fault_fd` is the client's descriptor of the device, which it
  // mapped the region with (checked: the same device as the daemon's).
  Result<MappingId> AddMapping(MappingRequest request) override;
  Status RemoveMapping(MappingId id) override;
  // Faults the module resolved in the kernel (node-wide: every region).
  uint64_t local_hits() const override;
  int event_fd() const override { return epoll_.get(); }
  Result<size_t> ReadEvents(std::span<FaultEvent> out) override;
  // kRetry: nothing to do (the change that made the page accessible
  // answered the module's event). kError: the page is poisoned, so its
  // faulting threads get SIGBUS (until it is installed again).
  Status Resolve(const FaultToken& token, Resolution how) override;
  Status MapRead(PageAddr page) override;
  Status MapWrite(PageAddr page) override;
  Status Unmap(PageAddr page) override;
  Status WriteBack(PageAddr page) override;
  // Drops the module's copy and installs the store's bytes in the same state.
  Status Refresh(PageAddr page) override;
  Status Invalidate(PageAddr page) override;
  Status InvalidateAll(PageAddr base) override;
  int client_map_fd(const PageStore&) const override { return client_.get(); }

  const KmodBackendStats& stats() const { return stats_; }
  uint64_t features() const { return features_; }

 private:
  // What the module holds of a page.
  enum Held : uint8_t { kNone = 0, kShared = 1, kModified = 2 };
  struct Region {
    PageStore* store = nullptr;
    uint64_t id = 0;            // the module's region id
    std::vector<uint8_t> held;  // Held, by page index
    std::vector<MappingId> mappings;
  };
  struct Mapping {
    MappingId id = 0;
    PageAddr region = 0;
    pid_t pid = 0;
    UniqueFd pidfd;
    bool closed = false;
  };

  KmodBackend(KmodBackendOptions options, UniqueFd control, UniqueFd client, UniqueFd epoll,
              uint64_t features);
  Result<Region*> Find(PageAddr page, uint64_t* index);
  // Copies the store's bytes of `page` into the module in `state`.
  Status Install(Region& r, PageAddr page, uint64_t index, uint32_t state);
  // The range ioctls (invalidate, downgrade, upgrade, poison) on one page.
  Status RangeIoctl(unsigned long request, const char* what, const Region& r, uint64_t first,
                    uint64_t count);
  // Copies the module's bytes of `page` into the store; `flags` as
  // DSVM_PAGE_WRITEBACK_*.
  Status CopyBack(Region& r, PageAddr page, uint64_t index, uint32_t flags);
  void MarkClosed(Mapping& m, const std::string& why);

  KmodBackendOptions options_;
  UniqueFd control_;  // the control file: regions, pages, fault events
  UniqueFd client_;   // handed to clients to mmap regions with
  UniqueFd epoll_;    // control_ and every mapping's pidfd
  uint64_t features_ = 0;
  uint64_t next_region_id_ = 1;
  MappingId next_mapping_ = 1;
  std::map<PageAddr, Region> regions_;            // by base
  std::unordered_map<uint64_t, PageAddr> bases_;  // module region id -> base
  std::unordered_map<MappingId, Mapping> mappings_;
  std::deque<MappingId> closed_notices_;
  std::vector<uint8_t> buf_;  // one page, for copies in and out
  KmodBackendStats stats_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_FAULT_KMOD_BACKEND_H_
