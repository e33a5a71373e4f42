// FaultBackend: how the node daemon catches the page faults of local
// processes on dsvm regions and controls what those processes may access.
//
// The coherence core (node/coherence/NodeAgent) knows nothing of this: it
// turns faults into Actions, and the daemon carries them out with a
// PageStore (the node's copy of the bytes) and a FaultBackend (what local
// processes see). Two backends:
//   "uffd" (UffdBackend): userfaultfd descriptors handed over by the clients;
//     clients map the PageStore's memfd itself, so the store's bytes are the
//     bytes they see and WriteBack has nothing to do.
//   "kmod" (KmodBackend): dsvm.ko's /dev/dsvm; the module keeps its own pages,
//     so it copies the store's bytes in when a page is mapped and back
//     (WriteBack) before the daemon reads them.
//
// How the daemon carries out the agent's actions (`page` is the action's):
//   kMapRead      backend.MapRead(page)
//   kMapWrite     backend.MapWrite(page)
//   kUnmap        backend.Unmap(page)
//   kDiscard      backend.Invalidate(page); store.Discard(page)
//   kStash        backend.Unmap(page); store.Stash(page, txn)
//   kInstallZero  store.ZeroPage(page)
//   kInstallData  store.WritePage(page, bytes)   (or receive into MappedPage)
//   kInstallStash store.InstallStash(page, txn)
//   kDropStash    store.DropStash(page, txn)
//   kSendPage     backend.WriteBack(page); store.ReadPage(page, buf)
//   kSendStash    store.ReadStash(page, txn, buf)
//   kWake         backend.Resolve(token of waiter, status ok ? kRetry : kError)
// A fault event becomes agent.Fault(page, write, waiter) with a waiter id the
// daemon maps to the event's token; kHit means Resolve(token, kRetry) at once.
//
// Rule for a consistent copy: bytes read for kSendPage must not change while
// they are read, so a page that local processes may write is downgraded
// first. The agent emits a Fetch's downgrade (kMapRead, or kStash for a move,
// whose bytes are then sent from the stash with kSendStash) before the send.
// Installs (kInstall*) write the bytes into the store before the
// MapRead/MapWrite that exposes them, so they must target a page no local
// process can access: the agent installs only into Invalid pages (unmapped,
// or retained); should that ever change, the executor calls
// Invalidate(page) before the install.
//
// How each call maps to dsvm.ko (kmod/uapi/dsvm_uapi.h; KmodBackend):
//   AddRegion      DSVM_IOC_REGION_CREATE (4 KiB pages only).
//   RemoveRegion   DSVM_IOC_REGION_DESTROY, refused while a client maps it.
//   AddMapping     the client mmaps /dev/dsvm at the region's base (offset =
//                  base) through client_map_fd; the module serves every
//                  process that maps it, and the daemon keeps the client's
//                  pidfd to learn of its exit (kMappingClosed).
//   event_fd       an epoll set of the control file and the pidfds.
//   ReadEvents     read(2) of several fault events (one per page and kind).
//   Resolve        kRetry: nothing (the page's change answered the event);
//                  kError: DSVM_IOC_PAGE_POISON (SIGBUS until reinstalled).
//   MapRead        DSVM_IOC_PAGE_INSTALL{SHARED, the store's bytes} for a
//                  page not held, DSVM_IOC_PAGE_DOWNGRADE for a Modified one.
//   MapWrite       DSVM_IOC_PAGE_INSTALL{MODIFIED}, or DSVM_IOC_PAGE_UPGRADE
//                  of a Shared page in place.
//   WriteBack      DSVM_IOC_PAGE_WRITEBACK into store.WritePage when dirty.
//   Unmap          DSVM_IOC_PAGE_WRITEBACK with _INVALIDATE (one step).
//   Invalidate     DSVM_IOC_PAGE_INVALIDATE.
// The module resolves a fault on a page valid on the node inside the kernel
// and sends only real misses up; UffdBackend does the same in user space
// (see its "local hits"), at the cost of a round trip through the daemon.
//
// Thread safety: a backend has one owner, the daemon's fault strand.
#ifndef DSVM_NODE_FAULT_FAULT_BACKEND_H_
#define DSVM_NODE_FAULT_FAULT_BACKEND_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <string_view>

