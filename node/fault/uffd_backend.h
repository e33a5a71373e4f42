// UffdBackend: the "uffd" fault backend, built on userfaultfd.
//
// Each client hands over a userfaultfd for its mapping of a region's memfd
// (see uffd_client.h). The daemon registers the whole region in three modes:
//   MISSING  an access to a hole (a page the node does not hold) faults;
//   MINOR    an access to a page in the memfd that this process has not
//            mapped yet faults, so the daemon decides when the bytes it
//            wrote in place become visible (UFFDIO_CONTINUE maps them);
//   WP       a write to a page mapped write-protected faults.
// Why these: a node's copy lives in a memfd shared by all local processes,
// and the daemon cannot touch another process's page tables except through
// that process's userfaultfd. With MISSING alone, bytes written into a hole
// by the daemon would be visible to every process the instant the first byte
// lands (a torn page); MINOR closes that window: the daemon writes the bytes
// into the memfd first (pwrite, or received in place; shared/notes/ucx.md,
// pitfall 10) and maps them when complete, into every process, whichever
// faulted. (UFFDIO_COPY would map into the faulting process only; for 4 KiB
// it costs the same as pwrite + UFFDIO_CONTINUE here.)
// WP on shmem is the only way to make a Shared page read-only in another
// process. The kernel must offer MISSING, MINOR and WP on shmem (Linux 5.19
// and later, Debian 12's 6.1 included); without them Create refuses, and
// such a kernel needs the kmod backend: user space has no other way to
// write-protect or unmap pages in a client's page tables.
//
// How the coherence operations are done:
//   MapRead   UFFDIO_CONTINUE with CONTINUE_MODE_WP into every mapping (one
//             ioctl; where the kernel lacks that mode, CONTINUE then
//             UFFDIO_WRITEPROTECT, which leaves the page writable for the
//             microseconds between the two: use kmod on such kernels), or
//             UFFDIO_WRITEPROTECT alone when the page is mapped already.
//   MapWrite  UFFDIO_CONTINUE, or un-write-protect when mapped already.
//   Invalidate  a hole punch in the memfd: the kernel unmaps the page from
//             every process at once; the next access faults as missing.
//   Unmap     the same after moving the bytes aside (PageStore::Retain): no
//             call removes a page from other processes' page tables while
//             keeping it in the memfd. A writable page is write-protected
//             in every mapping before the copy, so no store slips in
//             between the copy and the punch.
//   Resolve   UFFDIO_WAKE; an error is UFFDIO_POISON (the access gets
//             SIGBUS) or, where the kernel lacks it, SIGBUS sent to the
//             client through its pidfd.
// Mapping is eager: a page made valid is mapped into every registered
// process at once, and a new mapping gets every valid page when added. So a
// read of a page valid on the node normally costs no fault at all; if the
// kernel dropped a PTE (reclaim, say) the access costs one minor fault that
// this class resolves by itself from the page's access state, without the
// coherence agent ("local hits"). Only accesses the node's state does not
// allow become events. The price of MINOR mode: such a local hit is a round
// trip through the daemon (about 2x a kernel minor fault on these machines)
// where MISSING-only registration would let the kernel map the page alone;
// eager mapping makes it rare (shmem PTEs go only with reclaim or the
// client's own madvise).
//
// A client that dies is seen through its pidfd (reported as kMappingClosed);
// a mapping whose process is gone or whose range was unmapped (the ioctls
// fail with ESRCH or ENOENT) is reported the same way. Its waiting faults
// need nothing: the kernel ends them with the process.
//
// Thread safety: none; one owner (FaultBackend).
#ifndef DSVM_NODE_FAULT_UFFD_BACKEND_H_
#define DSVM_NODE_FAULT_UFFD_BACKEND_H_

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

struct UffdBackendOptions {
  size_t max_mappings = 256;
  // Use UFFDIO_CONTINUE_MODE_WP where the kernel has it. False forces the
  // two-ioctl fallback (for tests of that path).
  bool use_continue_wp = true;
  // Use UFFDIO_POISON where the kernel has it. False forces the SIGBUS
  // fallback.
  bool use_poison = true;
};

// What the running kernel offers, found by Create.
struct UffdFeatures {
  uint64_t api_features = 0;  // UFFDIO_API's answer to a request for none
  bool continue_wp = false;   // UFFDIO_CONTINUE_MODE_WP works on shmem
  bool poison = false;        // UFFDIO_POISON
  bool thread_id = false;     // events name the faulting thread
};

struct UffdBackendStats {
  uint64_t fault_events = 0;  // faults handed to the daemon
  uint64_t local_hits = 0;    // faults resolved here: the page was valid already
  uint64_t bad_events = 0;    // messages refused (unknown kind, address off the region)
  uint64_t mappings_closed = 0;
  uint64_t map_ioctls = 0;  // UFFDIO_CONTINUE and UFFDIO_WRITEPROTECT calls
};

