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
      budget_bytes_(budget_bytes),
      slots_per_arena_(options.arena_bytes / options.page_size) {}

DevicePagePool::~DevicePagePool() {
  for (const DeviceArena& a : arenas_) {
    // Nothing to do about a device error at teardown; the backend reports
    // the device's state on its next call.
    backend_->FreeArena(a.base).IgnoreError();
  }
}

DevicePtr DevicePagePool::SlotPtr(uint32_t index) const {
  const DeviceArena& arena = arenas_[index / slots_per_arena_];
  return arena.base + (index % slots_per_arena_) * options_.page_size;
}

Status DevicePagePool::Grow() {
  const uint64_t page = options_.page_size;
  if (held_bytes_ + page > budget_bytes_) {
    return ResourceExhausted("HBM budget of " + std::to_string(budget_bytes_) +
                             " bytes reached on device " + std::to_string(options_.device) +
                             ": all " + std::to_string(capacity_slots()) + " pages of " +
                             std::to_string(page) + " bytes are in use");
  }
  // Only the last arena may be short of arena_bytes (SlotPtr relies on it).
  const uint64_t bytes = std::min(options_.arena_bytes, budget_bytes_ - held_bytes_);
  auto arena = backend_->AllocateArena(options_.device, bytes);
  if (!arena.ok()) {
    return Status(arena.status().code(),
                  "device page pool below its budget (" + std::to_string(held_bytes_) + " of " +
                      std::to_string(budget_bytes_) + " bytes held): " + arena.status().message());
  }
  DSVM_CHECK(arena->bytes == bytes);
  arenas_.push_back(*arena);
  held_bytes_ += bytes;
  link_.resize(link_.size() + bytes / page, kUncarved);
  DSVM_CHECK(link_.size() <= kMaxSlots);
  return Status::Ok();
}

Result<DeviceSlot> DevicePagePool::Allocate() {
  uint32_t index;
  if (free_head_ != kEnd) {
    index = free_head_;
    free_head_ = link_[index];
  } else {
    if (next_uncarved_ == link_.size()) DSVM_RETURN_IF_ERROR(Grow());
    index = static_cast<uint32_t>(next_uncarved_++);
  }
  DSVM_CHECK(link_[index] != kUsed);
  link_[index] = kUsed;
  ++used_;
  return DeviceSlot{SlotPtr(index), index};
}

Status DevicePagePool::Free(DeviceSlot slot) {
  if (slot.index >= next_uncarved_ || link_[slot.index] != kUsed ||
      SlotPtr(slot.index) != slot.ptr) {
    return InvalidArgument("slot " + std::to_string(slot.index) + " at device address " +
                           Hex(slot.ptr) + " is not a slot in use in this pool");
  }
  link_[slot.index] = free_head_;
  free_head_ = slot.index;
  --used_;
  return Status::Ok();
}

}  // namespace dsvm::node
