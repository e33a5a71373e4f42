#include "node/memory/device_tier.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <deque>
#include <exception>
#include <latch>
#include <optional>
#include <string>
#include <thread>
#include <unordered_set>
#include <utility>

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#include "proto/log.h"

namespace dsvm::node {
namespace {

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

uint32_t DefaultCopyThreads() {
  return std::clamp<uint32_t>(std::thread::hardware_concurrency() / 4, 1, 4);
}

struct DeviceTier::Copiers {
  explicit Copiers(uint32_t threads) : pool(threads) {}
  boost::asio::thread_pool pool;
};

Result<std::unique_ptr<DeviceTier>> DeviceTier::Create(DeviceBackend* backend,
                                                       std::vector<uint64_t> gpu_budget_bytes,
                                                       DeviceTierOptions options) {
  if (backend == nullptr) return InvalidArgument("device tier: no backend");
  if (gpu_budget_bytes.size() > backend->device_count()) {
    return InvalidArgument("device tier: " + std::to_string(gpu_budget_bytes.size()) +
                           " GPU budgets for " + std::to_string(backend->device_count()) +
                           " GPUs");
  }
  if (std::none_of(gpu_budget_bytes.begin(), gpu_budget_bytes.end(),
                   [](uint64_t b) { return b != 0; })) {
    return InvalidArgument("device tier: no GPU has a budget");
  }
  if (options.arena_bytes == 0 || options.arena_bytes % kArenaGranularity != 0) {
    return InvalidArgument("device tier: arena_bytes must be a positive multiple of 4 KiB");
  }
  if (options.streams_per_gpu < 2) {
    return InvalidArgument(
        "device tier: streams_per_gpu must be at least 2 (copies overlap staging)");
  }
  if (options.copy_threads == 0 || options.copy_threads > 64) {
    return InvalidArgument("device tier: copy_threads must be 1 to 64, not " +
                           std::to_string(options.copy_threads));
  }
  if (options.batch_bytes == 0 || options.batch_bytes % 4096 != 0) {
    return InvalidArgument("device tier: batch_bytes must be a positive multiple of 4 KiB");
  }
  if (options.pinned_limit_bytes != 0 && options.pinned_limit_bytes < (2ull << 20)) {
    return InvalidArgument(
        "device tier: pinned_limit_bytes must be 0 (the default) or at least "
        "one 2 MiB block, not " +
        std::to_string(options.pinned_limit_bytes));
  }
  TierTableOptions t;
  t.host_budget_bytes = options.host_budget_bytes;
  t.aging_period = options.aging_period;
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<TierTable> table, TierTable::Create(std::move(t)));
  std::unique_ptr<DeviceTier> tier(
      new DeviceTier(backend, std::move(gpu_budget_bytes), options, std::move(table)));
  DSVM_RETURN_IF_ERROR(tier->Init());
  return tier;
}

DeviceTier::DeviceTier(DeviceBackend* backend, std::vector<uint64_t> gpu_budget_bytes,
                       DeviceTierOptions options, std::unique_ptr<TierTable> table)
    : backend_(backend),
      gpu_budget_bytes_(std::move(gpu_budget_bytes)),
      options_(options),
      table_(std::move(table)),
      lanes_(backend->device_count()),
      direct_lanes_(backend->device_count()) {
  for (uint64_t bytes : gpu_budget_bytes_) budgets_.push_back(std::make_unique<DeviceBudget>(bytes));
  pinned_limit_ = options_.pinned_limit_bytes;
  if (pinned_limit_ == 0) pinned_limit_ = DefaultPinnedLimit();
}

uint64_t DefaultPinnedLimit() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_bytes = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_bytes <= 0) return uint64_t{2} << 20;
  return std::max(uint64_t(pages) * uint64_t(page_bytes) / 2, uint64_t{2} << 20);
}

Status DeviceTier::Init() {
  if (options_.copy_threads > 1) copiers_ = std::make_unique<Copiers>(options_.copy_threads - 1);
  const uint32_t lanes_per_gpu = std::max(options_.streams_per_gpu, 2 * options_.copy_threads);
  for (uint32_t gpu = 0; gpu < gpu_budget_bytes_.size(); ++gpu) {
    if (gpu_budget_bytes_[gpu] == 0) continue;
    std::vector<Lane>& lanes = lanes_[gpu];
    while (lanes.size() < lanes_per_gpu) {
      DSVM_ASSIGN_OR_RETURN(StreamId stream, backend_->CreateStream(gpu));
      lanes.push_back(Lane{stream, {}, false, {}});  // the destructor destroys it on failure below
      DSVM_ASSIGN_OR_RETURN(lanes.back().staging, backend_->AllocateStaging(options_.batch_bytes));
    }
    // Direct copies get streams of their own, so that they never hold up
    // the staging of a lane's next batch.
    while (options_.direct_copies && direct_lanes_[gpu].size() < 2) {
      DSVM_ASSIGN_OR_RETURN(StreamId stream, backend_->CreateStream(gpu));
      direct_lanes_[gpu].push_back(Lane{stream, {}, false, {}});
    }
  }
  return Status::Ok();
}

DeviceTier::~DeviceTier() {
  for (const auto& [base, store] : stores_) store->SetUnpinListener({});
  Unregister(0, ~uint64_t{0});
  for (auto* all : {&lanes_, &direct_lanes_}) {
    for (std::vector<Lane>& lanes : *all) {
      for (Lane& lane : lanes) {
        // Both wait for queued copies first; errors here have no one to go to.
        backend_->DestroyStream(lane.stream).IgnoreError();
        if (lane.staging.data != nullptr) backend_->FreeStaging(lane.staging.data).IgnoreError();
      }
    }
  }
  for (const auto& [page, placed] : slots_) placed.pool->Free(placed.slot).IgnoreError();
  for (const auto& [key, e] : held_) e.slot.pool->Free(e.slot.slot).IgnoreError();
}

Status DeviceTier::AddRegion(PageStore* store) {
  CallScope scope(this);
  if (store == nullptr) return InvalidArgument("device tier: no store");
  const uint32_t ps = store->page_size();
  if (ps > options_.batch_bytes) {
    return InvalidArgument("device tier: batch_bytes " + std::to_string(options_.batch_bytes) +
                           " is below the region's page size " + std::to_string(ps));
  }
  const PageAddr base = store->base();
  DSVM_RETURN_IF_ERROR(table_->AddRegion(base, store->size(), ps));
  // One pool per GPU whose budget holds a page of the region; an arena is
  // never larger than the region or the budget.
  std::vector<std::unique_ptr<DevicePagePool>> pools(gpu_budget_bytes_.size());
  for (uint32_t gpu = 0; gpu < gpu_budget_bytes_.size(); ++gpu) {
    const uint64_t budget = gpu_budget_bytes_[gpu] / ps * ps;
    if (budget == 0) continue;
    DevicePagePoolOptions po;
    po.device = gpu;
    po.page_size = ps;
    po.budget_bytes = budget;
    po.arena_bytes =
        std::max<uint64_t>(ps, std::min({options_.arena_bytes, budget, store->size()}) / ps * ps);
    po.shared = budgets_[gpu].get();
    Result<std::unique_ptr<DevicePagePool>> pool = DevicePagePool::Create(backend_, po);
    Result<int> index = pool.ok() ? table_->AddPool(gpu, base, (*pool)->capacity_slots())
                                  : Result<int>(pool.status());
    if (!index.ok()) {
      TierSteps none;
      table_->RemoveRegion(base, &none).IgnoreError();  // added above, holds no page
      for (auto& p : pools) {
        if (p) table_index_.erase(p.get());
      }
      return index.status();
    }
    table_index_[pool->get()] = *index;
    pools[gpu] = std::move(*pool);
  }
  region_pools_[base] = std::move(pools);
  stores_[base] = store;
  // Runs on whichever thread punches. Copy threads may (a write-back that
  // detaches a transfer's view), but a block with a view is never
  // registered (the store calls this before it lends one, and MapBlock
  // refuses such blocks): Unregister then only reads registered_, which
  // changes on the calling thread alone, outside ParallelFor.
  store->SetUnpinListener([this](PageAddr first, uint64_t bytes) { OnStorePunched(first, bytes); });
  return Status::Ok();
}

