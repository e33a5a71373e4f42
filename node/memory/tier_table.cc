#include "node/memory/tier_table.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <string>
#include <unordered_set>
#include <utility>

namespace dsvm::node {
namespace {

bool ValidPageSize(uint32_t s) { return s == 4096 || s == (64u << 10) || s == (2u << 20); }

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

Result<std::unique_ptr<TierTable>> TierTable::Create(TierTableOptions options) {
  if (options.aging_period == 0) return InvalidArgument("tier table: aging_period must be > 0");
  return std::unique_ptr<TierTable>(new TierTable(std::move(options)));
}

TierTable::TierTable(TierTableOptions options) : options_(std::move(options)) {}

Result<int> TierTable::AddPool(uint32_t gpu, PageAddr base, uint64_t capacity_slots) {
  if (regions_.count(base) == 0) return NotFound("tier table: no region at " + Hex(base));
  if (pool_index_.count({gpu, base}) != 0) {
    return AlreadyExists("tier table: region " + Hex(base) + " has a pool on gpu " +
                         std::to_string(gpu));
  }
  Pool p;
  p.gpu = gpu;
  p.region = base;
  p.capacity_slots = capacity_slots;
  pools_.push_back(std::move(p));
  const int index = static_cast<int>(pools_.size() - 1);
  pool_index_[{gpu, base}] = index;
  return index;
}

Status TierTable::AddRegion(PageAddr base, uint64_t size, uint32_t page_size) {
  if (!ValidPageSize(page_size)) {
    return InvalidArgument("tier table: page size " + std::to_string(page_size) + " is not valid");
  }
  if (size == 0 || base % page_size != 0 || size % page_size != 0 || base + size < base) {
    return InvalidArgument("tier table: region " + Hex(base) + " + " + Hex(size) +
                           " is not a range of whole pages of " + std::to_string(page_size));
  }
  auto next = regions_.lower_bound(base);
  if (next != regions_.end() && next->first < base + size) {
    return AlreadyExists("tier table: region " + Hex(base) + " overlaps region " +
                         Hex(next->first));
  }
  if (next != regions_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.size > base) {
      return AlreadyExists("tier table: region " + Hex(base) + " overlaps region " +
                           Hex(prev->first));
    }
  }
  regions_.emplace(base, Region{size, page_size});
  return Status::Ok();
}

Status TierTable::RemoveRegion(PageAddr base, TierSteps* out) {
  auto it = regions_.find(base);
  if (it == regions_.end()) return NotFound("tier table: no region at " + Hex(base));
  const uint64_t end = base + it->second.size;
  // Collect first: Drop erases from pages_. Sorted, so the steps are
  // deterministic whatever the hash order.
  std::vector<PageAddr> held;
  for (const auto& [page, e] : pages_) {
    if (page >= base && page < end) held.push_back(page);
  }
  std::sort(held.begin(), held.end());
  for (PageAddr page : held) Drop(page, out).IgnoreError();  // checked: pages of the region
  regions_.erase(it);
  for (auto p = pool_index_.begin(); p != pool_index_.end();) {
    if (p->first.second == base) {
      pools_[p->second].removed = true;
      p = pool_index_.erase(p);
    } else {
      ++p;
    }
  }
  return Status::Ok();
}

Result<uint32_t> TierTable::CheckPage(PageAddr page) const {
  DSVM_ASSIGN_OR_RETURN(const Location where, Locate(page));
  return where.page_size;
}

Result<TierTable::Location> TierTable::Locate(PageAddr page) const {
  auto it = regions_.upper_bound(page);
  if (it == regions_.begin())
    return InvalidArgument("tier table: " + Hex(page) + " is in no region");
  --it;
  if (page - it->first >= it->second.size) {
    return InvalidArgument("tier table: " + Hex(page) + " is in no region");
  }
  if ((page - it->first) % it->second.page_size != 0) {
    return InvalidArgument("tier table: " + Hex(page) + " is not the start of a page of region " +
                           Hex(it->first));
  }
  return Location{it->first, it->second.page_size};
}

void TierTable::Advance(uint64_t tick) {
  DSVM_CHECK_MSG(tick >= tick_, "tier table: ticks must not decrease");
  tick_ = tick;
  const uint64_t epoch = tick / options_.aging_period;
  if (epoch == epoch_) return;
  const uint64_t shift = std::min<uint64_t>(epoch - epoch_, 32);
  epoch_ = epoch;
  for (Pool& p : pools_) p.evictable.clear();
  host_only_.clear();
  for (auto& [page, e] : pages_) {
    e.count = shift >= 32 ? 0 : e.count >> shift;
    if (std::set<Key>* s = SetOf(e)) s->insert(KeyOf(page, e));
  }
}

std::set<TierTable::Key>* TierTable::SetOf(const Entry& e) {
  if (e.pins != 0 || e.leaving) return nullptr;
  return e.pool < 0 ? &host_only_ : &pools_[e.pool].evictable;
}

void TierTable::Link(PageAddr page, Entry& e) {
  if (std::set<Key>* s = SetOf(e)) s->insert(KeyOf(page, e));
}

void TierTable::Unlink(PageAddr page, Entry& e) {
  if (std::set<Key>* s = SetOf(e)) s->erase(KeyOf(page, e));
}

void TierTable::Access(PageAddr page, Entry& e, uint64_t tick) {
  Unlink(page, e);
  if (e.count != std::numeric_limits<uint32_t>::max()) ++e.count;
  e.last_tick = tick;
  Link(page, e);
}

TierTable::Entry& TierTable::Admit(PageAddr page, uint32_t page_size) {
  Entry& e = pages_[page];
  e.page_size = page_size;
  host_bytes_ += page_size;
  Link(page, e);
  return e;
}

void TierTable::LeaveGpu(PageAddr page, Entry& e, bool write_back, TierSteps* out) {
  const uint32_t gpu = pools_[e.pool].gpu;
  if (e.dirty && write_back) {
    out->push_back({TierStepKind::kWriteBack, page, gpu});
    ++stats_.writebacks;
  }
  out->push_back({TierStepKind::kFreeSlot, page, gpu});
  --pools_[e.pool].used;
  e.pool = -1;
  e.dirty = false;
}

void TierTable::EvictOne(int pool, TierSteps* out) {
  std::set<Key>& s = pools_[pool].evictable;
  DSVM_CHECK(!s.empty());
  const PageAddr victim = std::get<2>(*s.begin());
  Entry& e = pages_.at(victim);
  Unlink(victim, e);
  if (!e.dirty) ++stats_.clean_evictions;
  ++stats_.evictions;
  LeaveGpu(victim, e, /*write_back=*/true, out);
  Link(victim, e);
}

void TierTable::FitHostBudget(TierSteps* out) {
  if (options_.host_budget_bytes == 0) return;
  while (host_bytes_ - leaving_bytes_ > options_.host_budget_bytes) {
    // Pages with no GPU copy first; then the coldest unpinned GPU copy.
    std::optional<Key> best;
    if (!host_only_.empty()) {
      best = *host_only_.begin();
    } else {
      for (const Pool& p : pools_) {
        if (!p.evictable.empty() && (!best || *p.evictable.begin() < *best)) {
          best = *p.evictable.begin();
        }
      }
    }
    if (!best) {
      ++stats_.host_over_budget;
      return;
    }
    const PageAddr page = std::get<2>(*best);
    Entry& e = pages_.at(page);
    Unlink(page, e);
    if (e.pool >= 0) LeaveGpu(page, e, /*write_back=*/true, out);
    e.leaving = true;
    leaving_bytes_ += e.page_size;
    out->push_back({TierStepKind::kLeaveNode, page, kNoGpu});
    ++stats_.leaves;
  }
}

Status TierTable::AddHostPage(PageAddr page, uint64_t tick, TierSteps* out) {
  DSVM_ASSIGN_OR_RETURN(const uint32_t page_size, CheckPage(page));
  auto it = pages_.find(page);
  if (it != pages_.end() && it->second.leaving) {
    return FailedPrecondition("tier table: page " + Hex(page) + " is leaving the node");
  }
  Advance(tick);
  Entry& e = it != pages_.end() ? it->second : Admit(page, page_size);
  Access(page, e, tick);
  // The page just installed is wanted now: never the one sent away.
  Unlink(page, e);
  ++e.pins;
  FitHostBudget(out);
  --e.pins;
  Link(page, e);
  return Status::Ok();
}

Status TierTable::CheckAdmissible(std::span<const PageAddr> pages, uint32_t gpu) const {
  std::vector<int> pool_of;
  std::vector<uint64_t> needed, kept;
  return CheckAdmissible(pages, gpu, &pool_of, &needed, &kept);
}

Status TierTable::CheckAdmissible(std::span<const PageAddr> pages, uint32_t gpu,
                                  std::vector<int>* pool_of, std::vector<uint64_t>* needed,
                                  std::vector<uint64_t>* kept) const {
  std::unordered_set<PageAddr> seen;
  pool_of->assign(pages.size(), -1);
  needed->assign(pools_.size(), 0);
  kept->assign(pools_.size(), 0);
  for (size_t i = 0; i < pages.size(); ++i) {
    const PageAddr page = pages[i];
    DSVM_ASSIGN_OR_RETURN(const Location where, Locate(page));
    if (!seen.insert(page).second) {
      return InvalidArgument("tier table: page " + Hex(page) + " listed twice");
    }
    const int pool = PoolIndex(gpu, where.base);
    if (pool < 0) {
      return InvalidArgument("tier table: no pool for gpu " + std::to_string(gpu) +
                             " and region " + Hex(where.base));
    }
    (*pool_of)[i] = pool;
    auto it = pages_.find(page);
    if (it == pages_.end()) {
      ++(*needed)[pool];
      continue;
    }
    const Entry& e = it->second;
    if (e.leaving)
      return FailedPrecondition("tier table: page " + Hex(page) + " is leaving the node");
    if (e.pool == pool) {
      if (e.pins == 0) ++(*kept)[pool];
      continue;
    }
    if (e.pool >= 0 && e.pins != 0) {
      return FailedPrecondition("tier table: page " + Hex(page) + " is pinned on gpu " +
                                std::to_string(pools_[e.pool].gpu));
    }
    ++(*needed)[pool];
  }
  return Status::Ok();
}

Status TierTable::MakeResident(std::span<const PageAddr> pages, uint32_t gpu, bool for_write,
                               bool pin, uint64_t tick, TierSteps* out) {
  // Validate everything before changing anything.
  std::vector<int> pool_of;
  // Per pool: slots this call needs, and its resident pages it will pin.
  std::vector<uint64_t> needed, kept;
  DSVM_RETURN_IF_ERROR(CheckAdmissible(pages, gpu, &pool_of, &needed, &kept));
  for (size_t p = 0; p < pools_.size(); ++p) {
    if (needed[p] == 0) continue;
    const Pool& pool = pools_[p];
    const uint64_t free = pool.capacity_slots > pool.used ? pool.capacity_slots - pool.used : 0;
    const uint64_t room = free + pool.evictable.size() - kept[p];
    if (needed[p] > room) {
      return ResourceExhausted(
          "tier table: gpu " + std::to_string(pool.gpu) + " needs " + std::to_string(needed[p]) +
          " slots for region " + Hex(pool.region) + ", has room for " + std::to_string(room) +
          " (capacity " + std::to_string(pool.capacity_slots) + "; the rest are pinned)");
    }
  }

  Advance(tick);
  // Admit and pin the whole batch first, so that no page of it is chosen as
  // a victim for another; unpin at the end unless asked to keep the pins.
  std::vector<Entry*> entries(pages.size());
  for (size_t i = 0; i < pages.size(); ++i) {
    const PageAddr page = pages[i];
    auto it = pages_.find(page);
    Entry& e = it != pages_.end() ? it->second : Admit(page, PageSizeOf(page));
    Unlink(page, e);
    ++e.pins;
    entries[i] = &e;
  }
  for (size_t i = 0; i < pages.size(); ++i) {
    const PageAddr page = pages[i];
    Entry& e = *entries[i];
    const int pool = pool_of[i];
    if (e.pool == pool) {
      ++stats_.hits;
    } else {
      ++stats_.misses;
      if (e.pool >= 0) {
        ++stats_.moves;
        LeaveGpu(page, e, /*write_back=*/true, out);
      }
      if (pools_[pool].used >= pools_[pool].capacity_slots) EvictOne(pool, out);
      out->push_back({TierStepKind::kAllocateSlot, page, gpu});
      out->push_back({TierStepKind::kCopyToDevice, page, gpu});
      ++stats_.copies_to_device;
      ++pools_[pool].used;
      e.pool = pool;
    }
    if (for_write) e.dirty = true;
    if (e.count != std::numeric_limits<uint32_t>::max()) ++e.count;
    e.last_tick = tick;
  }
  // While the batch is still pinned: none of it is sent away.
  FitHostBudget(out);
  for (size_t i = 0; i < pages.size(); ++i) {
    Entry& e = *entries[i];
    if (!pin) --e.pins;
    Link(pages[i], e);
  }
  return Status::Ok();
}

Status TierTable::EvictFromGpu(PageAddr page, TierSteps* out) {
  DSVM_RETURN_IF_ERROR(CheckPage(page).status());
  auto it = pages_.find(page);
  if (it == pages_.end() || it->second.pool < 0 || it->second.pins != 0 || it->second.leaving) {
    return FailedPrecondition("tier table: page " + Hex(page) +
                              " is not an unpinned GPU copy that may be evicted");
  }
  Entry& e = it->second;
  Unlink(page, e);
  if (!e.dirty) ++stats_.clean_evictions;
  ++stats_.evictions;
  LeaveGpu(page, e, /*write_back=*/true, out);
  Link(page, e);
  return Status::Ok();
}

Status TierTable::Unpin(PageAddr page) {
  DSVM_RETURN_IF_ERROR(CheckPage(page).status());
  auto it = pages_.find(page);
  if (it == pages_.end() || it->second.pins == 0) {
    return FailedPrecondition("tier table: page " + Hex(page) + " is not pinned");
  }
  Entry& e = it->second;
  Unlink(page, e);
  --e.pins;
  Link(page, e);
  return Status::Ok();
}

Status TierTable::Touch(PageAddr page, uint64_t tick) {
  DSVM_RETURN_IF_ERROR(CheckPage(page).status());
  auto it = pages_.find(page);
  if (it == pages_.end()) return NotFound("tier table: page " + Hex(page) + " is not held");
  Advance(tick);
  Access(page, it->second, tick);
  return Status::Ok();
}

Status TierTable::PrepareHostRead(PageAddr page, TierSteps* out) {
  DSVM_RETURN_IF_ERROR(CheckPage(page).status());
  auto it = pages_.find(page);
  if (it == pages_.end()) return Status::Ok();
  Entry& e = it->second;
  if (e.pool >= 0 && e.dirty) {
    out->push_back({TierStepKind::kWriteBack, page, pools_[e.pool].gpu});
    ++stats_.writebacks;
    e.dirty = false;  // not part of the key: no relink
  }
  return Status::Ok();
}

Status TierTable::Drop(PageAddr page, TierSteps* out) {
  DSVM_RETURN_IF_ERROR(CheckPage(page).status());
  auto it = pages_.find(page);
  if (it == pages_.end()) return Status::Ok();
  Entry& e = it->second;
  Unlink(page, e);
  if (e.pool >= 0) LeaveGpu(page, e, /*write_back=*/false, out);
  host_bytes_ -= e.page_size;
  if (e.leaving) leaving_bytes_ -= e.page_size;
  ++stats_.drops;
  pages_.erase(it);
  return Status::Ok();
}

Status TierTable::DropHoldingSlot(PageAddr page, TierSteps* out) {
  DSVM_RETURN_IF_ERROR(CheckPage(page).status());
  auto it = pages_.find(page);
  if (it == pages_.end() || it->second.pool < 0) {
    return FailedPrecondition("tier table: page " + Hex(page) + " is on no GPU");
  }
  const int pool = it->second.pool;
  TierSteps steps;
  DSVM_RETURN_IF_ERROR(Drop(page, &steps));
  for (const TierStep& s : steps) {
    if (!(s.kind == TierStepKind::kFreeSlot && s.page == page)) out->push_back(s);
  }
  ++pools_[pool].used;  // Drop gave it back; the caller keeps it
  ++pools_[pool].held;
  return Status::Ok();
}

Status TierTable::HoldFreeSlots(int pool, uint64_t n) {
  if (pool < 0 || static_cast<size_t>(pool) >= pools_.size() || pools_[pool].removed) {
    return InvalidArgument("tier table: no pool " + std::to_string(pool));
  }
  Pool& p = pools_[pool];
  const uint64_t free = p.capacity_slots > p.used ? p.capacity_slots - p.used : 0;
  if (free < n) {
    return ResourceExhausted("tier table: " + std::to_string(n) + " slots asked of gpu " +
                             std::to_string(p.gpu) + " for region " + Hex(p.region) + ", " +
                             std::to_string(free) + " free");
  }
  p.used += n;
  p.held += n;
  return Status::Ok();
}

Status TierTable::ReleaseHeldSlot(int pool) {
  if (pool < 0 || static_cast<size_t>(pool) >= pools_.size()) {
    return InvalidArgument("tier table: no pool " + std::to_string(pool));
  }
  if (pools_[pool].held == 0) {
    return FailedPrecondition("tier table: no slot held in pool " + std::to_string(pool) +
                              " (gpu " + std::to_string(pools_[pool].gpu) + ", region " +
                              Hex(pools_[pool].region) + ")");
  }
  --pools_[pool].held;
  --pools_[pool].used;
  return Status::Ok();
}

Status TierTable::SetCapacity(int pool, uint64_t slots) {
  if (pool < 0 || static_cast<size_t>(pool) >= pools_.size()) {
    return InvalidArgument("tier table: no pool " + std::to_string(pool));
  }
  if (slots < pools_[pool].used) {
    return FailedPrecondition("tier table: a capacity of " + std::to_string(slots) +
                              " slots is below the " + std::to_string(pools_[pool].used) +
                              " in use");
  }
  pools_[pool].capacity_slots = slots;
  return Status::Ok();
}

Status TierTable::KeepOnNode(PageAddr page) {
  DSVM_RETURN_IF_ERROR(CheckPage(page).status());
  auto it = pages_.find(page);
  if (it == pages_.end() || !it->second.leaving) {
    return FailedPrecondition("tier table: page " + Hex(page) + " is not leaving the node");
  }
  Entry& e = it->second;
  e.leaving = false;
  leaving_bytes_ -= e.page_size;
  Link(page, e);
  return Status::Ok();
}

Status TierTable::Unplace(PageAddr page, uint32_t unpins) {
  DSVM_RETURN_IF_ERROR(CheckPage(page).status());
  auto it = pages_.find(page);
  if (it == pages_.end() || it->second.pool < 0) {
    return FailedPrecondition("tier table: page " + Hex(page) + " is on no gpu");
  }
  Entry& e = it->second;
  if (e.pins < unpins) {
    return FailedPrecondition("tier table: page " + Hex(page) + " has fewer than " +
                              std::to_string(unpins) + " pins");
  }
  Unlink(page, e);
  e.pins -= unpins;
  --pools_[e.pool].used;
  e.pool = -1;
  e.dirty = false;
  Link(page, e);
  return Status::Ok();
}

Status TierTable::KeepDirtyOnGpu(PageAddr page, uint32_t gpu) {
  DSVM_ASSIGN_OR_RETURN(const Location loc, Locate(page));
  const int pool = PoolIndex(gpu, loc.base);
  if (pool < 0) {
    return InvalidArgument("tier table: no pool on gpu " + std::to_string(gpu) + " for page " +
                           Hex(page));
  }
  auto it = pages_.find(page);
  if (it == pages_.end()) {
    return FailedPrecondition("tier table: page " + Hex(page) + " is not held");
  }
  Entry& e = it->second;
  if (e.pool >= 0 && e.pool != pool) {
    return FailedPrecondition("tier table: page " + Hex(page) + " is on gpu " +
                              std::to_string(pools_[e.pool].gpu));
  }
  Unlink(page, e);
  if (e.leaving) {
    e.leaving = false;
    leaving_bytes_ -= e.page_size;
  }
  if (e.pool < 0) {
    e.pool = pool;
    ++pools_[pool].used;
  }
  e.dirty = true;
  Link(page, e);
  return Status::Ok();
}

std::optional<uint32_t> TierTable::GpuOf(PageAddr page) const {
  auto it = pages_.find(page);
  if (it == pages_.end() || it->second.pool < 0) return std::nullopt;
  return pools_[it->second.pool].gpu;
}

bool TierTable::IsDirty(PageAddr page) const {
  auto it = pages_.find(page);
  return it != pages_.end() && it->second.dirty;
}

uint32_t TierTable::PinsOf(PageAddr page) const {
  auto it = pages_.find(page);
  return it == pages_.end() ? 0 : it->second.pins;
}

bool TierTable::IsLeaving(PageAddr page) const {
  auto it = pages_.find(page);
  return it != pages_.end() && it->second.leaving;
}

uint32_t TierTable::AccessCount(PageAddr page) const {
  auto it = pages_.find(page);
  return it == pages_.end() ? 0 : it->second.count;
}

std::pair<uint32_t, uint64_t> TierTable::HeatOf(PageAddr page) const {
  auto it = pages_.find(page);
  if (it == pages_.end()) return {0, 0};
  return {it->second.count, it->second.last_tick};
}

uint32_t TierTable::PageSizeOf(PageAddr page) const {
  auto r = CheckPage(page);
  return r.ok() ? *r : 0;
}

int TierTable::PoolIndex(uint32_t gpu, PageAddr base) const {
  auto it = pool_index_.find({gpu, base});
  return it == pool_index_.end() ? -1 : it->second;
}

}  // namespace dsvm::node
