#include "node/memory/device_tier.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <unordered_set>
#include <utility>

namespace dsvm::node {
namespace {

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

Result<std::unique_ptr<DeviceTier>> DeviceTier::Create(DeviceBackend* backend,
                                                       std::vector<DevicePagePool*> pools,
                                                       DeviceTierOptions options) {
  if (backend == nullptr) return InvalidArgument("device tier: no backend");
  if (options.streams_per_gpu < 2) {
    return InvalidArgument(
        "device tier: streams_per_gpu must be at least 2 (copies overlap staging)");
  }
  if (options.batch_bytes == 0 || options.batch_bytes % 4096 != 0) {
    return InvalidArgument("device tier: batch_bytes must be a positive multiple of 4 KiB");
  }
  TierTableOptions t;
  t.host_budget_bytes = options.host_budget_bytes;
  t.aging_period = options.aging_period;
  for (DevicePagePool* p : pools) {
    if (p == nullptr) return InvalidArgument("device tier: a pool is null");
    if (p->page_size() > options.batch_bytes) {
      return InvalidArgument("device tier: batch_bytes " + std::to_string(options.batch_bytes) +
                             " is below the page size " + std::to_string(p->page_size()));
    }
    t.pools.push_back(TierPoolBudget{p->device(), p->page_size(), p->capacity_slots()});
  }
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<TierTable> table, TierTable::Create(std::move(t)));
  std::unique_ptr<DeviceTier> tier(
      new DeviceTier(backend, std::move(pools), options, std::move(table)));
  DSVM_RETURN_IF_ERROR(tier->Init());
  return tier;
}

DeviceTier::DeviceTier(DeviceBackend* backend, std::vector<DevicePagePool*> pools,
                       DeviceTierOptions options, std::unique_ptr<TierTable> table)
    : backend_(backend),
      pools_(std::move(pools)),
      options_(options),
      table_(std::move(table)),
      lanes_(backend->device_count()) {}

Status DeviceTier::Init() {
  for (DevicePagePool* p : pools_) {
    std::vector<Lane>& lanes = lanes_[p->device()];
    while (lanes.size() < options_.streams_per_gpu) {
      DSVM_ASSIGN_OR_RETURN(StreamId stream, backend_->CreateStream(p->device()));
      lanes.push_back(Lane{stream, {}, false, {}});  // the destructor destroys it on failure below
      DSVM_ASSIGN_OR_RETURN(lanes.back().staging, backend_->AllocateStaging(options_.batch_bytes));
    }
  }
  return Status::Ok();
}

DeviceTier::~DeviceTier() {
  for (std::vector<Lane>& lanes : lanes_) {
    for (Lane& lane : lanes) {
      // Both wait for queued copies first; errors here have no one to go to.
      backend_->DestroyStream(lane.stream).IgnoreError();
      if (lane.staging.data != nullptr) backend_->FreeStaging(lane.staging.data).IgnoreError();
    }
  }
  for (const auto& [page, placed] : slots_) placed.pool->Free(placed.slot).IgnoreError();
}

Status DeviceTier::AddRegion(PageStore* store) {
  if (store == nullptr) return InvalidArgument("device tier: no store");
  DSVM_RETURN_IF_ERROR(table_->AddRegion(store->base(), store->size(), store->page_size()));
  stores_[store->base()] = store;
  return Status::Ok();
}

Status DeviceTier::RemoveRegion(PageAddr base) {
  TierSteps steps;
  DSVM_RETURN_IF_ERROR(table_->RemoveRegion(base, &steps));
  Status s = Execute(steps, nullptr);  // frees only: cannot fail
  DSVM_CHECK_MSG(s.ok(), s.ToString());
  stores_.erase(base);
  return Status::Ok();
}

PageStore* DeviceTier::StoreOf(PageAddr page) const {
  auto it = stores_.upper_bound(page);
  if (it == stores_.begin()) return nullptr;
  --it;
  PageStore* s = it->second;
  return page - s->base() < s->size() ? s : nullptr;
}

DevicePagePool* DeviceTier::PoolOf(uint32_t gpu, uint32_t page_size) const {
  for (DevicePagePool* p : pools_) {
    if (p->device() == gpu && p->page_size() == page_size) return p;
  }
  return nullptr;
}

DevicePtr DeviceTier::SlotOf(PageAddr page) const {
  auto it = slots_.find(page);
  return it == slots_.end() ? 0 : it->second.slot.ptr;
}

Status DeviceTier::Fail(Status s) {
  if (failed_.ok()) failed_ = s;
  return s;
}

Result<std::vector<DevicePtr>> DeviceTier::MakeResident(PageAddr region,
                                                        std::span<const PageAddr> pages,
                                                        uint32_t gpu, bool for_write,
                                                        uint64_t tick) {
  if (!failed_.ok())
    return FailedPrecondition("device tier: failed earlier: " + failed_.ToString());
  auto it = stores_.find(region);
  if (it == stores_.end()) return InvalidArgument("device tier: no region at " + Hex(region));
  PageStore* store = it->second;
  for (PageAddr page : pages) DSVM_RETURN_IF_ERROR(store->CheckPage(page));
  if (gpu >= backend_->device_count() || PoolOf(gpu, store->page_size()) == nullptr) {
    return InvalidArgument("device tier: no pool for gpu " + std::to_string(gpu) +
                           " and page size " + std::to_string(store->page_size()));
  }
  TierSteps steps;
  DSVM_RETURN_IF_ERROR(table_->MakeResident(pages, gpu, for_write, /*pin=*/true, tick, &steps));
  std::vector<PageAddr> placed;
  Status s = Execute(steps, &placed);
  if (!s.ok()) {
    if (!failed_.ok()) return s;
    // Undo this call's new GPU copies and its pins; see the header.
    std::unordered_set<PageAddr> fresh;
    for (const TierStep& step : steps) {
      if (step.kind == TierStepKind::kAllocateSlot) fresh.insert(step.page);
    }
    for (PageAddr page : pages) {
      if (fresh.count(page) != 0) {
        if (slots_.count(page) != 0) FreeSlotOf(page);
        table_->Unplace(page, 1).IgnoreError();  // placed by this call, pinned once
      } else {
        table_->Unpin(page).IgnoreError();  // pinned by this call
      }
    }
    ++stats_.rollbacks;
    return s;
  }
  std::vector<DevicePtr> ptrs;
  ptrs.reserve(pages.size());
  for (PageAddr page : pages) ptrs.push_back(slots_.at(page).slot.ptr);
  return ptrs;
}

Status DeviceTier::CheckPages(std::span<const PageAddr> pages) const {
  for (PageAddr page : pages) {
    if (StoreOf(page) == nullptr || table_->PageSizeOf(page) == 0) {
      return InvalidArgument("device tier: " + Hex(page) + " is not a page of a region");
    }
  }
  return Status::Ok();
}

Status DeviceTier::Unpin(std::span<const PageAddr> pages) {
  for (PageAddr page : pages) DSVM_RETURN_IF_ERROR(table_->Unpin(page));
  return Status::Ok();
}

Status DeviceTier::WriteBack(std::span<const PageAddr> pages) {
  if (!failed_.ok())
    return FailedPrecondition("device tier: failed earlier: " + failed_.ToString());
  DSVM_RETURN_IF_ERROR(CheckPages(pages));
  TierSteps steps;
  for (PageAddr page : pages) DSVM_RETURN_IF_ERROR(table_->PrepareHostRead(page, &steps));
  return Execute(steps, nullptr);
}

Status DeviceTier::Drop(std::span<const PageAddr> pages) {
  DSVM_RETURN_IF_ERROR(CheckPages(pages));
  TierSteps steps;
  for (PageAddr page : pages) DSVM_RETURN_IF_ERROR(table_->Drop(page, &steps));
  return Execute(steps, nullptr);
}

std::vector<PageAddr> DeviceTier::TakePagesToLeave() {
  std::vector<PageAddr> out(leave_.begin(), leave_.end());
  leave_.clear();
  return out;
}

void DeviceTier::FreeSlotOf(PageAddr page) {
  auto it = slots_.find(page);
  DSVM_CHECK_MSG(it != slots_.end(), "device tier: no slot for " + Hex(page));
  Status s = it->second.pool->Free(it->second.slot);
  DSVM_CHECK_MSG(s.ok(), s.ToString());
  slots_.erase(it);
  ++stats_.slots_freed;
}

DevicePtr DeviceTier::ArenaEnd(const DevicePagePool* pool, DevicePtr ptr) {
  std::vector<std::pair<DevicePtr, DevicePtr>>& sorted = arenas_[pool];
  if (sorted.size() != pool->arena_count()) {
    sorted.clear();
    for (const DeviceArena& a : pool->arenas()) sorted.emplace_back(a.base, a.base + a.bytes);
    std::sort(sorted.begin(), sorted.end());
  }
  auto it = std::upper_bound(sorted.begin(), sorted.end(), std::make_pair(ptr, ~DevicePtr{0}));
  DSVM_CHECK(it != sorted.begin());
  --it;
  DSVM_CHECK(ptr >= it->first && ptr < it->second);
  return it->second;
}

Status DeviceTier::Execute(const TierSteps& steps, std::vector<PageAddr>* placed) {
  // Pages to leave are the table's decision already, whatever happens below.
  for (const TierStep& step : steps) {
    if (step.kind == TierStepKind::kLeaveNode) leave_.push_back(step.page);
  }
  auto move_of = [&](const TierStep& step) {
    PageStore* store = StoreOf(step.page);
    DSVM_CHECK(store != nullptr);
    auto it = slots_.find(step.page);
    DSVM_CHECK_MSG(it != slots_.end(), "device tier: no slot for " + Hex(step.page));
    const DevicePtr ptr = it->second.slot.ptr;
    return Move{step.page, store, ptr, store->page_size(), ArenaEnd(it->second.pool, ptr)};
  };
  // Staged in device address order, so that adjacent slots merge.
  auto by_address = [](const Move& a, const Move& b) { return a.ptr < b.ptr; };
  // 1. Write-backs, per GPU.
  std::map<uint32_t, std::vector<Move>> by_gpu;
  for (const TierStep& step : steps) {
    if (step.kind == TierStepKind::kWriteBack) by_gpu[step.gpu].push_back(move_of(step));
  }
  for (auto& [gpu, moves] : by_gpu) {
    std::sort(moves.begin(), moves.end(), by_address);
    Status s = WriteBackMoves(gpu, moves);
    if (!s.ok()) return Fail(std::move(s));
  }
  // 2. Slots freed, then taken.
  for (const TierStep& step : steps) {
    if (step.kind == TierStepKind::kFreeSlot) FreeSlotOf(step.page);
  }
  for (const TierStep& step : steps) {
    if (step.kind != TierStepKind::kAllocateSlot) continue;
    DevicePagePool* pool = PoolOf(step.gpu, table_->PageSizeOf(step.page));
    DSVM_CHECK(pool != nullptr);
    DSVM_ASSIGN_OR_RETURN(DeviceSlot slot, pool->Allocate());
    slots_[step.page] = Placed{pool, slot};
    if (placed != nullptr) placed->push_back(step.page);
  }
  // 3. Copies to the device, per GPU.
  by_gpu.clear();
  for (const TierStep& step : steps) {
    if (step.kind == TierStepKind::kCopyToDevice) by_gpu[step.gpu].push_back(move_of(step));
  }
  for (auto& [gpu, moves] : by_gpu) {
    std::sort(moves.begin(), moves.end(), by_address);
    DSVM_RETURN_IF_ERROR(CopyMovesToDevice(gpu, moves));
  }
  return Status::Ok();
}

Status DeviceTier::Drain(Lane& lane) {
  if (!lane.busy) return Status::Ok();
  lane.busy = false;
  return backend_->Wait(lane.fence);
}

Status DeviceTier::CopyMovesToDevice(uint32_t gpu, const std::vector<Move>& moves) {
  std::vector<Lane>& lanes = lanes_[gpu];
  DSVM_CHECK(lanes.size() >= 2);
  // On an error, wait for what was queued: the caller may free its slots.
  auto drain_all = [&](Status s) {
    for (Lane& lane : lanes) Drain(lane).IgnoreError();  // the first error is the one reported
    return s;
  };
  std::vector<HostToDevice> entries;
  size_t i = 0;
  for (uint64_t batch = 0; i < moves.size(); ++batch) {
    Lane& lane = lanes[batch % lanes.size()];
    // The lane's staging buffer is free once its previous batch is done;
    // meanwhile the other lanes' copies run.
    Status s = Drain(lane);
    if (!s.ok()) return drain_all(std::move(s));
    entries.clear();
    uint64_t off = 0;
    DevicePtr last_arena_end = 0;
    size_t first = i;
    while (i < moves.size() && off + moves[i].bytes <= lane.staging.bytes) {
      const Move& m = moves[i];
      uint8_t* dst = lane.staging.data + off;
      s = m.store->ReadPage(m.page, std::span<uint8_t>(dst, m.bytes));
      if (!s.ok()) return drain_all(std::move(s));
      HostToDevice* last = entries.empty() ? nullptr : &entries.back();
      if (last != nullptr && static_cast<const uint8_t*>(last->src) + last->bytes == dst &&
          last->dst + last->bytes == m.ptr && m.ptr + m.bytes <= last_arena_end) {
        last->bytes += m.bytes;  // adjacent slots: one larger copy
      } else {
        entries.push_back(HostToDevice{dst, m.ptr, m.bytes});
        last_arena_end = m.arena_end;
      }
      off += m.bytes;
      ++i;
    }
    DSVM_CHECK(i > first);  // batch_bytes >= every page size (Create)
    s = backend_->CopyToDevice(lane.stream, entries);
    if (!s.ok()) return drain_all(std::move(s));
    Result<Fence> f = backend_->RecordFence(lane.stream);
    if (!f.ok()) return drain_all(f.status());
    lane.fence = *f;
    lane.busy = true;
    ++stats_.to_device_calls;
    stats_.to_device_entries += entries.size();
    stats_.pages_to_device += i - first;
    stats_.bytes_to_device += off;
  }
  Status first_error;
  for (Lane& lane : lanes) {
    Status s = Drain(lane);
    if (first_error.ok() && !s.ok()) first_error = std::move(s);
  }
  return first_error;
}

Status DeviceTier::WriteBackMoves(uint32_t gpu, const std::vector<Move>& moves) {
  std::vector<Lane>& lanes = lanes_[gpu];
  DSVM_CHECK(lanes.size() >= 2);
  // A batch in flight: moves [begin, end) copied into `lane`'s staging.
  struct Pending {
    Lane* lane;
    size_t begin;
    size_t end;
  };
  std::deque<Pending> pending;
  // Waits for the oldest batch and hands its pages to their stores.
  auto complete_oldest = [&]() -> Status {
    Pending p = pending.front();
    pending.pop_front();
    DSVM_RETURN_IF_ERROR(Drain(*p.lane));
    uint64_t off = 0;
    for (size_t k = p.begin; k < p.end; ++k) {
      const Move& m = moves[k];
      DSVM_RETURN_IF_ERROR(m.store->WritePage(
          m.page, std::span<const uint8_t>(p.lane->staging.data + off, m.bytes)));
      off += m.bytes;
    }
    return Status::Ok();
  };
  auto drain_all = [&](Status s) {
    for (Lane& lane : lanes) Drain(lane).IgnoreError();  // the first error is the one reported
    return s;
  };
  std::vector<DeviceToHost> entries;
  size_t i = 0;
  for (uint64_t batch = 0; i < moves.size(); ++batch) {
    Lane& lane = lanes[batch % lanes.size()];
    // At most lanes-1 batches are pending after each round, so this lane's
    // previous batch has been completed already.
    DSVM_CHECK(!lane.busy);
    entries.clear();
    uint64_t off = 0;
    DevicePtr last_arena_end = 0;
    const size_t first = i;
    while (i < moves.size() && off + moves[i].bytes <= lane.staging.bytes) {
      const Move& m = moves[i];
      uint8_t* dst = lane.staging.data + off;
      DeviceToHost* last = entries.empty() ? nullptr : &entries.back();
      if (last != nullptr && last->src + last->bytes == m.ptr &&
          static_cast<uint8_t*>(last->dst) + last->bytes == dst &&
          m.ptr + m.bytes <= last_arena_end) {
        last->bytes += m.bytes;
      } else {
        entries.push_back(DeviceToHost{m.ptr, dst, m.bytes});
        last_arena_end = m.arena_end;
      }
      off += m.bytes;
      ++i;
    }
    DSVM_CHECK(i > first);
    Status s = backend_->CopyToHost(lane.stream, entries);
    if (!s.ok()) return drain_all(std::move(s));
    Result<Fence> f = backend_->RecordFence(lane.stream);
    if (!f.ok()) return drain_all(f.status());
    lane.fence = *f;
    lane.busy = true;
    pending.push_back(Pending{&lane, first, i});
    ++stats_.to_host_calls;
    stats_.to_host_entries += entries.size();
    stats_.pages_to_host += i - first;
    stats_.bytes_to_host += off;
    // While this batch's copy runs, the previous one goes to the stores.
    while (pending.size() >= lanes.size()) {
      s = complete_oldest();
      if (!s.ok()) return drain_all(std::move(s));
    }
  }
  while (!pending.empty()) {
    Status s = complete_oldest();
    if (!s.ok()) return drain_all(std::move(s));
  }
  return Status::Ok();
}

}  // namespace dsvm::node
