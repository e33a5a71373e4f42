#include "node/daemon/node_daemon.h"

#include <algorithm>
#include <string>

#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {

namespace {

// Accesses one prefetch keeps in flight: 256 pages (past that, 4 KiB scans
// measured no faster), but at most 16 MiB, so
// that a window of large pages arrives well within the retransmit time.
constexpr uint32_t kPrefetchWindow = 256;
constexpr uint64_t kPrefetchWindowBytes = 16u << 20;

// Pages a read fault on read-mostly pages fetches after its own.
constexpr uint32_t kReadAhead = 16;

// Sequential read-ahead (any page, no advice needed): the first window is
// 64 KiB, each sequential miss doubles it up to 1 MiB (and at most 16 MiB
// of large pages), like the kernel's read-ahead for files.
constexpr uint64_t kSequentialFirstBytes = 64u << 10;
constexpr uint64_t kSequentialMaxPages = 256;

}  // namespace

// ---------------------------------------------------------------------------
// Prefetch and advice

Status NodeDaemon::CheckClientRange(proto::PageAddr address, uint64_t length,
                                    proto::PageAddr* first, proto::PageAddr* end,
                                    uint32_t* page_size) {
  if (length == 0) return InvalidArgument("empty range at " + Hex(address));
  PageStore* store = StoreOf(address);
  if (store == nullptr) return NotFound("no region open on this node at " + Hex(address));
  const uint64_t left = store->base() + store->size() - address;
  if (length > left) {
    return InvalidArgument(std::to_string(length) + " bytes from " + Hex(address) +
                           " run past the end of the region at " + Hex(store->base() + store->size()));
  }
  const uint64_t ps = store->page_size();
  *first = store->base() + (address - store->base()) / ps * ps;
  *end = store->base() + (address + length - store->base() + ps - 1) / ps * ps;
  *page_size = static_cast<uint32_t>(ps);
  return Status::Ok();
}

void NodeDaemon::StartPrefetch(Prefetch p) {
  const uint64_t id = ++next_prefetch_;
  prefetches_.emplace(id, std::move(p));
  PumpPrefetch(id);
}

void NodeDaemon::PumpPrefetch(uint64_t id) {
  auto it = prefetches_.find(id);
  if (it == prefetches_.end()) return;
  Prefetch& p = it->second;  // stable: only this function erases jobs
  p.pumping = true;
  const uint32_t window = static_cast<uint32_t>(
      std::clamp<uint64_t>(kPrefetchWindowBytes / p.page_size, 1, kPrefetchWindow));
  while (p.in_flight < window && p.next < p.end && p.error.ok()) {
    const proto::PageAddr page = p.next;
    p.next += p.page_size;
    ++p.in_flight;
    AccessPage(page, p.write, [this, id](Status st, std::span<uint8_t>) {
      Prefetch& q = prefetches_.at(id);
      --q.in_flight;
      if (!st.ok() && q.error.ok()) q.error = st;
      if (!q.pumping) PumpPrefetch(id);  // answered later than the call
    }, true);
  }
  p.pumping = false;
  if (p.in_flight > 0 || (p.next < p.end && p.error.ok())) return;
  if (p.done) {
    std::function<void(Status)> done = std::move(p.done);
    Status error = p.error;
    prefetches_.erase(it);
    done(error);
    return;
  }
  if (p.client_fd >= 0 && IsClient(p.client_fd, p.client_serial)) {
    ReplyToClient(p.client_fd, p.client_request, proto::ToReply(p.error));
  }
  prefetches_.erase(it);
}