DeviceTier::CallScope::CallScope(DeviceTier* tier) : tier_(tier) {
  DSVM_CHECK_MSG(!tier->in_keep_alive_, "device tier: called from its keep_alive");
  if (tier->call_depth_++ != 0) return;
  // No copy is in flight between calls: registrations may end.
  std::vector<std::pair<PageAddr, uint64_t>> punched = std::move(tier->punched_meanwhile_);
  tier->punched_meanwhile_.clear();
  for (const auto& [first, bytes] : punched) tier->Unregister(first, bytes);
}

DeviceTier::CallScope::~CallScope() {
  if (--tier_->call_depth_ == 0) tier_->touched_.clear();
}

void DeviceTier::NoteTouched(std::span<const PageAddr> pages) {
  if (track_touches_) touched_.insert(pages.begin(), pages.end());
}

void DeviceTier::OnStorePunched(PageAddr first, uint64_t bytes) {
  if (in_keep_alive_) {
    // A page the call leaves alone, in a block whose copies may be in
    // flight (its other pages): the block stays registered until then.
    punched_meanwhile_.emplace_back(first, bytes);
    return;
  }
  Unregister(first, bytes);
}

void DeviceTier::Unregister(PageAddr first, uint64_t bytes) {
  if (registered_.empty()) return;
  const PageAddr end = bytes > ~PageAddr{0} - first ? ~PageAddr{0} : first + bytes;
  auto it = registered_.upper_bound(first);
  if (it != registered_.begin() && std::prev(it)->first + std::prev(it)->second.bytes > first) {
    --it;
  }
  while (it != registered_.end() && it->first < end) it = EndRegistration(it);
}

void DeviceTier::AddRegistration(const PageStore::Block& block) {
  registered_.emplace(block.first, Registered{block.data, block.bytes, calls_});
  by_use_.emplace(calls_, block.first);
  pinned_bytes_ += block.bytes;
  stats_.pinned_bytes = pinned_bytes_;
  ++stats_.blocks_registered;
}

void DeviceTier::Touch(RegisteredMap::iterator it) {
  if (it->second.last_use == calls_) return;
  by_use_.erase({it->second.last_use, it->first});
  it->second.last_use = calls_;
  by_use_.emplace(calls_, it->first);
}

DeviceTier::RegisteredMap::iterator DeviceTier::EndRegistration(RegisteredMap::iterator it) {
  DSVM_CHECK_MSG(!copying_.load(std::memory_order_relaxed),
                 "a registered block punched by a copy thread");
  // Waits for the copies queued (none: every call returns with its copies
  // done). A device error here leaves the tier failed, as a copy's would.
  Status s = backend_->UnregisterHost(it->second.data);
  if (!s.ok()) {
    LogError("GPU tier: " + s.ToString());
    Fail(std::move(s)).IgnoreError();  // kept in failed_
  }
  ++stats_.blocks_unregistered;
  pinned_bytes_ -= it->second.bytes;
  stats_.pinned_bytes = pinned_bytes_;
  by_use_.erase({it->second.last_use, it->first});
  return registered_.erase(it);
}

bool DeviceTier::MakePinRoom(uint64_t bytes) {
  if (pinned_bytes_ + bytes <= pinned_limit_) return true;
  // Enough of what this call has not touched must go, or none of it.
  uint64_t freeable = 0;
  for (auto u = by_use_.begin(); u != by_use_.end() && u->first != calls_; ++u) {
    freeable += registered_.at(u->second).bytes;
    if (pinned_bytes_ - freeable + bytes <= pinned_limit_) break;
  }
  if (pinned_bytes_ - freeable + bytes > pinned_limit_) return false;
  while (pinned_bytes_ + bytes > pinned_limit_) {
    EndRegistration(registered_.find(by_use_.begin()->second));
    ++stats_.blocks_unpinned_for_room;
  }
  return true;
}

bool DeviceTier::Follows(const DirectMove& a, const DirectMove& b) {
  return a.host + a.move.bytes == b.host && b.host < a.block_end &&
         a.move.ptr + a.move.bytes == b.move.ptr && b.move.ptr + b.move.bytes <= a.move.arena_end;
}

std::vector<DeviceTier::DirectMove> DeviceTier::TakeDirect(std::vector<Move>* moves) {
  std::vector<DirectMove> direct;
  if (!options_.direct_copies || register_refused_) return direct;
  ++calls_;
  // The blocks of this call's pages: their mapping here and whether it is
  // registered yet; none when they cannot go direct now (MapBlock: holes,
  // a transfer's view).
  struct BlockState {
    PageStore::Block block;
    bool registered;
  };
  std::unordered_map<PageAddr, std::optional<BlockState>> blocks;
  auto state_of = [&](const Move& m) -> std::optional<BlockState>& {
    const PageAddr first = m.store->BlockOf(m.page).first;
    auto b = blocks.find(first);
    if (b != blocks.end()) return b->second;
    std::optional<BlockState> state;
    if (auto r = registered_.find(first); r != registered_.end()) {
      Touch(r);  // registered through this call: `blocks` holds its mapping
      state = BlockState{{r->second.data, first, r->second.bytes}, true};
    } else if (std::optional<PageStore::Block> block = m.store->MapBlock(m.page)) {
      state = BlockState{*block, false};
    }
    return blocks.emplace(first, state).first->second;
  };
  // Each move's bytes in its block's mapping (host null: staged). A
  // retained page's bytes are not in the memfd.
  std::vector<DirectMove> place(moves->size());
  for (size_t i = 0; i < moves->size(); ++i) {
    const Move& m = (*moves)[i];
    place[i].move = m;
    if (m.store->IsRetained(m.page)) continue;
    const std::optional<BlockState>& b = state_of(m);
    if (!b) continue;
    place[i].host = b->block.data + (m.page - b->block.first);
    place[i].block_end = b->block.data + b->block.bytes;
  }
  // Neighbours copy as one; a run under direct_min_bytes is staged, where
  // it joins its neighbours in one copy (the moves are in slot order), not
  // one copy call per small page. A block is registered only for a run.
  std::vector<Move> staged;
  bool logged = false;
  for (size_t i = 0; i < place.size();) {
    size_t j = i + 1;
    uint64_t bytes = place[i].move.bytes;
    if (place[i].host != nullptr) {
      for (; j < place.size() && place[j].host != nullptr && Follows(place[j - 1], place[j]); ++j) {
        bytes += place[j].move.bytes;
      }
    }
    bool go_direct = place[i].host != nullptr && bytes >= options_.direct_min_bytes;
    // A run's pages are in one block or in neighbouring ones: the state
    // changes only where the block does.
    BlockState* last = nullptr;
    for (size_t k = i; go_direct && k < j; ++k) {
      BlockState* b = &*state_of(place[k].move);
      if (b == last || b->registered) {
        last = b;
        continue;
      }
      last = b;
      if (!MakePinRoom(b->block.bytes)) {
        go_direct = false;  // the limit is full of this call's blocks: staged
        break;
      }
      Status s = register_refused_ ? FailedPrecondition("refused before")
                                   : backend_->RegisterHost(b->block.data, b->block.bytes);
      if (s.ok()) {
        AddRegistration(b->block);
        b->registered = true;
        continue;
      }
      // kFailedPrecondition: this memory cannot be pinned at all, so no
      // block is asked again; otherwise (kResourceExhausted: not now) the
      // run is staged this time.
      if (s.code() == StatusCode::kFailedPrecondition) register_refused_ = true;
      if (!logged) {
        LogError("GPU tier: pinning a region's pages for direct copies: " + s.ToString() +
                 (register_refused_ ? "; every copy goes through staging from now on" : ""));
        logged = true;
      }
      go_direct = false;
    }
    for (; i < j; ++i) {
      if (go_direct) {
        direct.push_back(place[i]);
      } else {
        staged.push_back(place[i].move);
      }
    }
  }
  *moves = std::move(staged);
  return direct;
}

