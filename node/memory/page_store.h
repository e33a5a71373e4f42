// PageStore: the node's copy of one region's bytes.
//
// The bytes live in one memfd sized to the region. Every local process that
// maps the region maps this memfd (MAP_SHARED, at the region's cluster-wide
// address), so all processes of a node share one copy of each page: the node
// is the unit of coherence (proto/PROTOCOL.md, "node"). The daemon reaches the
// bytes through its own mapping of the memfd, at an address of its choosing.
//
// A page is *present* when the memfd holds it (it is in the page cache) and a
// *hole* otherwise. The fault backends rely on that distinction: the uffd
// backend makes a client access to a hole fault as "missing", so Discard
// (a hole punch) is also what invalidates every local mapping at once. Hence
// the rules below: this class never makes a hole present by accident (reads
// use pread, which returns zeros for a hole without allocating), and only the
// Write/Zero/Install calls make a page present, besides a page being
// received in place (ReceiveInPlace), present while its bytes arrive.
//
// Besides the memfd, a side area keeps bytes that are not in the memfd:
// stashes (bytes given away in a move, kept until the directory says the
// move completed; keyed by page and txn; bounded) and retained pages (bytes
// of a page whose local access was revoked while the node still holds it: a
// give-up is pending, a GPU may write it, or the node's lease lapsed; at
// most one per page). "The page's bytes" below means the retained bytes when the page
// is retained, else the memfd's.
//
// Thread safety: none, but for ReadPage and WriteUnretained (see there). One
// owner (the daemon's fault-handling strand) calls every method. Client processes touch the memfd concurrently through their
// own mappings; the fault backend's mapping rules keep them away from a page
// while its bytes change here.
#ifndef DSVM_NODE_MEMORY_PAGE_STORE_H_
#define DSVM_NODE_MEMORY_PAGE_STORE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "node/memory/page_views.h"
#include "node/memory/unique_fd.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::node {

using proto::PageAddr;
using proto::TxnId;

struct PageStoreOptions {
  // Bound on stashes, in pages: once reached, a Stash of a page that is not
  // retained is refused with kResourceExhausted (a retained page's bytes
  // become its stash without room). Retained pages need no bound: a page is
  // retained at most once, and its bytes leave the memfd as they are kept,
  // so they take the memory the page took (RetainRange holds one run of up
  // to 16 MiB twice while it moves it). (A node whose lease lapsed
  // retains every page its processes could reach: docs/PROTOCOL.md.)
  size_t max_stashes = 1024;
  // For 2 MiB pages, back the memfd with hugetlb pages when the kernel has
  // enough of them free; otherwise (or when false) use a plain memfd whose
  // page cache holds 4 KiB pages, and treat each 512 of them as one page.
  bool try_hugetlb = true;
  // memfd name, shown in /proc/<pid>/maps.
  std::string name = "dsvm-region";
  // Let the GPU tier's copies go through this process's mapping (see
  // "Copies through the mapping" in PageStore); false: pread and pwrite
  // only (the limits on write(2), RLIMIT_FSIZE say, then hold for them).
  bool map_for_copies = true;
};

class PageStore {
 public:
  // Creates the memfd for the region [base, base + size) with pages of
  // page_size bytes (4 KiB, 64 KiB or 2 MiB), all holes, and maps it into
  // this process. Errors: kInvalidArgument (page size not one of those; base
  // or size not a multiple of it; size 0 or the range overflows), kIoError
  // (memfd_create, ftruncate or mmap refused).
  static Result<std::unique_ptr<PageStore>> Create(PageAddr base, uint64_t size, uint32_t page_size,
                                                   PageStoreOptions options = {});
  ~PageStore();
  PageStore(const PageStore&) = delete;
  PageStore& operator=(const PageStore&) = delete;

  // The memfd: clients map it MAP_SHARED at base() with offset 0.
  int fd() const { return fd_.get(); }
  PageAddr base() const { return base_; }
  uint64_t size() const { return size_; }
  uint32_t page_size() const { return page_size_; }
  uint64_t page_count() const { return size_ / page_size_; }
  // True when the memfd is backed by hugetlb pages (2 MiB regions only).
  bool hugetlb() const { return hugetlb_; }