Status NodeDaemon::SetAdvice(const proto::Advise& m) {
  if (m.advice == proto::Advice::kPreferredGpu || m.advice == proto::Advice::kAccessedBy) {
    return SetGpuAdvice(m);
  }
  const bool names_node = m.advice == proto::Advice::kPreferredNode;
  if (!names_node && m.node != proto::kNoNode) {
    return InvalidArgument("advice " + std::to_string(static_cast<int>(m.advice)) +
                           " names no node, but node " + std::to_string(m.node) + " was given");
  }
  if (names_node && m.node == proto::kNoNode) {
    return InvalidArgument("preferred-node advice needs a node (0 was given)");
  }
  proto::PageAddr first, end;
  uint32_t ps;
  DSVM_RETURN_IF_ERROR(CheckClientRange(m.address, m.length, &first, &end, &ps));
  PageStore* store = StoreOf(first);
  std::vector<proto::NodeId>& preferred = preferred_[store->base()];
  if (preferred.empty()) preferred.assign(store->size() / ps, proto::kNoNode);
  if (names_node || m.advice == proto::Advice::kNormal) {
    for (proto::PageAddr p = first; p < end; p += ps) preferred[store->IndexOf(p)] = m.node;
  }
  if (m.advice == proto::Advice::kNormal) {  // ends GPU advice too
    for (auto* gpu_advice : {&preferred_gpu_, &accessed_by_}) {
      if (auto it = gpu_advice->find(store->base()); it != gpu_advice->end()) {
        for (proto::PageAddr p = first; p < end; p += ps) it->second[store->IndexOf(p)] = kNoGpuAdvice;
      }
    }
  }
  if (names_node) return Status::Ok();
  // Normal or read-mostly: the per-page read advice.
  std::vector<proto::Advice>& per_page = advice_[store->base()];
  if (per_page.empty()) per_page.assign(store->size() / ps, proto::Advice::kNormal);
  for (proto::PageAddr p = first; p < end; p += ps) per_page[store->IndexOf(p)] = m.advice;
  return Status::Ok();
}

Status NodeDaemon::SetGpuAdvice(const proto::Advise& m) {
  if (!tier_) {
    return FailedPrecondition("GPU advice, but this node has no GPU tier: dsvm-node runs with "
                              "--device-backend none");
  }
  if (m.node >= device_->device_count()) {
    return InvalidArgument("gpu " + std::to_string(m.node) + " does not exist: this node has " +
                           std::to_string(device_->device_count()) + " (" +
                           std::string(device_->name()) + ")");
  }
  proto::PageAddr first, end;
  uint32_t ps;
  DSVM_RETURN_IF_ERROR(CheckClientRange(m.address, m.length, &first, &end, &ps));
  PageStore* store = StoreOf(first);
  const bool accessed_by = m.advice == proto::Advice::kAccessedBy;
  std::vector<uint32_t>& gpu_of = (accessed_by ? accessed_by_ : preferred_gpu_)[store->base()];
  if (gpu_of.empty()) gpu_of.assign(store->size() / ps, kNoGpuAdvice);
  if (accessed_by) {  // takes effect at the next map
    for (proto::PageAddr p = first; p < end; p += ps) gpu_of[store->IndexOf(p)] = m.node;
    return Status::Ok();
  }
  std::vector<proto::PageAddr> valid;
  for (proto::PageAddr p = first; p < end; p += ps) {
    gpu_of[store->IndexOf(p)] = m.node;
    if (agent_.StateOf(p) != PageState::kInvalid && !agent_.HasPending(p)) valid.push_back(p);
  }
  PlaceOnPreferredGpu(std::move(valid));
  LeavePages();  // admitting them may have gone past the host budget
  return Status::Ok();
}

bool NodeDaemon::AllReadMostly(std::span<const proto::PageAddr> pages) const {
  if (pages.empty()) return false;
  PageStore* store = StoreOf(pages.front());
  if (store == nullptr) return false;
  auto it = advice_.find(store->base());
  if (it == advice_.end()) return false;
  for (proto::PageAddr p : pages) {
    if (it->second[store->IndexOf(p)] != proto::Advice::kReadMostly) return false;
  }
  return true;
}

uint32_t NodeDaemon::PreferredGpuOf(proto::PageAddr page) const {
  return GpuAdviceOf(preferred_gpu_, page);
}

uint32_t NodeDaemon::GpuAdviceOf(const std::map<proto::PageAddr, std::vector<uint32_t>>& advice,
                                 proto::PageAddr page) const {
  auto it = advice.upper_bound(page);
  if (it == advice.begin()) return kNoGpuAdvice;
  --it;
  auto s = stores_.find(it->first);
  if (s == stores_.end() || page >= it->first + s->second->size()) return kNoGpuAdvice;
  return it->second[s->second->IndexOf(page)];
}