Status DeviceTier::QueueDirect(uint32_t gpu, const std::vector<DirectMove>& direct,
                               bool to_device) {
  std::vector<Lane>& lanes = direct_lanes_[gpu];
  std::vector<HostToDevice> in;
  std::vector<DeviceToHost> out;
  size_t next_lane = 0;
  for (size_t i = 0; i < direct.size();) {
    in.clear();
    out.clear();
    uint64_t bytes = 0;
    const size_t begin = i;
    // Neighbours in host and device memory merge into one copy, inside one
    // arena and one registered block (a copy may not leave either).
    const DirectMove* last = nullptr;
    for (; i < direct.size() && (bytes == 0 || bytes + direct[i].move.bytes <= options_.batch_bytes);
         ++i) {
      const DirectMove& d = direct[i];
      const bool merge = last != nullptr && Follows(*last, d);
      if (to_device) {
        if (merge) {
          in.back().bytes += d.move.bytes;
        } else {
          in.push_back(HostToDevice{d.host, d.move.ptr, d.move.bytes});
        }
      } else if (merge) {
        out.back().bytes += d.move.bytes;
      } else {
        out.push_back(DeviceToHost{d.move.ptr, d.host, d.move.bytes});
      }
      last = &d;
      bytes += d.move.bytes;
    }
    // One batch in flight per lane: the wait calls keep_alive, as the
    // staged batches' do, however many gigabytes the call moves.
    Lane& lane = lanes[next_lane++ % lanes.size()];
    DSVM_RETURN_IF_ERROR(Drain(lane));
    DSVM_RETURN_IF_ERROR(to_device ? backend_->CopyToDevice(lane.stream, in)
                                   : backend_->CopyToHost(lane.stream, out));
    // A later fence on the lane's stream covers its earlier batch too.
    DSVM_ASSIGN_OR_RETURN(lane.fence, backend_->RecordFence(lane.stream));
    lane.busy = true;
    const uint64_t pages = i - begin;
    if (to_device) {
      ++stats_.to_device_calls;
      stats_.to_device_entries += in.size();
      stats_.pages_to_device += pages;
      stats_.direct_pages_to_device += pages;
      stats_.bytes_to_device += bytes;
    } else {
      ++stats_.to_host_calls;
      stats_.to_host_entries += out.size();
      stats_.pages_to_host += pages;
      stats_.direct_pages_to_host += pages;
      stats_.bytes_to_host += bytes;
    }
  }
  return Status::Ok();
}

Status DeviceTier::RemoveRegion(PageAddr base) {
  CallScope scope(this);
  TierSteps steps;
  DSVM_RETURN_IF_ERROR(table_->RemoveRegion(base, &steps));
  Status s = Execute(steps, nullptr);  // frees only: cannot fail
  DSVM_CHECK_MSG(s.ok(), s.ToString());
  PageStore* store = stores_.at(base);
  store->SetUnpinListener({});
  Unregister(base, store->size());
  stores_.erase(base);
  auto it = region_pools_.find(base);
  DSVM_CHECK(it != region_pools_.end());  // made by AddRegion
  std::vector<std::unique_ptr<DevicePagePool>> pools = std::move(it->second);
  region_pools_.erase(it);
  for (std::unique_ptr<DevicePagePool>& p : pools) {
    if (!p) continue;
    if (p->used_slots() != 0) {
      retired_.push_back(std::move(p));  // lost maps hold slots in it
    } else {
      ForgetPool(p.get());  // freed with `pools`, its arenas' bytes back to the budget
    }
  }
  return Status::Ok();
}

void DeviceTier::ForgetPool(const DevicePagePool* pool) {
  DSVM_CHECK(pool->used_slots() == 0);
  // Caches keyed by the pool's address: a later pool may get the same one.
  table_index_.erase(pool);
  arenas_.erase(pool);
  arena_generations_.erase(pool);
  occupants_.erase(pool);
}

const DevicePagePool* DeviceTier::PoolOf(uint32_t gpu, PageAddr base) const {
  return MutablePoolOf(gpu, base);
}

DevicePagePool* DeviceTier::MutablePoolOf(uint32_t gpu, PageAddr base) const {
  auto it = region_pools_.find(base);
  if (it == region_pools_.end() || gpu >= it->second.size()) return nullptr;
  return it->second[gpu].get();
}

std::vector<DevicePagePool*> DeviceTier::PoolsOn(uint32_t gpu) const {
  std::vector<DevicePagePool*> out;
  for (const auto& [base, pools] : region_pools_) {
    if (gpu < pools.size() && pools[gpu]) out.push_back(pools[gpu].get());
  }
  for (const std::unique_ptr<DevicePagePool>& p : retired_) {
    if (p->device() == gpu) out.push_back(p.get());
  }
  return out;
}

uint64_t DeviceTier::arena_bytes(uint32_t gpu) const {
  uint64_t bytes = 0;
  for (const DevicePagePool* p : PoolsOn(gpu)) bytes += p->arena_bytes();
  return bytes;
}

size_t DeviceTier::pool_count() const {
  size_t n = retired_.size();
  for (const auto& [base, pools] : region_pools_) {
    for (const auto& p : pools) n += p != nullptr;
  }
  return n;
}

PageStore* DeviceTier::StoreOf(PageAddr page) const {
  auto it = stores_.upper_bound(page);
  if (it == stores_.begin()) return nullptr;
  --it;
  PageStore* s = it->second;
  return page - s->base() < s->size() ? s : nullptr;
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
  CallScope scope(this);
  NoteTouched(pages);
  if (!failed_.ok())
    return FailedPrecondition("device tier: failed earlier: " + failed_.ToString());
  auto it = stores_.find(region);
  if (it == stores_.end()) return InvalidArgument("device tier: no region at " + Hex(region));
  PageStore* store = it->second;
  for (PageAddr page : pages) DSVM_RETURN_IF_ERROR(store->CheckPage(page));
  DevicePagePool* pool = MutablePoolOf(gpu, region);
  if (pool == nullptr) {
    return InvalidArgument("device tier: no pool for gpu " + std::to_string(gpu) +
                           " and region " + Hex(region));
  }
  // Room is made (other regions' arenas reclaimed) only for a call the
  // table will take.
  DSVM_RETURN_IF_ERROR(table_->CheckAdmissible(pages, gpu));
  DSVM_RETURN_IF_ERROR(MakeRoomFor(pool, NotOn(gpu, pages)));
  TierSteps steps;
  DSVM_RETURN_IF_ERROR(table_->MakeResident(pages, gpu, for_write, /*pin=*/true, tick, &steps));
  std::vector<PageAddr> placed;
  Status s = Execute(steps, &placed);
  if (!s.ok()) {
    RollBack(steps, pages);
    return s;
  }
  std::vector<DevicePtr> ptrs;
  ptrs.reserve(pages.size());
  for (PageAddr page : pages) ptrs.push_back(slots_.at(page).slot.ptr);
  return ptrs;
}

void DeviceTier::SyncCapacities(uint32_t gpu) {
  for (DevicePagePool* p : PoolsOn(gpu)) {
    // A pool's capacity covers its arenas' slots, so this holds; should it
    // not, the table keeps the capacity it had (calls may then fail with
    // kResourceExhausted from the pool) and the daemon goes on.
    Status s = table_->SetCapacity(TableIndex(p), p->capacity_slots());
    if (!s.ok()) LogError("GPU tier: " + s.ToString());
  }
}

Status DeviceTier::ReclaimArena(DevicePagePool* pool, size_t arena) {
  const SlotRange r = pool->ArenaSlots(arena);
  TierSteps steps;
  for (uint32_t i = r.first; i < r.first + r.count; ++i) {
    const PageAddr q = OccupantOf(pool, i);
    if (q != kNoPage) DSVM_RETURN_IF_ERROR(table_->EvictFromGpu(q, &steps));
  }
  DSVM_RETURN_IF_ERROR(Execute(steps, nullptr));
  ++stats_.arenas_reclaimed;
  return pool->ReleaseEmptyArenas().status();
}

uint64_t DeviceTier::NotOn(uint32_t gpu, std::span<const PageAddr> pages) const {
  return static_cast<uint64_t>(std::count_if(pages.begin(), pages.end(), [&](PageAddr p) {
    return table_->GpuOf(p) != std::optional<uint32_t>(gpu);
  }));
}