  // OK when `page` is the first byte of a page of this region. Errors:
  // kInvalidArgument (outside the region, or not aligned to page_size), with
  // the address and the region in the message.
  Status CheckPage(PageAddr page) const;
  // The page's offset in the memfd. REQUIRES: CheckPage(page).ok().
  uint64_t OffsetOf(PageAddr page) const { return page - base_; }
  // The page's index in the region. REQUIRES: CheckPage(page).ok().
  uint64_t IndexOf(PageAddr page) const { return (page - base_) / page_size_; }

  // Copies the page's bytes to `out` (exactly page_size bytes). A hole reads
  // as zeros and stays a hole. Errors: kInvalidArgument (bad page or size),
  // kIoError.
  Status ReadPage(PageAddr page, std::span<uint8_t> out) const;
  // Makes `in` (exactly page_size bytes) the page's bytes in the memfd; the
  // page becomes present and is no longer retained. REQUIRES: no client may
  // read the page until it is mapped again (the fault backend's job). Errors:
  // kInvalidArgument, kIoError.
  Status WritePage(PageAddr page, std::span<const uint8_t> in);
  // As WritePage for a page that is not retained, for the GPU tier's copy
  // threads: several threads may call it, ReadForCopy and ReadPage at once,
  // for different pages, while no other method runs. The bytes go through
  // this process's mapping of the memfd (see "Copies through the mapping"
  // below), not pwrite, whose inode lock lets one writer at a time into the
  // memfd. REQUIRES: !IsRetained(page). Errors: as WritePage.
  Status WriteUnretained(PageAddr page, std::span<const uint8_t> in);
  // As ReadPage, for the GPU tier's copy threads (as WriteUnretained): a
  // page whose bytes are all in the memfd is mapped first, so that this and
  // later copies of it go through the mapping. A hole still reads as zeros
  // and stays a hole. Errors: as ReadPage.
  Status ReadForCopy(PageAddr page, std::span<uint8_t> out);
  // As WritePage for pages.size() neighbouring pages from `first`, in one
  // pwritev where the memfd takes write(2). Errors: as WritePage.
  Status WritePages(PageAddr first, std::span<const std::span<const uint8_t>> pages);
  // As WritePage with zeros.
  Status ZeroPage(PageAddr page);
  // Whether copies of the page go through this process's mapping (see
  // "Copies through the mapping" below): it is mapped here and all of it
  // is in the memfd. REQUIRES: CheckPage(page).ok().
  bool IsMapped(PageAddr page) const {
    return mapped_ != nullptr && mapped_[IndexOf(page)].load(std::memory_order_relaxed) != 0;
  }

  // Direct copies (the GPU tier registers a block with the device and
  // copies between the device and the block's mapping here, with no staging
  // copy: DeviceBackend::RegisterHost). A block is 2 MiB of the region
  // (aligned to its base; the region's end may cut the last one), or one
  // page where pages are larger.
  struct Block {
    uint8_t* data = nullptr;  // this process's mapping of it
    PageAddr first = 0;
    uint64_t bytes = 0;
  };
  // The block holding `page`. REQUIRES: CheckPage(page).ok().
  std::pair<PageAddr, uint64_t> BlockOf(PageAddr page) const;
  // The block holding `page`, mapped here (as ReadForCopy maps it), when
  // all of it is in the memfd and no transfer holds a view of it; nullopt
  // when not (a hole in it, a page received in place), when the page is
  // retained, or without PageStoreOptions::map_for_copies (a hugetlb
  // store's block is its page, mapped here since it was filled). Only the
  // owner's thread calls it. REQUIRES: CheckPage(page).ok().
  std::optional<Block> MapBlock(PageAddr page);
  // `fn(first, bytes)` runs before the pages of [first, first + bytes) may
  // stop being the memfd's pages under this mapping: before every punch
  // (Discard, Stash, Retain, DiscardAll, a write that detaches a transfer's
  // view) and before a transfer takes a view of a page (which may later
  // punch or replace it without a word here). Whoever registered a block
  // there must unregister it first. One listener; an empty fn removes it.
  void SetUnpinListener(std::function<void(PageAddr, uint64_t)> fn) { on_unpin_ = std::move(fn); }