#include "node/memory/page_store.h"
#include "node/memory/unique_fd.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::node {

// One client process's mapping of one region. 0 is never a mapping.
using MappingId = uint64_t;

// Names one faulting access until it is resolved. `cookie` is the backend's:
// the faulting page's address for uffd (which wakes by address), the kernel's
// event id for kmod.
struct FaultToken {
  MappingId mapping = 0;
  uint64_t cookie = 0;
};

enum class FaultEventKind : uint8_t {
  kInvalid = 0,
  // A local access needs the daemon: `page`, `write` and `token` are set.
  kFault = 1,
  // The mapping's process is gone (or its mapping broke): nothing of it needs
  // resolving any more. The daemon calls RemoveMapping(mapping).
  kMappingClosed = 2,
};

struct FaultEvent {
  FaultEventKind kind = FaultEventKind::kInvalid;
  MappingId mapping = 0;
  PageAddr page = 0;     // the faulting page (aligned to the region's page size)
  uint64_t address = 0;  // the faulting address as reported (page granular for uffd)
  bool write = false;    // the access writes (a write to a read-only page included)
  uint32_t thread = 0;   // the faulting thread's id where the backend knows it, else 0
  FaultToken token;
};

enum class Resolution : uint8_t {
  kInvalid = 0,
  kRetry = 1,  // the page is mapped as the access needs: let it run again
  kError = 2,  // the access cannot be served (a lost page): it gets SIGBUS
};

// What a client hands over to have its mapping of a region served.
struct MappingRequest {
  PageAddr region = 0;  // the region's base
  pid_t pid = 0;        // the client (from SO_PEERCRED)
  // The client's fault descriptor: its userfaultfd (uffd), its /dev/dsvm
  // file (kmod).
  UniqueFd fault_fd;
  // Optional: a pidfd of the client, sent by the client itself so it cannot
  // name a recycled pid. Without one the backend opens one from `pid`.
  UniqueFd pidfd;
};

// For backends: moves mapping-closed notices into `out` from position `*n`
// on, as kMappingClosed events, while room remains; advances `*n`.
inline void DrainClosedNotices(std::deque<MappingId>* notices, std::span<FaultEvent> out,
                               size_t* n) {
  while (*n < out.size() && !notices->empty()) {
    FaultEvent& e = out[(*n)++];
    e = FaultEvent{};
    e.kind = FaultEventKind::kMappingClosed;
    e.mapping = notices->front();
    notices->pop_front();
  }
}

class FaultBackend {
 public:
  virtual ~FaultBackend() = default;

  virtual std::string_view name() const = 0;
  // The name of the backend that serves regions of pages of `page_size`
  // bytes: name(), but for a backend made of several (MixedBackend).
  virtual std::string_view NameFor(uint64_t page_size) const {
    (void)page_size;
    return name();
  }

  // Serves faults on the region whose bytes `store` holds. REQUIRES: `store`
  // outlives the region's registration. Errors: kAlreadyExists,
  // kInvalidArgument (overlaps a region).
  virtual Status AddRegion(PageStore* store) = 0;
  // Errors: kNotFound, kFailedPrecondition (mappings remain).
  virtual Status RemoveRegion(PageAddr base) = 0;