Status DeviceTier::MakeRoomFor(DevicePagePool* pool, uint64_t pages) {
  const uint32_t gpu = pool->device();
  const int index = TableIndex(pool);
  auto short_of = [&](bool count_evictable) {
    SyncCapacities(gpu);
    const uint64_t free = table_->capacity_slots(index) - table_->used_slots(index) +
                          (count_evictable ? table_->evictable_slots(index) : 0);
    return pages > free;
  };
  if (!short_of(false)) return Status::Ok();
  // Free device memory first: the other regions' empty arenas.
  const std::vector<DevicePagePool*> others = PoolsOn(gpu);
  for (DevicePagePool* p : others) {
    if (p != pool) DSVM_RETURN_IF_ERROR(p->ReleaseEmptyArenas().status());
  }
  // Then, rather than refuse, the other regions' arenas of evictable pages.
  while (short_of(true)) {
    DSVM_ASSIGN_OR_RETURN(const bool reclaimed, ReclaimOneArena(gpu, pool));
    if (!reclaimed) break;  // the call fails as the table says
  }
  SyncCapacities(gpu);
  return Status::Ok();
}

Result<bool> DeviceTier::ReclaimOneArena(uint32_t gpu, const DevicePagePool* skip) {
  DevicePagePool* best_pool = nullptr;
  size_t best_arena = 0;
  uint64_t best_count = 0;
  for (DevicePagePool* p : PoolsOn(gpu)) {
    if (p == skip) continue;
    for (size_t a = 0; a < p->arena_count(); ++a) {
      const SlotRange r = p->ArenaSlots(a);
      if (r.count == 0) continue;  // released
      uint64_t count = 0;
      bool blocked = false;
      for (uint32_t i = r.first; i < r.first + r.count && !blocked; ++i) {
        const PageAddr q = OccupantOf(p, i);
        if (q == kNoPage) continue;
        blocked = q == kHeld || table_->PinsOf(q) != 0 || table_->IsLeaving(q);
        ++count;
      }
      if (!blocked && (best_pool == nullptr || count < best_count)) {
        best_pool = p;
        best_arena = a;
        best_count = count;
      }
    }
  }
  if (best_pool == nullptr) return false;
  DSVM_RETURN_IF_ERROR(ReclaimArena(best_pool, best_arena));
  return true;
}

void DeviceTier::RollBack(const TierSteps& steps, std::span<const PageAddr> pages) {
  // Undo this call's new GPU copies and its pins; see the header.
  std::unordered_set<PageAddr> fresh;
  for (const TierStep& step : steps) {
    if (step.kind == TierStepKind::kAllocateSlot) fresh.insert(step.page);
  }
  // Pages whose write-back failed kept their slots (a page moving to
  // another GPU too: its slot here is the one it had).
  std::unordered_set<PageAddr> kept;
  for (const auto& [page, gpu] : keep_dirty_) kept.insert(page);
  for (PageAddr page : pages) {
    if (fresh.count(page) != 0) {
      if (slots_.count(page) != 0 && kept.count(page) == 0) FreeSlotOf(page);
      table_->Unplace(page, 1).IgnoreError();  // placed by this call, pinned once
    } else {
      table_->Unpin(page).IgnoreError();  // pinned by this call
    }
  }
  KeepDirtyCopies();
  ++stats_.rollbacks;
}

void DeviceTier::KeepDirtyCopies() {
  for (const auto& [page, gpu] : keep_dirty_) {
    const Status s = table_->KeepDirtyOnGpu(page, gpu);
    DSVM_CHECK_MSG(s.ok(), "device tier: keeping a dirty copy: " + s.ToString());
    leave_.erase(std::remove(leave_.begin(), leave_.end(), page), leave_.end());
  }
  keep_dirty_.clear();
}

PageAddr DeviceTier::OccupantOf(const DevicePagePool* pool, uint32_t index) {
  std::vector<PageAddr>& occ = occupants_[pool];
  if (occ.size() < pool->arena_slots()) occ.resize(pool->arena_slots(), kNoPage);
  return occ[index];
}

Result<DeviceTier::RunTarget> DeviceTier::CheckRun(PageAddr region,
                                                   std::span<const PageAddr> pages,
                                                   uint32_t gpu) const {
  if (!failed_.ok())
    return FailedPrecondition("device tier: failed earlier: " + failed_.ToString());
  auto it = stores_.find(region);
  if (it == stores_.end()) return InvalidArgument("device tier: no region at " + Hex(region));
  PageStore* store = it->second;
  const uint64_t ps = store->page_size();
  if (pages.empty()) return InvalidArgument("device tier: a run of no pages");
  for (size_t i = 0; i < pages.size(); ++i) {
    DSVM_RETURN_IF_ERROR(store->CheckPage(pages[i]));
    if (pages[i] != pages[0] + i * ps) {
      return InvalidArgument("device tier: the pages of a run must be consecutive; " +
                             Hex(pages[i]) + " follows " + Hex(pages[0]));
    }
  }
  DevicePagePool* pool = MutablePoolOf(gpu, region);
  if (pool == nullptr) {
    return InvalidArgument("device tier: no pool for gpu " + std::to_string(gpu) +
                           " and region " + Hex(region) + " (" + std::to_string(ps) +
                           "-byte pages)");
  }
  return RunTarget{store, pool};
}

Result<uint32_t> DeviceTier::ChooseRunWindow(DevicePagePool* pool, uint32_t n,
                                             const std::unordered_set<PageAddr>& mine) {
  const uint32_t gpu = pool->device();
  // Per slot: blocked (a pinned or leaving page of another range), or the
  // cost of taking it (1 for a page to evict, 2 when dirty).
  auto cost_of = [&](uint32_t index, bool* blocked) -> uint32_t {
    const PageAddr q = OccupantOf(pool, index);
    *blocked = false;
    if (q == kNoPage || mine.count(q) != 0) return 0;
    if (q == kHeld || table_->PinsOf(q) != 0 || table_->IsLeaving(q)) {
      *blocked = true;
      return 0;
    }
    return table_->IsDirty(q) ? 2 : 1;
  };
  // A window's rank: its hottest occupant (the table's eviction order, so
  // a run evicts the least recently and frequently used run, as a page
  // evicts the coldest page), then its cost in copies. Ranking by cost
  // alone took the first full arena every time: a stream of chunks through
  // a budget of several kept evicting the chunk mapped just before. So a
  // cold window of dirty pages goes before a warm one of clean pages, at
  // the price of their write-back, as single pages are chosen too.
  using Heat = std::pair<uint32_t, uint64_t>;
  auto best_window = [&](uint64_t* best_cost) {
    std::optional<uint32_t> best;
    Heat best_heat;
    for (size_t a = 0; a < pool->arena_count(); ++a) {
      const SlotRange r = pool->ArenaSlots(a);
      if (r.count < n) continue;
      uint64_t cost = 0, blocked = 0;
      std::vector<uint32_t> c(r.count);
      std::vector<uint8_t> b(r.count);
      std::vector<Heat> heat(r.count);
      std::deque<uint32_t> hottest;  // slots of the window, heat descending
      for (uint32_t i = 0; i < r.count; ++i) {
        bool bl;
        c[i] = cost_of(r.first + i, &bl);
        b[i] = bl;
        if (c[i] != 0) heat[i] = table_->HeatOf(OccupantOf(pool, r.first + i));
        cost += c[i];
        blocked += bl;
        while (!hottest.empty() && heat[hottest.back()] <= heat[i]) hottest.pop_back();
        hottest.push_back(i);
        if (i >= n) {
          cost -= c[i - n];
          blocked -= b[i - n];
          if (hottest.front() == i - n) hottest.pop_front();
        }
        if (i + 1 < n || blocked != 0) continue;
        const Heat h = heat[hottest.front()];
        if (!best || h < best_heat || (h == best_heat && cost < *best_cost)) {
          best = r.first + i + 1 - n;
          best_heat = h;
          *best_cost = cost;
          if (cost == 0) return best;
        }
      }
    }
    return best;
  };
  uint64_t cost = 0;
  std::optional<uint32_t> window = best_window(&cost);
  if (!window || cost > 0) {
    // Free memory under the budget beats evictions.
    Result<size_t> grown = pool->GrowForRun(n);
    if (!grown.ok() && !window && grown.status().code() == StatusCode::kResourceExhausted) {
      // No arena of the region's can hold the run: rather than refuse, give
      // the budget back what can be (empty arenas, then arenas whose pages
      // may all be evicted, this region's or others') until one fits.
      for (DevicePagePool* p : PoolsOn(gpu)) {
        DSVM_RETURN_IF_ERROR(p->ReleaseEmptyArenas().status());
      }
      grown = pool->GrowForRun(n);
      while (!grown.ok() && grown.status().code() == StatusCode::kResourceExhausted) {
        DSVM_ASSIGN_OR_RETURN(const bool reclaimed, ReclaimOneArena(gpu, nullptr));
        if (!reclaimed) break;
        grown = pool->GrowForRun(n);
      }
      SyncCapacities(gpu);
    }
    if (grown.ok()) {
      window = pool->ArenaSlots(*grown).first;
      cost = 0;
    } else if (!window) {
      return Status(grown.status().code(),
                    "device tier: no arena of gpu " + std::to_string(gpu) + " has " +
                        std::to_string(n) + " adjacent slots free of pages mapped by others, " +
                        "and no new arena fits: " + grown.status().message());
    }
  }
  return *window;
}