  // The daemon's own view of the page in the memfd, which the daemon's
  // Access calls read and write through. Touching a hole makes it present.
  // Transfers' views of the page are detached first (see below).
  // REQUIRES: CheckPage(page).ok() and the page is not retained.
  std::span<uint8_t> MappedPage(PageAddr page);

  // Zero-copy transfers (node/memory/page_views.h): pages UCX reads from or
  // writes into in the memfd itself. Every call here that writes or punches
  // a page, and MappedPage, first detaches its views, so a transfer never
  // sees the page change under it; a page written while a transfer held it
  // gets a fresh page. A page received in place is present (in the memfd)
  // while it arrives, before it is installed. None of this is for the GPU
  // tier's copy threads.
  //
  // A read-only view of the page's bytes for a send; held until UCX is done
  // with them. Errors: kInvalidArgument; kFailedPrecondition (the page is
  // retained, not all of it is in the memfd, or it is being received in
  // place); kIoError.
  Result<std::shared_ptr<const uint8_t>> LendForSend(PageAddr page);
  // A view to receive the page's bytes into, in place: the page must be a
  // hole, and not retained. Install what arrived with Adopt; a view dropped
  // without that leaves the page a hole again. Errors: kInvalidArgument;
  // kFailedPrecondition (retained, not a hole, or a view of it exists);
  // kIoError.
  Result<std::shared_ptr<uint8_t>> ReceiveInPlace(PageAddr page);
  // When `bytes` is the start of a view ReceiveInPlace gave for this page,
  // and nothing wrote or punched the page since: the page's bytes are now
  // those (as after WritePage) and the answer is true. Otherwise false, and
  // nothing changed: write the bytes with WritePage.
  bool Adopt(PageAddr page, const uint8_t* bytes);
  // False when `bytes` is a ReceiveInPlace view detached before its
  // transfer ended: drop what it holds (PageViews::Intact).
  bool ReceivedIntact(const uint8_t* bytes) const { return views_.Intact(bytes); }
  // Whether a transfer holds a view of the page. REQUIRES: CheckPage(page).ok().
  bool HasView(PageAddr page) const { return views_.Has(OffsetOf(page)); }
  size_t view_count() const { return views_.count(); }
  uint64_t views_detached() const { return views_.detached(); }

  // Punches the page out of the memfd (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE): the
  // kernel unmaps it from every process that maps the memfd, and the next
  // access there faults. Retained bytes are dropped too; stashes are not.
  // Errors: kInvalidArgument, kIoError.
  Status Discard(PageAddr page);
  // Discards every page, stashes and retained bytes included.
  Status DiscardAll();
  // True when every byte of the page is in the memfd's page cache. Errors:
  // kInvalidArgument, kIoError.
  Result<bool> IsPresent(PageAddr page) const;

  // Moves the page's bytes into stash (page, txn): copies them out, then
  // punches the page. Errors: kInvalidArgument, kAlreadyExists (that stash
  // exists), kResourceExhausted (max_stashes, for a page not retained),
  // kIoError.
  Status Stash(PageAddr page, TxnId txn);
  // Copies stash (page, txn) to `out` (page_size bytes), for a resend of the
  // bytes of a move. Errors: kInvalidArgument, kNotFound.
  Status ReadStash(PageAddr page, TxnId txn, std::span<uint8_t> out) const;
  // Makes stash (page, txn) the page's bytes in the memfd (as WritePage) and
  // frees the stash. Errors: kInvalidArgument, kNotFound, kIoError.
  Status InstallStash(PageAddr page, TxnId txn);
  // Frees stash (page, txn). Errors: kInvalidArgument, kNotFound.
  Status DropStash(PageAddr page, TxnId txn);
  bool HasStash(PageAddr page, TxnId txn) const { return stashes_.count({page, txn}) != 0; }
  size_t stash_count() const { return stashes_.size(); }