  // Starts serving one client's mapping of a region; every page valid on the
  // node becomes accessible to it as MapRead/MapWrite said. REQUIRES: the
  // client has mapped the region's memfd at the region's base and does not
  // touch it before this returns. Errors: kNotFound (region),
  // kResourceExhausted (too many mappings), kInvalidArgument (the descriptor
  // is not what the backend needs), kFailedPrecondition (the kernel lacks a
  // feature), kIoError.
  virtual Result<MappingId> AddMapping(MappingRequest request) = 0;
  // Stops serving a mapping and closes its descriptors. Threads of it still
  // waiting are released. Call after kMappingClosed, or once the client said
  // it closed the region: with the uffd backend a live client's mapping would
  // otherwise become a plain, incoherent view of the memfd. Errors: kNotFound.
  virtual Status RemoveMapping(MappingId id) = 0;

  // The descriptor a client maps the region of `store` with (the daemon
  // hands it over with the region): the store's memfd (uffd), or a file of
  // /dev/dsvm (kmod, mapped at offset = base).
  virtual int client_map_fd(const PageStore& store) const = 0;

  // Faults the backend resolved by itself, without the coherence agent (the
  // page was valid on the node; the process lacked only its PTE).
  virtual uint64_t local_hits() const = 0;

  // Readable (poll/epoll POLLIN) when ReadEvents may return events.
  virtual int event_fd() const = 0;
  // Fills `out` with events without blocking; returns how many (0: none now).
  // Events left over stay for the next call. Errors: kIoError.
  virtual Result<size_t> ReadEvents(std::span<FaultEvent> out) = 0;
  // Ends the wait of the access named by `token`. Errors: kNotFound (the
  // mapping was removed: nothing waits any more), kInvalidArgument.
  virtual Status Resolve(const FaultToken& token, Resolution how) = 0;

  // Local processes may read `page` and not write it: a write faults with
  // write = true. The page's bytes must be in the store. Errors:
  // kInvalidArgument, kNotFound (no region), kFailedPrecondition (no bytes),
  // kIoError.
  virtual Status MapRead(PageAddr page) = 0;
  // Local processes may read and write `page`. Errors: as MapRead.
  virtual Status MapWrite(PageAddr page) = 0;
  // MapRead (or MapWrite) of `count` neighbouring pages of one region from
  // `first`; a backend that can map a run at once overrides it. Stops at
  // the first page that fails. Errors: as MapRead.
  virtual Status MapRange(PageAddr first, size_t count, uint64_t page_size, bool write) {
    for (size_t i = 0; i < count; ++i) {
      const PageAddr page = first + i * page_size;
      DSVM_RETURN_IF_ERROR(write ? MapWrite(page) : MapRead(page));
    }
    return Status::Ok();
  }
  // No local access reaches `page` until the next MapRead/MapWrite; its bytes
  // stay available through the store. Errors: kInvalidArgument, kNotFound,
  // kResourceExhausted, kIoError.
  virtual Status Unmap(PageAddr page) = 0;
  // Unmap of `count` neighbouring pages of one region from `first`; a
  // backend that can revoke a run at once overrides it. On an error some
  // pages may be unmapped already (this default stops at the first page
  // that fails). Errors: as Unmap.
  virtual Status UnmapRange(PageAddr first, size_t count, uint64_t page_size) {
    for (size_t i = 0; i < count; ++i) DSVM_RETURN_IF_ERROR(Unmap(first + i * page_size));
    return Status::Ok();
  }
  // Makes the store hold the bytes local processes see of `page` (a backend
  // that keeps its own copy of mapped pages copies it back). Errors:
  // kInvalidArgument, kNotFound, kIoError.
  virtual Status WriteBack(PageAddr page) = 0;
  // The store's bytes of `page`, which local processes may access, were
  // changed by the daemon itself (after WriteBack): make local processes
  // see them. Nothing to do where they map the store. Errors: as MapRead.
  virtual Status Refresh(PageAddr page) = 0;
  // As Unmap, but the bytes may be dropped (the caller discards them).
  virtual Status Invalidate(PageAddr page) = 0;
  // Invalidate for every page of the region at `base`, and the store's
  // bytes, stashes and retained pages dropped. Errors: kNotFound, kIoError.
  virtual Status InvalidateAll(PageAddr base) = 0;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_FAULT_FAULT_BACKEND_H_