Result<DeviceRun> DeviceTier::MapRun(PageAddr region, std::span<const PageAddr> pages,
                                     uint32_t gpu, bool for_write, uint64_t tick) {
  CallScope scope(this);
  NoteTouched(pages);
  DSVM_ASSIGN_OR_RETURN(const RunTarget target, CheckRun(region, pages, gpu));
  PageStore* store = target.store;
  DevicePagePool* pool = target.pool;
  const uint64_t ps = store->page_size();
  const uint32_t n = static_cast<uint32_t>(pages.size());
  // Every check first: room is made (other regions' arenas reclaimed)
  // only for a call that will be taken.
  DSVM_RETURN_IF_ERROR(table_->CheckAdmissible(pages, gpu));
  // The pages as they are now: in place already (a run mapped before), or
  // pinned where they cannot move.
  bool in_place = true;
  const DevicePtr first_ptr = SlotOf(pages[0]);
  for (size_t i = 0; i < pages.size(); ++i) {
    const PageAddr page = pages[i];
    if (table_->IsLeaving(page)) {
      return FailedPrecondition("device tier: page " + Hex(page) + " is leaving the node");
    }
    const std::optional<uint32_t> on = table_->GpuOf(page);
    if (on && *on != gpu && table_->PinsOf(page) != 0) {
      return FailedPrecondition("device tier: page " + Hex(page) + " is mapped on gpu " +
                                std::to_string(*on));
    }
    const auto placed = slots_.find(page);
    if (!on || *on != gpu || placed == slots_.end() || placed->second.slot.ptr != first_ptr + i * ps ||
        (i > 0 && placed->second.slot.index != slots_.at(pages[0]).slot.index + i)) {
      in_place = false;
    }
  }
  if (!in_place) {
    for (PageAddr page : pages) {
      if (table_->PinsOf(page) != 0) {
        return FailedPrecondition(
            "device tier: page " + Hex(page) +
            " is mapped already by a map that is not this range; unmap it first, or map exactly "
            "the same range");
      }
    }
  }
  DSVM_RETURN_IF_ERROR(MakeRoomFor(pool, NotOn(gpu, pages)));
  if (pages.size() > pool->capacity_slots()) {
    return ResourceExhausted("device tier: a run of " + std::to_string(pages.size()) +
                             " pages of " + std::to_string(ps) + " bytes is larger than gpu " +
                             std::to_string(gpu) + "'s budget of " +
                             std::to_string(pool->capacity_slots()) + " pages");
  }
  std::unordered_set<PageAddr> mine(pages.begin(), pages.end());
  // Choose the window: slots [start, start + n) of one arena.
  uint32_t start = 0;
  if (in_place) {
    start = slots_.at(pages[0]).slot.index;
  } else {
    DSVM_ASSIGN_OR_RETURN(start, ChooseRunWindow(pool, n, mine));
    // Move what is in the way out: other pages in the window, and pages of
    // this call on this GPU outside their place in it.
    TierSteps evict;
    for (uint32_t i = 0; i < n; ++i) {
      const PageAddr q = OccupantOf(pool, start + i);
      if (q != kNoPage && q != pages[i]) {
        DSVM_RETURN_IF_ERROR(table_->EvictFromGpu(q, &evict));
        ++stats_.run_evictions;
      }
    }
    // Pages of this call on this GPU outside the window (those in it at
    // another place went above): moved into their place on the device
    // once the window is clear, not through the host.
    std::vector<std::pair<PageAddr, uint32_t>> move;
    for (uint32_t i = 0; i < n; ++i) {
      const PageAddr page = pages[i];
      const std::optional<uint32_t> on = table_->GpuOf(page);
      if (on && *on == gpu && slots_.at(page).slot.index != start + i) {
        move.emplace_back(page, start + i);
      }
    }
    DSVM_RETURN_IF_ERROR(Execute(evict, nullptr));
    DSVM_RETURN_IF_ERROR(MoveOnDevice(pool, gpu, ps, move));
    for (uint32_t i = 0; i < n; ++i) forced_[pages[i]] = start + i;
  }
  TierSteps steps;
  Status s = table_->MakeResident(pages, gpu, for_write, /*pin=*/true, tick, &steps);
  if (!s.ok()) {
    forced_.clear();
    return s;
  }
  std::vector<PageAddr> placed;
  s = Execute(steps, &placed);
  forced_.clear();
  if (!s.ok()) {
    RollBack(steps, pages);
    return s;
  }
  const DeviceRun run = RunAt(pool, start, n);
  for (uint32_t i = 0; i < n; ++i) DSVM_CHECK(slots_.at(pages[i]).slot.ptr == run.ptr + i * ps);
  ++stats_.runs;
  return run;
}

Status DeviceTier::MoveOnDevice(DevicePagePool* pool, uint32_t gpu, uint64_t page_bytes,
                                const std::vector<std::pair<PageAddr, uint32_t>>& moves) {
  if (moves.empty()) return Status::Ok();
  for (const auto& [page, index] : moves) NoteTouched(page);
  // The window is clear: every slot of it is free or in place already.
  std::vector<DeviceSlot> to;
  for (const auto& [page, index] : moves) {
    Result<DeviceSlot> slot = pool->Take(index);
    DSVM_CHECK_MSG(slot.ok(), "device tier: moving page " + Hex(page) + " into its run: " +
                                  slot.status().ToString());
    to.push_back(*slot);
  }
  Lane& lane = lanes_[gpu][0];
  DSVM_CHECK(!lane.busy);
  Status s = Status::Ok();
  for (size_t k = 0; k < moves.size() && s.ok(); ++k) {
    s = backend_->CopyOnDevice(lane.stream, slots_.at(moves[k].first).slot.ptr, to[k].ptr,
                               page_bytes);
  }
  if (s.ok()) {
    Result<Fence> f = backend_->RecordFence(lane.stream);
    if (f.ok()) {
      lane.fence = *f;
      lane.busy = true;
      s = Drain(lane);
    } else {
      s = f.status();
    }
  }
  if (!s.ok()) {
    for (const DeviceSlot& t : to) pool->Free(t).IgnoreError();
    return Fail(std::move(s));
  }
  for (size_t k = 0; k < moves.size(); ++k) {
    const PageAddr page = moves[k].first;
    Placed& placed = slots_.at(page);
    const Status freed = pool->Free(placed.slot);
    DSVM_CHECK_MSG(freed.ok(), freed.ToString());
    occupants_[pool][placed.slot.index] = kNoPage;
    placed.slot = to[k];
    OccupantOf(pool, to[k].index);  // sizes the table
    occupants_[pool][to[k].index] = page;
  }
  stats_.pages_moved_on_device += moves.size();
  return Status::Ok();
}

DeviceRun DeviceTier::RunAt(DevicePagePool* pool, uint32_t start, uint32_t n) const {
  DeviceRun run;
  run.gpu = pool->device();
  run.ptr = pool->SlotAt(start).ptr;
  run.bytes = uint64_t{n} * pool->page_size();
  for (const DeviceArena& arena : pool->arenas()) {
    if (run.ptr >= arena.base && run.ptr < arena.base + arena.bytes) {
      run.arena = arena.base;
      run.arena_bytes = arena.bytes;
    }
  }
  run.offset = run.ptr - run.arena;
  return run;
}

