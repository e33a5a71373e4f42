#include "node/memory/device_page_pool.h"

#include <algorithm>
#include <string>
#include <utility>

#include "proto/text.h"

namespace dsvm::node {
namespace {

bool ValidPageSize(uint32_t page_size) {
  return page_size == 4096 || page_size == (64u << 10) || page_size == (2u << 20);
}

}  // namespace

Result<std::unique_ptr<DevicePagePool>> DevicePagePool::Create(DeviceBackend* backend,
                                                               DevicePagePoolOptions options) {
  if (backend == nullptr) return InvalidArgument("device page pool without a backend");
  if (options.device >= backend->device_count()) {
    return InvalidArgument("device " + std::to_string(options.device) + " does not exist: the " +
                           std::string(backend->name()) + " backend has " +
                           std::to_string(backend->device_count()) + " device(s)");
  }
  if (!ValidPageSize(options.page_size)) {
    return InvalidArgument("page size " + std::to_string(options.page_size) +
                           " is not 4096, 65536 or 2097152");
  }
  const uint64_t page = options.page_size;
  if (options.arena_bytes == 0 || options.arena_bytes % page != 0) {
    return InvalidArgument("arena size " + std::to_string(options.arena_bytes) +
                           " is not a positive multiple of the page size " + std::to_string(page));
  }
  const uint64_t slots = options.budget_bytes / page;
  if (slots == 0 || slots > kMaxSlots) {
    return InvalidArgument("budget of " + std::to_string(options.budget_bytes) + " bytes holds " +
                           std::to_string(slots) + " pages of " + std::to_string(page) +
                           " bytes; a pool holds 1 to " + std::to_string(kMaxSlots));
  }
  return std::unique_ptr<DevicePagePool>(new DevicePagePool(backend, options, slots * page));
}

DevicePagePool::DevicePagePool(DeviceBackend* backend, DevicePagePoolOptions options,
                               uint64_t budget_bytes)
    : backend_(backend),
      options_(options),
      budget_bytes_(budget_bytes) {}

DevicePagePool::~DevicePagePool() {
  for (const DeviceArena& a : arenas_) {
    if (a.bytes == 0) continue;  // released
    // Nothing to do about a device error at teardown; the backend reports
    // the device's state on its next call.
    backend_->FreeArena(a.base).IgnoreError();
    if (options_.shared != nullptr) options_.shared->Give(a.bytes);
  }
}

size_t DevicePagePool::ArenaOf(uint32_t index) const {
  auto it = std::upper_bound(arena_first_.begin(), arena_first_.end(), index);
  DSVM_CHECK(it != arena_first_.begin());
  return static_cast<size_t>(it - arena_first_.begin()) - 1;
}

DevicePtr DevicePagePool::SlotPtr(uint32_t index) const {
  const size_t a = ArenaOf(index);
  return arenas_[a].base + uint64_t{index - arena_first_[a]} * options_.page_size;
}

SlotRange DevicePagePool::ArenaSlots(size_t arena) const {
  DSVM_CHECK(arena < arenas_.size());
  return SlotRange{arena_first_[arena], ArenaLive(arena) ? arena_slots_[arena] : 0};
}

uint64_t DevicePagePool::room_bytes() const {
  const uint64_t own = budget_bytes_ - held_bytes_;
  const uint64_t room = options_.shared != nullptr ? std::min(own, options_.shared->free_bytes()) : own;
  return room / options_.page_size * options_.page_size;
}

void DevicePagePool::PushFree(uint32_t index) {
  link_[index] = free_head_;
  prev_[index] = kEnd;
  if (free_head_ != kEnd) prev_[free_head_] = index;
  free_head_ = index;
}

void DevicePagePool::UnlinkFree(uint32_t index) {
  const uint32_t next = link_[index];
  const uint32_t prev = prev_[index];
  if (prev == kEnd) {
    free_head_ = next;
  } else {
    link_[prev] = next;
  }
  if (next != kEnd) prev_[next] = prev;
  link_[index] = kUsed;
}

Status DevicePagePool::Grow(uint64_t bytes) {
  const uint64_t page = options_.page_size;
  DSVM_CHECK(bytes > 0 && bytes % page == 0);
  if (bytes > room_bytes()) {
    return ResourceExhausted("HBM budget reached on device " + std::to_string(options_.device) +
                             ": " + std::to_string(held_bytes_ / page) + " pages of " +
                             std::to_string(page) + " bytes are held, " +
                             std::to_string(bytes / page) + " more do not fit (budget " +
                             std::to_string(budget_bytes_) + " bytes" +
                             (options_.shared != nullptr
                                  ? ", " + std::to_string(options_.shared->free_bytes()) +
                                        " bytes free of the GPU's " +
                                        std::to_string(options_.shared->bytes())
                                  : std::string()) +
                             ")");
  }
  if (options_.shared != nullptr) DSVM_CHECK(options_.shared->Take(bytes));
  auto arena = backend_->AllocateArena(options_.device, bytes);
  if (!arena.ok()) {
    if (options_.shared != nullptr) options_.shared->Give(bytes);
    return Status(arena.status().code(),
                  "device page pool below its budget (" + std::to_string(held_bytes_) + " of " +
                      std::to_string(budget_bytes_) + " bytes held): " + arena.status().message());
  }
  DSVM_CHECK(arena->bytes == bytes);
  const uint32_t count = static_cast<uint32_t>(bytes / page);
  // A released arena of the same size gives its indices; else new ones.
  size_t a = 0;
  while (a < arenas_.size() && (ArenaLive(a) || arena_slots_[a] != count)) ++a;
  if (a == arenas_.size()) {
    arenas_.push_back(*arena);
    arena_first_.push_back(static_cast<uint32_t>(link_.size()));
    arena_slots_.push_back(count);
    link_.resize(link_.size() + count, kUsed);
    prev_.resize(link_.size(), kEnd);
    DSVM_CHECK(link_.size() <= kMaxSlots);
  } else {
    arenas_[a] = *arena;
  }
  const uint32_t first = arena_first_[a];
  held_bytes_ += bytes;
  ++generation_;
  // Lowest address ends up first: fresh slots go out in address order, so
  // pages allocated one after another sit in adjacent slots.
  for (uint32_t i = count; i-- > 0;) {
    link_[first + i] = kUsed;
    PushFree(first + i);
  }
  last_grown_ = a;
  return Status::Ok();
}

Result<uint64_t> DevicePagePool::ReleaseEmptyArenas() {
  uint64_t freed = 0;
  Status first_error;
  for (size_t a = 0; a < arenas_.size(); ++a) {
    if (!ArenaLive(a)) continue;
    const uint32_t first = arena_first_[a];
    const uint32_t count = arena_slots_[a];
    bool empty = true;
    for (uint32_t i = first; i < first + count && empty; ++i) empty = IsFree(i);
    if (!empty) continue;
    for (uint32_t i = first; i < first + count; ++i) {
      UnlinkFree(i);
      link_[i] = kReleased;
    }
    Status st = backend_->FreeArena(arenas_[a].base);
    if (!st.ok() && first_error.ok()) first_error = st;
    const uint64_t bytes = arenas_[a].bytes;
    held_bytes_ -= bytes;
    if (options_.shared != nullptr) options_.shared->Give(bytes);
    freed += bytes;
    arenas_[a] = DeviceArena{};
    ++generation_;
  }
  if (!first_error.ok()) return first_error;
  return freed;
}

Result<DeviceSlot> DevicePagePool::Allocate() {
  if (free_head_ == kEnd) {
    if (room_bytes() < options_.page_size) {
      return ResourceExhausted("HBM budget reached on device " + std::to_string(options_.device) +
                               ": all " + std::to_string(used_) + " pages of " +
                               std::to_string(options_.page_size) + " bytes are in use");
    }
    // An arena is cut to the room left.
    DSVM_RETURN_IF_ERROR(Grow(std::min(options_.arena_bytes, room_bytes())));
  }
  const uint32_t index = free_head_;
  UnlinkFree(index);
  ++used_;
  return DeviceSlot{SlotPtr(index), index};
}

Result<DeviceSlot> DevicePagePool::Take(uint32_t index) {
  if (index >= link_.size() || !IsFree(index)) {
    return InvalidArgument("slot " + std::to_string(index) + " is not a free slot of this pool");
  }
  UnlinkFree(index);
  ++used_;
  return DeviceSlot{SlotPtr(index), index};
}

Status DevicePagePool::Free(DeviceSlot slot) {
  if (slot.index >= link_.size() || link_[slot.index] != kUsed ||
      SlotPtr(slot.index) != slot.ptr) {
    return InvalidArgument("slot " + std::to_string(slot.index) + " at device address " +
                           Hex(slot.ptr) + " is not a slot in use in this pool");
  }
  PushFree(slot.index);
  --used_;
  return Status::Ok();
}

Result<size_t> DevicePagePool::GrowForRun(uint32_t n) {
  if (n == 0) return InvalidArgument("a run of 0 slots");
  const uint64_t page = options_.page_size;
  const uint64_t want = uint64_t{n} * page;
  const uint64_t room = room_bytes();
  if (want > room) {
    return ResourceExhausted("a run of " + std::to_string(n) + " pages of " +
                             std::to_string(page) + " bytes needs a new arena on device " +
                             std::to_string(options_.device) + ", but the HBM budget leaves " +
                             std::to_string(room) + " bytes");
  }
  // A regular arena when the run fits one (cut to the room left); else a
  // dedicated arena of exactly the run.
  const uint64_t bytes = want <= options_.arena_bytes ? std::min(options_.arena_bytes, room) : want;
  DSVM_RETURN_IF_ERROR(Grow(bytes));
  return last_grown_;
}

Result<DeviceSlot> DevicePagePool::AllocateRun(uint32_t n) {
  if (n == 0) return InvalidArgument("a run of 0 slots");
  for (size_t a = 0; a < arenas_.size(); ++a) {
    const SlotRange r = ArenaSlots(a);
    uint32_t run = 0;
    for (uint32_t i = r.first; i < r.first + r.count; ++i) {
      run = IsFree(i) ? run + 1 : 0;
      if (run == n) {
        const uint32_t first = i + 1 - n;
        for (uint32_t k = first; k <= i; ++k) UnlinkFree(k);
        used_ += n;
        return DeviceSlot{SlotPtr(first), first};
      }
    }
  }
  Result<size_t> a = GrowForRun(n);
  if (!a.ok()) {
    return Status(a.status().code(), "no arena has " + std::to_string(n) +
                                         " adjacent free slots: " + a.status().message());
  }
  const uint32_t first = ArenaSlots(*a).first;
  for (uint32_t k = first; k < first + n; ++k) UnlinkFree(k);
  used_ += n;
  return DeviceSlot{SlotPtr(first), first};
}

}  // namespace dsvm::node
