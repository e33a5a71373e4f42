// PageViews: single pages of a region's memfd mapped on their own, so that
// UCX sends a page straight from the memfd and receives one straight into
// it, with no copy on either side (PageStore::LendForSend and
// PageStore::ReceiveInPlace say when).
//
// A view is a mapping of one page made for one transfer and unmapped when
// the last reference to its bytes goes. UCX may read or write it long after
// the call that started the transfer, while the daemon goes on changing the
// store, so the store must never change a page under a view. Instead, every
// call that would write or punch a page first *detaches* the page's views:
// each view's bytes are copied into private memory that replaces the view
// at the same address (mremap). A send then carries the page as it was
// when it was detached, and a receive goes on into memory no one else
// sees; neither can fault a punched page back into the memfd. In the
// protocol's normal course nothing detaches: a page sent for a Fetch stays
// as it is until the requester has it, and a page received in place is
// Invalid here, so nothing else writes it. Detaching is for what the
// protocol does not order (a lease's fence, a region emptied at once).
//
// A view also keeps the memfd alive by itself, so a region closed while a
// transfer is in flight is no danger to UCX.
//
// A page received in place is present in the memfd from the moment its
// view is made, though the coherence agent may never install it (a stale
// or refused transfer). Unless the store adopted it (Adopt), the page is
// punched again when its view goes: it is present only while it arrives.
//
// At most one view per page receives, and then none reads: views of one
// page are either readers only or one writer.
//
// Thread safety: none. One thread (the daemon's loop) takes, detaches and
// drops views; UCX calls back on that thread.
#ifndef DSVM_NODE_MEMORY_PAGE_VIEWS_H_
#define DSVM_NODE_MEMORY_PAGE_VIEWS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "proto/status.h"

namespace dsvm::node {

class PageViews {
 public:
  // Views of pages of `page_size` bytes of the memfd `fd`, which the
  // caller keeps open until Close().
  PageViews(int fd, uint32_t page_size);
  ~PageViews();  // Close()
  PageViews(const PageViews&) = delete;
  PageViews& operator=(const PageViews&) = delete;

  // A read-only view of the page at `offset`, which must be present (all
  // of it in the memfd: mapping a hole would allocate it). Errors:
  // kFailedPrecondition (a view receives into the page), kIoError (mmap).
  Result<std::shared_ptr<const uint8_t>> MapForSend(uint64_t offset);
  // A writable view of the page at `offset`, which must be a hole; it is
  // allocated (zeroed) now, not inside the transfer. Errors:
  // kFailedPrecondition (the page has a view), kIoError (mmap).
  Result<std::shared_ptr<uint8_t>> MapForReceive(uint64_t offset);
  // True when `bytes` is the start of a receiving view of the page at
  // `offset` that was never detached: its bytes are the memfd's page, and
  // from now on the page stays present when the view goes.
  bool Adopt(uint64_t offset, const uint8_t* bytes);
  // Detaches every view of the pages in [offset, offset + bytes). True
  // when there was one.
  bool Detach(uint64_t offset, uint64_t bytes);
  // False when `bytes` is a receiving view detached before its transfer
  // ended (and not yet dropped): a peer or a NIC writing into the page
  // meanwhile may have missed the copy, so its bytes are not to be used.
  bool Intact(const uint8_t* bytes) const;
  // Whether the page at `offset` has a view (not detached).
  bool Has(uint64_t offset) const;
  // The memfd is the caller's no more (it is about to close it): views
  // dropped later punch nothing. Views still held keep the memfd and their
  // pages until they go (a receive in flight ends in a memfd no one uses).
  void Close();

  bool empty() const;
  size_t count() const;
  uint64_t detached() const;  // views detached so far

 private:
  struct View;
  struct Registry;
  std::shared_ptr<Registry> registry_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_PAGE_VIEWS_H_