Result<DeviceRun> DeviceTier::MapReplicaRun(PageAddr region, std::span<const PageAddr> pages,
                                            uint32_t gpu, std::vector<HeldSlot>* held) {
  CallScope scope(this);
  NoteTouched(pages);
  DSVM_ASSIGN_OR_RETURN(const RunTarget target, CheckRun(region, pages, gpu));
  PageStore* store = target.store;
  DevicePagePool* pool = target.pool;
  const uint64_t ps = store->page_size();
  const uint32_t n = static_cast<uint32_t>(pages.size());
  for (PageAddr page : pages) {
    if (table_->IsLeaving(page)) {
      return FailedPrecondition("device tier: page " + Hex(page) + " is leaving the node");
    }
  }
  DSVM_RETURN_IF_ERROR(WriteBack(pages));  // the host bytes are the ones to copy
  DSVM_RETURN_IF_ERROR(MakeRoomFor(pool, n));
  if (n > pool->capacity_slots()) {
    return ResourceExhausted("device tier: a replica of " + std::to_string(n) + " pages is " +
                             "larger than gpu " + std::to_string(gpu) + "'s budget");
  }
  DSVM_ASSIGN_OR_RETURN(const uint32_t start, ChooseRunWindow(pool, n, {}));
  TierSteps evict;
  for (uint32_t i = 0; i < n; ++i) {
    const PageAddr q = OccupantOf(pool, start + i);
    if (q != kNoPage) {
      DSVM_RETURN_IF_ERROR(table_->EvictFromGpu(q, &evict));
      ++stats_.run_evictions;
    }
  }
  DSVM_RETURN_IF_ERROR(Execute(evict, nullptr));
  SyncCapacities(gpu);  // a new arena may have been taken
  DSVM_RETURN_IF_ERROR(table_->HoldFreeSlots(TableIndex(pool), n));
  std::vector<HeldSlot> taken;
  std::vector<Move> moves;
  for (uint32_t i = 0; i < n; ++i) {
    Result<DeviceSlot> slot = pool->Take(start + i);
    DSVM_CHECK_MSG(slot.ok(), slot.status().ToString());  // evicted or free just above
    OccupantOf(pool, slot->index);  // sizes the table
    occupants_[pool][slot->index] = kHeld;
    taken.push_back(HeldSlot{pool, *slot});
    held_[{pool, slot->index}] = HeldEntry{taken.back(), 1, kNoPage};
    moves.push_back(Move{pages[i], store, slot->ptr, static_cast<uint32_t>(ps),
                         ArenaEnd(pool, slot->ptr)});
  }
  if (Status s = CopyMovesToDevice(gpu, moves); !s.ok()) {
    Release(taken).IgnoreError();  // nothing else refers to them
    return s;
  }
  held->insert(held->end(), taken.begin(), taken.end());
  ++stats_.replica_runs;
  return RunAt(pool, start, n);
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
  CallScope scope(this);
  for (PageAddr page : pages) DSVM_RETURN_IF_ERROR(table_->Unpin(page));
  return Status::Ok();
}

Status DeviceTier::WriteBack(std::span<const PageAddr> pages) {
  CallScope scope(this);
  NoteTouched(pages);
  DSVM_RETURN_IF_ERROR(CheckPages(pages));
  if (!failed_.ok()) {
    // Pages whose host bytes are current need nothing; the others' bytes
    // are on a GPU the tier no longer copies from.
    for (PageAddr page : pages) {
      if (table_->IsDirty(page) || unsaved_.count(page) != 0) {
        return FailedPrecondition("device tier: failed earlier (" + failed_.ToString() +
                                  "); the current bytes of page " + Hex(page) +
                                  " are on a GPU only");
      }
    }
    return Status::Ok();
  }
  TierSteps steps;
  for (PageAddr page : pages) DSVM_RETURN_IF_ERROR(table_->PrepareHostRead(page, &steps));
  return Execute(steps, nullptr);
}

Status DeviceTier::Drop(std::span<const PageAddr> pages) {
  CallScope scope(this);
  NoteTouched(pages);
  DSVM_RETURN_IF_ERROR(CheckPages(pages));
  TierSteps steps;
  for (PageAddr page : pages) DSVM_RETURN_IF_ERROR(table_->Drop(page, &steps));
  return Execute(steps, nullptr);
}

Status DeviceTier::AddHostPage(PageAddr page, uint64_t tick) {
  CallScope scope(this);
  if (!failed_.ok())
    return FailedPrecondition("device tier: failed earlier: " + failed_.ToString());
  DSVM_RETURN_IF_ERROR(CheckPages(std::span<const PageAddr>(&page, 1)));
  TierSteps steps;
  DSVM_RETURN_IF_ERROR(table_->AddHostPage(page, tick, &steps));
  return Execute(steps, nullptr);
}

Status DeviceTier::EvictCopies(std::span<const PageAddr> pages) {
  CallScope scope(this);
  NoteTouched(pages);
  DSVM_RETURN_IF_ERROR(CheckPages(pages));
  // Failed: clean copies still go (no copy needed); dirty ones cannot.
  if (!failed_.ok()) DSVM_RETURN_IF_ERROR(WriteBack(pages));
  TierSteps steps;
  for (PageAddr page : pages) {
    if (!table_->GpuOf(page) || table_->PinsOf(page) != 0 || table_->IsLeaving(page)) continue;
    DSVM_RETURN_IF_ERROR(table_->EvictFromGpu(page, &steps));
  }
  return Execute(steps, nullptr);
}

Status DeviceTier::Detach(std::span<const PageAddr> pages, std::vector<HeldSlot>* held) {
  CallScope scope(this);
  NoteTouched(pages);
  DSVM_RETURN_IF_ERROR(CheckPages(pages));
  TierSteps steps;
  for (PageAddr page : pages) {
    auto it = slots_.find(page);
    if (it == slots_.end()) {
      // Detached just before for another map of the same pages (maps of
      // one range share slots): this map holds the slot too.
      if (auto d = detached_.find(page); d != detached_.end()) {
        HeldEntry& e = held_.at(d->second);
        ++e.holds;
        held->push_back(e.slot);
        continue;
      }
      DSVM_RETURN_IF_ERROR(table_->Drop(page, &steps));
      continue;
    }
    DSVM_RETURN_IF_ERROR(table_->DropHoldingSlot(page, &steps));
    const HeldSlot h{it->second.pool, it->second.slot};
    std::vector<PageAddr>& occ = occupants_[h.pool];
    if (h.slot.index < occ.size()) occ[h.slot.index] = kHeld;
    slots_.erase(it);
    const SlotKey key{h.pool, h.slot.index};
    held_[key] = HeldEntry{h, 1, page};
    detached_[page] = key;
    held->push_back(h);
  }
  Status s = Execute(steps, nullptr);  // frees only: cannot fail
  DSVM_CHECK_MSG(s.ok(), s.ToString());
  return Status::Ok();
}

Status DeviceTier::Release(std::span<const HeldSlot> held) {
  CallScope scope(this);
  for (const HeldSlot& h : held) {
    const SlotKey key{h.pool, h.slot.index};
    auto it = held_.find(key);
    if (it == held_.end()) {
      return InvalidArgument("device tier: slot " + std::to_string(h.slot.index) + " is not held");
    }
    if (--it->second.holds != 0) continue;  // another map holds it too
    if (auto d = detached_.find(it->second.page); d != detached_.end() && d->second == key) {
      detached_.erase(d);
    }
    held_.erase(it);
    DSVM_RETURN_IF_ERROR(table_->ReleaseHeldSlot(TableIndex(h.pool)));
    Status s = h.pool->Free(h.slot);
    DSVM_CHECK_MSG(s.ok(), s.ToString());
    std::vector<PageAddr>& occ = occupants_[h.pool];
    if (h.slot.index < occ.size()) occ[h.slot.index] = kNoPage;
    // The last slot of a removed region's pool: the pool goes.
    if (h.pool->used_slots() == 0) {
      auto retired = std::find_if(retired_.begin(), retired_.end(),
                                  [&](const auto& p) { return p.get() == h.pool; });
      if (retired != retired_.end()) {
        ForgetPool(h.pool);
        retired_.erase(retired);  // frees its arenas, their bytes back to the budget
      }
    }
  }
  return Status::Ok();
}