class UffdBackend final : public FaultBackend {
 public:
  // Probes the kernel. Errors: kPermissionDenied or kUnavailable (no usable
  // userfaultfd here, see CreateUserfaultfd), kFailedPrecondition (the kernel
  // lacks missing, minor or write-protect faults on shmem), kIoError.
  static Result<std::unique_ptr<UffdBackend>> Create(UffdBackendOptions options = {});
  ~UffdBackend() override;

  std::string_view name() const override { return "uffd"; }
  Status AddRegion(PageStore* store) override;
  Status RemoveRegion(PageAddr base) override;
  // `request.fault_fd` is the client's userfaultfd, not yet initialised.
  // Besides those of FaultBackend, kInvalidArgument when it is not a
  // userfaultfd, was initialised already, or the client's range is not the
  // region's memfd mapped shared at the region's base; kUnavailable when the
  // client is gone.
  Result<MappingId> AddMapping(MappingRequest request) override;
  Status RemoveMapping(MappingId id) override;
  int event_fd() const override { return epoll_.get(); }
  Result<size_t> ReadEvents(std::span<FaultEvent> out) override;
  Status Resolve(const FaultToken& token, Resolution how) override;
  Status MapRead(PageAddr page) override;
  Status MapWrite(PageAddr page) override;
  // One UFFDIO_CONTINUE per mapping for each part of the run whose pages
  // share their current access.
  Status MapRange(PageAddr first, size_t count, uint64_t page_size, bool write) override;
  Status Unmap(PageAddr page) override;
  // Write-protects the run's writable pages in every mapping, a range at a
  // time, then retains the run with PageStore::RetainRange. On an error
  // the pages retained before it are unmapped, the others unchanged.
  Status UnmapRange(PageAddr first, size_t count, uint64_t page_size) override;
  Status Invalidate(PageAddr page) override;
  Status InvalidateAll(PageAddr base) override;
  // Nothing to copy: clients map the store's memfd. Validates `page`.
  Status WriteBack(PageAddr page) override;

  const UffdFeatures& features() const { return features_; }
  const UffdBackendStats& stats() const { return stats_; }
  uint64_t local_hits() const override { return stats_.local_hits; }
  int client_map_fd(const PageStore& store) const override { return store.fd(); }
  // Nothing to do: clients map the store's memfd. Validates `page`.
  Status Refresh(PageAddr page) override { return WriteBack(page); }
  size_t mapping_count() const { return mappings_.size(); }

 private:
  // What local processes may do with a page; one byte per page per region.
  enum Access : uint8_t { kNone = 0, kRead = 1, kWrite = 2 };

  struct Region {
    PageStore* store = nullptr;
    std::vector<uint8_t> access;  // Access, by page index
    std::vector<MappingId> mappings;
  };
  struct Mapping {
    MappingId id = 0;
    PageAddr region = 0;
    pid_t pid = 0;
    UniqueFd uffd;
    UniqueFd pidfd;
    bool closed = false;  // reported (or to be reported) as kMappingClosed
  };

  UffdBackend(UffdBackendOptions options, UffdFeatures features, UniqueFd epoll);

  Region* FindRegion(PageAddr page);
  Status SetAccess(PageAddr page, Access access) { return SetAccessRange(page, 1, access); }
  Status SetAccessRange(PageAddr first, size_t count, Access access);
  // Makes [addr, addr + len) of `m` accessible as `access` says. A mapping
  // found gone is marked closed, which is not an error of the call.
  // REQUIRES: access != kNone; the bytes are in the memfd.
  Status Install(Mapping& m, Region& r, uint64_t addr, uint64_t len, Access access, bool mapped);
  Status WriteProtect(Mapping& m, uint64_t addr, uint64_t len, bool protect);
  Status Wake(Mapping& m, uint64_t addr, uint64_t len);
  Status Poison(Mapping& m, Region& r, uint64_t addr, uint64_t len);
  // Classifies a failed ioctl on `m`: the process is gone or its range was
  // unmapped (closes the mapping, OK), else the error.
  Status MappingError(Mapping& m, const char* what, int err);
  void MarkClosed(Mapping& m, const std::string& why);
  Status CheckClientRange(const Mapping& m, const Region& r) const;
  void HandleMessages(Mapping& m, std::span<FaultEvent> out, size_t* n);

  const UffdBackendOptions options_;
  const UffdFeatures features_;
  UniqueFd epoll_;  // every live mapping's userfaultfd and pidfd
  MappingId next_mapping_ = 1;
  std::map<PageAddr, Region> regions_;  // by base
  std::unordered_map<MappingId, Mapping> mappings_;
  // Mappings closed but not yet reported; at most one entry per mapping.
  std::deque<MappingId> closed_notices_;
  UffdBackendStats stats_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_FAULT_UFFD_BACKEND_H_