  // Moves the page's bytes aside and punches the page, so no local access
  // reaches it while they are kept. Idempotent. Errors: kInvalidArgument,
  // kIoError.
  Status Retain(PageAddr page);
  // Retain for `count` neighbouring pages from `first`, with one read and
  // one punch per run of pages not retained yet (of at most 16 MiB and
  // IOV_MAX pages), not one of each per page (a node's fence retains every
  // page its processes reach: Leases). On an error the runs before the
  // failing one stay retained. Errors: as Retain.
  Status RetainRange(PageAddr first, size_t count);
  // Writes retained bytes back into the memfd (as WritePage) and frees them;
  // nothing to do when the page is not retained. Errors: kInvalidArgument,
  // kIoError.
  Status Restore(PageAddr page);
  bool IsRetained(PageAddr page) const { return retained_.count(page) != 0; }
  // Bytes of memory the memfd holds now (its allocated blocks: pages
  // written or mapped, not holes). One fstat. Errors: kIoError.
  Result<uint64_t> ResidentBytes() const;
  size_t retained_count() const { return retained_.size(); }

  size_t side_count() const { return stashes_.size() + retained_.size(); }
  size_t max_stashes() const { return options_.max_stashes; }

 private:
  using Bytes = std::unique_ptr<uint8_t[]>;

  PageStore(PageAddr base, uint64_t size, uint32_t page_size, PageStoreOptions options, UniqueFd fd,
            uint8_t* map, bool hugetlb);

  uint8_t* MapOf(PageAddr page) const { return map_ + OffsetOf(page); }
  // Copies through the mapping. Reading or writing the memfd through this
  // process's mapping costs a page fault per 4 KiB the first time (about
  // 12 us on the project's 2-core VMs) but nothing after, and copies on
  // several threads run at once; pread and pwrite cost no fault but take
  // the page cache's locks per call, and pwrite the inode's (one writer at
  // a time). So the loop's single installs use pwrite, and the GPU tier's
  // copy threads map a page once (MADV_POPULATE_WRITE, one call for many
  // 4 KiB pages) and then copy through the mapping for as long as the page
  // stays in the memfd. mapped_[i] says page i is mapped here and all of
  // it is in the memfd: only then may a read go through the mapping, since
  // a read of a hole there would allocate it. Every punch clears it.
  // Null for hugetlb stores, which have no write(2) and always write
  // through the mapping, and without PageStoreOptions::map_for_copies.
  void SetMapped(PageAddr first, uint64_t count);
  void ClearMapped(PageAddr first, uint64_t bytes);
  // Maps the page here (and every page of its 2 MiB block when all of the
  // block is in the memfd). With `allocate`, a page with holes is mapped
  // too, which fills them with zeros. False when the page stays unmapped
  // (holes and !allocate, or the kernel refused).
  bool MapForCopies(PageAddr page, bool allocate);
  // mincore of [first, first + bytes): a byte per kernel page, bit 0 set
  // when the page is in the memfd. Errors: kIoError.
  Result<std::vector<unsigned char>> Residency(PageAddr first, uint64_t bytes) const;
  // Writes page_size bytes of `data` (zeros for nullptr) into the memfd.
  Status Fill(PageAddr page, const uint8_t* data);
  Status CheckSpan(PageAddr page, size_t bytes) const;
  Status Punch(PageAddr page) { return PunchBytes(page, page_size_); }
  Status PunchBytes(PageAddr first, uint64_t bytes);
  // The page's bytes copied into a new buffer (retained bytes are moved).
  Result<Bytes> TakeBytes(PageAddr page);
  Status CheckStashRoom() const;

  const PageAddr base_;
  const uint64_t size_;
  const uint32_t page_size_;
  const PageStoreOptions options_;
  UniqueFd fd_;
  uint8_t* const map_;
  const bool hugetlb_;
  std::map<std::pair<PageAddr, TxnId>, Bytes> stashes_;
  std::unordered_map<PageAddr, Bytes> retained_;
  // One flag per page (see IsMapped); atomic since copy threads set the
  // flags of a block's other pages while others copy them.
  std::unique_ptr<std::atomic<uint8_t>[]> mapped_;
  // Set when the kernel refused MADV_POPULATE_WRITE as unknown (before
  // 5.14): copies keep to pread and pwrite without asking again.
  std::atomic<bool> populate_refused_{false};
  std::function<void(PageAddr, uint64_t)> on_unpin_;
  // Declared last: closed before fd_ is.
  PageViews views_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_PAGE_STORE_H_