std::vector<PageAddr> DeviceTier::TakePagesToLeave() {
  CallScope scope(this);
  std::vector<PageAddr> out(leave_.begin(), leave_.end());
  leave_.clear();
  return out;
}

void DeviceTier::FreeSlotOf(PageAddr page) {
  auto it = slots_.find(page);
  DSVM_CHECK_MSG(it != slots_.end(), "device tier: no slot for " + Hex(page));
  Status s = it->second.pool->Free(it->second.slot);
  DSVM_CHECK_MSG(s.ok(), s.ToString());
  std::vector<PageAddr>& occ = occupants_[it->second.pool];
  if (it->second.slot.index < occ.size()) occ[it->second.slot.index] = kNoPage;
  slots_.erase(it);
  ++stats_.slots_freed;
}

DevicePtr DeviceTier::ArenaEnd(const DevicePagePool* pool, DevicePtr ptr) {
  std::vector<std::pair<DevicePtr, DevicePtr>>& sorted = arenas_[pool];
  uint64_t& generation = arena_generations_[pool];
  if (sorted.empty() || generation != pool->arena_generation()) {
    sorted.clear();
    for (const DeviceArena& a : pool->arenas()) {
      if (a.bytes != 0) sorted.emplace_back(a.base, a.base + a.bytes);  // 0: released
    }
    std::sort(sorted.begin(), sorted.end());
    generation = pool->arena_generation();
  }
  auto it = std::upper_bound(sorted.begin(), sorted.end(), std::make_pair(ptr, ~DevicePtr{0}));
  DSVM_CHECK(it != sorted.begin());
  --it;
  DSVM_CHECK(ptr >= it->first && ptr < it->second);
  return it->second;
}

Status DeviceTier::Execute(const TierSteps& steps, std::vector<PageAddr>* placed) {
  for (const TierStep& step : steps) NoteTouched(step.page);
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
    if (s.ok()) continue;
    if (s.code() == StatusCode::kInternal) {
      // The device failed: which of them reached their stores is not
      // known, none counts, and the tier copies no more.
      for (const auto& [g, ms] : by_gpu) {
        for (const Move& m : ms) unsaved_.insert(m.page);
      }
      return Fail(std::move(s));
    }
    // A store refused the bytes (full, a limit): the GPU copies are
    // intact. Those of this GPU and the ones after it stay, dirty, in
    // their slots (KeepDirtyCopies, after the rollback of the steps' new
    // placements when there are some), so nothing is lost; a later call
    // writes them back again. The other pages the steps take off a GPU
    // (clean, or written back by a GPU before this one) go as planned;
    // nothing is placed.
    std::unordered_set<PageAddr> kept;
    for (auto it = by_gpu.find(gpu); it != by_gpu.end(); ++it) {
      for (const Move& m : it->second) {
        keep_dirty_.emplace_back(m.page, it->first);
        kept.insert(m.page);
      }
    }
    for (const TierStep& step : steps) {
      if (step.kind == TierStepKind::kFreeSlot && kept.count(step.page) == 0) FreeSlotOf(step.page);
    }
    ++stats_.write_backs_failed;
    const bool places = std::any_of(steps.begin(), steps.end(), [](const TierStep& t) {
      return t.kind == TierStepKind::kAllocateSlot;
    });
    if (!places) KeepDirtyCopies();
    return s;
  }
  // 2. Slots freed, then taken.
  for (const TierStep& step : steps) {
    if (step.kind == TierStepKind::kFreeSlot) FreeSlotOf(step.page);
  }
  auto place = [&](DevicePagePool* pool, PageAddr page, DeviceSlot slot) {
    slots_[page] = Placed{pool, slot};
    OccupantOf(pool, slot.index);  // sizes the table
    occupants_[pool][slot.index] = page;
    if (placed != nullptr) placed->push_back(page);
  };
  // Slots a run must take first; then, per pool, the others in address
  // order of their pages: a pool hands out freed slots last-freed first,
  // and pages freed in order would come back in the opposite one, so
  // neighbouring pages would no longer copy as one.
  std::map<DevicePagePool*, std::vector<PageAddr>> fresh;
  for (const TierStep& step : steps) {
    if (step.kind != TierStepKind::kAllocateSlot) continue;
    PageStore* store = StoreOf(step.page);
    DSVM_CHECK(store != nullptr);
    DevicePagePool* pool = MutablePoolOf(step.gpu, store->base());
    DSVM_CHECK(pool != nullptr);
    auto forced = forced_.find(step.page);
    if (forced == forced_.end()) {
      fresh[pool].push_back(step.page);
      continue;
    }
    DSVM_ASSIGN_OR_RETURN(DeviceSlot slot, pool->Take(forced->second));
    place(pool, step.page, slot);
  }
  for (auto& [pool, pages] : fresh) {
    std::vector<DeviceSlot> got;
    for (size_t i = 0; i < pages.size(); ++i) {
      Result<DeviceSlot> slot = pool->Allocate();
      if (!slot.ok()) {
        for (const DeviceSlot& g : got) pool->Free(g).IgnoreError();
        return slot.status();
      }
      got.push_back(*slot);
    }
    std::sort(pages.begin(), pages.end());
    std::sort(got.begin(), got.end(),
              [](const DeviceSlot& a, const DeviceSlot& b) { return a.index < b.index; });
    for (size_t i = 0; i < pages.size(); ++i) place(pool, pages[i], got[i]);
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
  if (!options_.keep_alive) return backend_->Wait(lane.fence);
  for (;;) {
    Result<bool> done = backend_->WaitFor(lane.fence, options_.keep_alive_every);
    in_keep_alive_ = true;
    options_.keep_alive();
    in_keep_alive_ = false;
    if (!done.ok()) return done.status();
    if (*done) return Status::Ok();
  }
}

Status DeviceTier::DrainAll(std::vector<Lane>& lanes, Status first) {
  // The first error is the one reported, unless the device failed after
  // it: a store's refusal must not hide that (Execute keeps copies only
  // on a device that works).
  for (Lane& lane : lanes) {
    Status s = Drain(lane);
    if (!s.ok() && s.code() == StatusCode::kInternal && first.code() != StatusCode::kInternal) {
      first = std::move(s);
    }
  }
  return first;
}

std::vector<DeviceTier::Batch> DeviceTier::SplitBatches(const std::vector<Move>& moves) const {
  std::vector<Batch> batches;
  size_t i = 0;
  while (i < moves.size()) {
    const size_t begin = i;
    uint64_t bytes = 0;
    while (i < moves.size() && bytes + moves[i].bytes <= options_.batch_bytes) bytes += moves[i++].bytes;
    DSVM_CHECK(i > begin);  // batch_bytes >= every page size (Create)
    batches.push_back(Batch{begin, i, bytes});
  }
  return batches;
}

Status DeviceTier::StageToDevice(const std::vector<Move>& moves, Batch batch,
                                 const StagingBuffer& staging,
                                 std::vector<HostToDevice>* entries) {
  entries->clear();
  uint64_t off = 0;
  DevicePtr last_arena_end = 0;
  for (size_t i = batch.begin; i < batch.end; ++i) {
    const Move& m = moves[i];
    uint8_t* dst = staging.data + off;
    DSVM_RETURN_IF_ERROR(m.store->ReadForCopy(m.page, std::span<uint8_t>(dst, m.bytes)));
    HostToDevice* last = entries->empty() ? nullptr : &entries->back();
    if (last != nullptr && static_cast<const uint8_t*>(last->src) + last->bytes == dst &&
        last->dst + last->bytes == m.ptr && m.ptr + m.bytes <= last_arena_end) {
      last->bytes += m.bytes;  // adjacent slots: one larger copy
    } else {
      entries->push_back(HostToDevice{dst, m.ptr, m.bytes});
      last_arena_end = m.arena_end;
    }
    off += m.bytes;
  }
  return Status::Ok();
}