void NodeDaemon::PlaceOnPreferredGpu(std::vector<proto::PageAddr> pages) {
  if (!tier_ || pages.empty()) return;
  PageStore* store = StoreOf(pages.front());
  if (store == nullptr) return;
  // Per GPU, in chunks: one that does not fit is left on the host.
  std::map<uint32_t, std::vector<proto::PageAddr>> by_gpu;
  for (proto::PageAddr p : pages) {
    const uint32_t gpu = PreferredGpuOf(p);
    // Not pages a gpu map holds, nor those it pinned elsewhere.
    if (gpu != kNoGpuAdvice && gpu_pins_.count(p) == 0 && !tier_->table().IsLeaving(p)) {
      by_gpu[gpu].push_back(p);
    }
  }
  constexpr size_t kChunk = 64;
  for (auto& [gpu, list] : by_gpu) {
    for (size_t i = 0; i < list.size(); i += kChunk) {
      std::span<const proto::PageAddr> chunk(list.data() + i, std::min(kChunk, list.size() - i));
      std::vector<proto::PageAddr> modified;
      for (proto::PageAddr p : chunk) {
        if (backend_) backend_->WriteBack(p).IgnoreError();  // kmod: its own copy to the store
        if (agent_.StateOf(p) == PageState::kModified) modified.push_back(p);
      }
      // A clean GPU copy of a page local processes may write is stale.
      if (!tier_->EvictCopies(modified).ok()) continue;
      Result<std::vector<DevicePtr>> placed =
          tier_->MakeResident(store->base(), chunk, gpu, /*for_write=*/false, NowMs());
      if (!placed.ok()) {
        LogLine(LogLevel::kDebug, "preferred GPU " + std::to_string(gpu) + ": " + placed.status().ToString());
        break;  // the budget is full: the rest stays on the host
      }
      tier_->Unpin(chunk).IgnoreError();  // pinned just above
      HideFromCpu(modified, /*writes_only=*/true);
      stats_.gpu_placed += chunk.size();
    }
  }
}

proto::NodeId NodeDaemon::PreferredNodeOf(proto::PageAddr page) {
  PageStore* store = StoreOf(page);
  if (store == nullptr) return proto::kNoNode;
  auto it = preferred_.find(store->base());
  return it == preferred_.end() ? proto::kNoNode : it->second[store->IndexOf(page)];
}

bool NodeDaemon::ReadAheadSequential(PageStore* store, proto::PageAddr page) {
  const uint64_t ps = store->page_size();
  ReadAheadState& ra = read_ahead_[store->base()];
  // Sequential: the page after the last miss, or a miss inside (or just
  // after) the window read ahead, which the reader has caught up with.
  const bool in_window = ra.pages > 0 && page >= ra.window_begin && page <= ra.window_end;
  const bool next = ra.last_miss != 0 && page == ra.last_miss + ps;
  ra.last_miss = page;
  if (!in_window && !next) {
    ra.pages = 0;
    return false;
  }
  const uint64_t max_pages =
      std::clamp<uint64_t>(kPrefetchWindowBytes / ps, 1, kSequentialMaxPages);
  const uint64_t first = std::clamp<uint64_t>(kSequentialFirstBytes / ps, 1, max_pages);
  ra.pages = in_window ? std::min(max_pages, ra.pages * 2) : first;
  const proto::PageAddr region_end = store->base() + store->size();
  const proto::PageAddr begin = std::max(page + ps, in_window ? ra.window_end : page + ps);
  const proto::PageAddr end = std::min(region_end, begin + ra.pages * ps);
  if (begin >= end) return true;
  ra.window_begin = begin;
  ra.window_end = end;
  Prefetch p;
  p.page_size = static_cast<uint32_t>(ps);
  p.next = begin;
  p.end = end;
  StartPrefetch(std::move(p));
  return true;
}

void NodeDaemon::ReadAhead(proto::PageAddr page) {
  PageStore* store = StoreOf(page);
  if (store == nullptr) return;
  if (ReadAheadSequential(store, page)) return;
  auto it = advice_.find(store->base());
  if (it == advice_.end()) return;
  const std::vector<proto::Advice>& per_page = it->second;
  const uint64_t index = store->IndexOf(page);
  if (per_page[index] != proto::Advice::kReadMostly) return;
  uint64_t last = index;  // the last read-mostly page of the read-ahead
  while (last + 1 < per_page.size() && last - index < kReadAhead &&
         per_page[last + 1] == proto::Advice::kReadMostly) {
    ++last;
  }
  if (last == index) return;
  Prefetch p;
  p.page_size = store->page_size();
  p.next = page + p.page_size;
  p.end = store->base() + (last + 1) * p.page_size;
  // The window counts as read ahead: a reader that goes on in order misses
  // next at its end, and the sequential read-ahead takes over from there
  // (doubling), rather than this fixed window hiding every such miss.
  ReadAheadState& ra = read_ahead_[store->base()];
  ra.window_begin = p.next;
  ra.window_end = p.end;
  ra.pages = last - index;
  StartPrefetch(std::move(p));
}

}  // namespace dsvm::node