Status DeviceTier::UnstageToStores(const std::vector<Move>& moves, Batch batch,
                                   const StagingBuffer& staging) {
  uint64_t off = 0;
  for (size_t i = batch.begin; i < batch.end; ++i) {
    const Move& m = moves[i];
    if (!m.store->IsRetained(m.page)) {
      DSVM_RETURN_IF_ERROR(m.store->WriteUnretained(
          m.page, std::span<const uint8_t>(staging.data + off, m.bytes)));
    }
    off += m.bytes;
  }
  return Status::Ok();
}

Status DeviceTier::ParallelFor(size_t n, const std::function<Status(size_t)>& fn) {
  std::vector<Status> results(n);
  // An exception (bad_alloc building a message) becomes the task's error:
  // one escaping here would leave the other tasks with dangling state.
  auto run = [&](size_t k) {
    try {
      results[k] = fn(k);
    } catch (const std::exception& e) {
      results[k] = Internal(std::string("device tier: copy thread: ") + e.what());
    }
  };
  if (copiers_ == nullptr || n <= 1) {
    for (size_t k = 0; k < n; ++k) run(k);
  } else {
    copying_.store(true, std::memory_order_relaxed);
    std::latch done(static_cast<std::ptrdiff_t>(n - 1));
    for (size_t k = 1; k < n; ++k) {
      boost::asio::post(copiers_->pool, [&, k] {
        run(k);
        done.count_down();
      });
    }
    run(0);
    done.wait();
    copying_.store(false, std::memory_order_relaxed);
  }
  for (Status& s : results) {
    if (!s.ok()) return std::move(s);
  }
  return Status::Ok();
}

Status DeviceTier::CopyMovesToDevice(uint32_t gpu, const std::vector<Move>& all_moves) {
  std::vector<Lane>& lanes = lanes_[gpu];
  const size_t wave = options_.copy_threads;
  DSVM_CHECK(lanes.size() >= 2 * wave);
  // On an error, wait for what was queued: the caller may free its slots.
  // A device error (kInternal) may leave a copy queued with no fence after
  // it; the backend must not be used further (its contract): the tier fails.
  auto drain_all = [&](Status s) {
    s = DrainAll(direct_lanes_[gpu], DrainAll(lanes, std::move(s)));
    return s.code() == StatusCode::kInternal ? Fail(std::move(s)) : s;
  };
  auto lane_of = [&](size_t batch) -> Lane& { return lanes[batch % lanes.size()]; };
  // Direct copies first, on their own streams: the device moves them
  // while the rest is staged.
  std::vector<Move> moves = all_moves;
  if (Status s = QueueDirect(gpu, TakeDirect(&moves), /*to_device=*/true); !s.ok()) {
    return drain_all(std::move(s));
  }
  const std::vector<Batch> batches = SplitBatches(moves);
  std::vector<std::vector<HostToDevice>> entries(wave);
  for (size_t w = 0; w < batches.size(); w += wave) {
    const size_t n = std::min(wave, batches.size() - w);
    // A lane's staging buffer is free once its previous batch is done;
    // meanwhile the previous wave's copies (on other lanes) run.
    for (size_t k = 0; k < n; ++k) {
      Status s = Drain(lane_of(w + k));
      if (!s.ok()) return drain_all(std::move(s));
    }
    Status s = ParallelFor(n, [&](size_t k) {
      return StageToDevice(moves, batches[w + k], lane_of(w + k).staging, &entries[k]);
    });
    if (!s.ok()) return drain_all(std::move(s));
    for (size_t k = 0; k < n; ++k) {
      Lane& lane = lane_of(w + k);
      s = backend_->CopyToDevice(lane.stream, entries[k]);
      if (!s.ok()) return drain_all(std::move(s));
      Result<Fence> f = backend_->RecordFence(lane.stream);
      if (!f.ok()) return drain_all(f.status());
      lane.fence = *f;
      lane.busy = true;
      ++stats_.to_device_calls;
      stats_.to_device_entries += entries[k].size();
      stats_.pages_to_device += batches[w + k].end - batches[w + k].begin;
      stats_.bytes_to_device += batches[w + k].bytes;
    }
  }
  Status first_error;
  for (auto* all : {&lanes, &direct_lanes_[gpu]}) {
    for (Lane& lane : *all) {
      Status s = Drain(lane);
      if (first_error.ok() && !s.ok()) first_error = std::move(s);
    }
  }
  return first_error.code() == StatusCode::kInternal ? Fail(std::move(first_error)) : first_error;
}

Status DeviceTier::WriteBackMoves(uint32_t gpu, const std::vector<Move>& all_moves) {
  std::vector<Lane>& lanes = lanes_[gpu];
  const size_t wave = options_.copy_threads;
  DSVM_CHECK(lanes.size() >= 2 * wave);
  std::vector<Lane>& direct_lanes = direct_lanes_[gpu];
  auto drain_all = [&](Status s) { return DrainAll(direct_lanes, DrainAll(lanes, std::move(s))); };
  auto lane_of = [&](size_t batch) -> Lane& { return lanes[batch % lanes.size()]; };
  // Direct copies first, into the stores' memfds, on their own streams,
  // while the rest goes through staging below.
  std::vector<Move> moves = all_moves;
  if (Status s = QueueDirect(gpu, TakeDirect(&moves), /*to_device=*/false); !s.ok()) {
    return drain_all(std::move(s));
  }
  const std::vector<Batch> batches = SplitBatches(moves);
  // Queues batch b's copy into its lane's staging.
  std::vector<DeviceToHost> entries;
  auto queue = [&](size_t b) -> Status {
    Lane& lane = lane_of(b);
    // Its previous batch was two waves ago, and has been written out.
    DSVM_CHECK(!lane.busy);
    entries.clear();
    uint64_t off = 0;
    DevicePtr last_arena_end = 0;
    for (size_t i = batches[b].begin; i < batches[b].end; ++i) {
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
    }
    DSVM_RETURN_IF_ERROR(backend_->CopyToHost(lane.stream, entries));
    DSVM_ASSIGN_OR_RETURN(lane.fence, backend_->RecordFence(lane.stream));
    lane.busy = true;
    ++stats_.to_host_calls;
    stats_.to_host_entries += entries.size();
    stats_.pages_to_host += batches[b].end - batches[b].begin;
    stats_.bytes_to_host += off;
    return Status::Ok();
  };
  // Waits for the wave of n batches from w and hands their pages to their
  // stores: at once on the copy threads, then the retained ones here.
  auto complete = [&](size_t w, size_t n) -> Status {
    for (size_t k = 0; k < n; ++k) DSVM_RETURN_IF_ERROR(Drain(lane_of(w + k)));
    DSVM_RETURN_IF_ERROR(ParallelFor(n, [&](size_t k) {
      return UnstageToStores(moves, batches[w + k], lane_of(w + k).staging);
    }));
    for (size_t k = 0; k < n; ++k) {
      uint64_t off = 0;
      for (size_t i = batches[w + k].begin; i < batches[w + k].end; ++i) {
        const Move& m = moves[i];
        if (m.store->IsRetained(m.page)) {
          DSVM_RETURN_IF_ERROR(m.store->WritePage(
              m.page, std::span<const uint8_t>(lane_of(w + k).staging.data + off, m.bytes)));
        }
        off += m.bytes;
      }
    }
    return Status::Ok();
  };
  // While one wave's copies run, the previous wave goes to the stores.
  for (size_t w = 0; w < batches.size(); w += wave) {
    const size_t n = std::min(wave, batches.size() - w);
    for (size_t k = 0; k < n; ++k) {
      Status s = queue(w + k);
      if (!s.ok()) return drain_all(std::move(s));
    }
    if (w >= wave) {
      Status s = complete(w - wave, wave);
      if (!s.ok()) return drain_all(std::move(s));
    }
  }
  if (!batches.empty()) {
    const size_t last = (batches.size() - 1) / wave * wave;
    Status s = complete(last, batches.size() - last);
    if (!s.ok()) return drain_all(std::move(s));
  }
  for (Lane& lane : direct_lanes) {
    Status s = Drain(lane);
    if (!s.ok()) return drain_all(std::move(s));
  }
  return Status::Ok();
}

}  // namespace dsvm::node
