// DevicePagePool: fixed-size page slots in one device's memory, under a byte
// budget (the per-GPU HBM budget of issue #5).
//
// One pool serves one device and one page size (4 KiB, 64 KiB or 2 MiB); a
// node holds one pool per (GPU, page size) in use. Slots are carved from
// arenas that the pool allocates from its DeviceBackend on demand, one arena
// at a time, until the arenas' bytes reach the budget. Budget therefore means
// device memory held, not slots in use: a pool never holds more than
// budget_bytes (rounded down to a whole number of pages) of the device.
//
// Allocate and Free are O(1): a freed slot goes on an intrusive, doubly
// linked free list (reused last-freed first, while it is likely still in the
// caches); a new arena's slots join the list in address order; only growing
// by an arena calls the backend. Arenas are kept until the pool is destroyed.
//
// Runs (dsvm_gpu_map): AllocateRun(n) takes n adjacent slots of one arena,
// so that n pages in address order form one contiguous device range behind
// one device pointer. It takes the first n adjacent free slots of an arena
// (first fit, in arena order), or grows by an arena that holds them: a
// regular arena when n fits one, else a dedicated arena of exactly n pages
// (a run never spans two arenas: they are separate device allocations).
// Taking a slot out of the middle of the free list is O(1) (Take); a run
// search is O(slots held). The pool knows nothing of what slots hold, so a
// run that needs evictions is the DeviceTier's to find (ArenaSlots, IsFree,
// Take, GrowForRun).
// TODO(#5): give back arenas whose slots are all free, when eviction wants
// the device memory for another pool.
//
// The pool does bookkeeping only: it never copies bytes. Writing and reading
// a slot is the caller's business, through the backend's copies.
//
// Thread safety: none; single-threaded. One owner (the daemon's GPU strand)
// calls every method, the same owner as the backend's.
#ifndef DSVM_NODE_MEMORY_DEVICE_PAGE_POOL_H_
#define DSVM_NODE_MEMORY_DEVICE_PAGE_POOL_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "node/memory/device_backend.h"
#include "proto/status.h"

namespace dsvm::node {

struct DevicePagePoolOptions {
  uint32_t device = 0;
  // 4096, 65536 or 2097152.
  uint32_t page_size = 2u << 20;
  // Device memory the pool may hold, rounded down to a multiple of
  // page_size; at least one page.
  uint64_t budget_bytes = 0;
  // Size of each arena (a multiple of page_size); the last arena is smaller
  // when the budget leaves less.
  uint64_t arena_bytes = 64ull << 20;
};

// A page slot: its device address and its index in the pool. Returned by
// Allocate, handed back to Free.
struct DeviceSlot {
  DevicePtr ptr = 0;
  uint32_t index = 0;
};

// Slots [first, first + count) of the pool, all in one arena.
struct SlotRange {
  uint32_t first = 0;
  uint32_t count = 0;
};

class DevicePagePool {
 public:
  // A pool on `backend`, which must outlive it. Holds no arena yet.
  // Errors: kInvalidArgument (backend null, unknown device, page size not
  // one of the three, budget below one page or above 2^32 - 16 pages, arena
  // size not a positive multiple of the page size).
  static Result<std::unique_ptr<DevicePagePool>> Create(DeviceBackend* backend,
                                                        DevicePagePoolOptions options);
  // Frees every arena, slots still in use included.
  ~DevicePagePool();
  DevicePagePool(const DevicePagePool&) = delete;
  DevicePagePool& operator=(const DevicePagePool&) = delete;

  // A free slot, growing the pool by an arena when every carved slot is in
  // use. Its bytes are whatever the slot held before. Errors:
  // kResourceExhausted (the budget is reached and every slot is in use; or
  // the device itself has no room for another arena), kInternal (from the
  // backend).
  Result<DeviceSlot> Allocate();
  // Returns a slot to the pool. Errors: kInvalidArgument (not a slot of this
  // pool, or not in use: a double free).
  Status Free(DeviceSlot slot);

  // n adjacent free slots of one arena, taken (see "Runs" above); the first
  // is returned, slot first.index + i is at first.ptr + i * page_size(). Each
  // slot of a run is an ordinary slot afterwards (Free them one by one).
  // Errors: kInvalidArgument (n is 0), kResourceExhausted (no arena has n
  // adjacent free slots and the budget leaves no room for one that would;
  // or the device is full below the budget), kInternal.
  Result<DeviceSlot> AllocateRun(uint32_t n);

  // The pieces AllocateRun is made of, for a caller that may free slots to
  // make a run (DeviceTier::MapRun).
  // The slots of arena `arena` (< arena_count()).
  SlotRange ArenaSlots(size_t arena) const;
  // True when slot `index` (< arena_slots()) is free.
  bool IsFree(uint32_t index) const { return link_[index] != kUsed; }
  // The slot at `index`, used or not. REQUIRES: index < arena_slots().
  DeviceSlot SlotAt(uint32_t index) const { return DeviceSlot{SlotPtr(index), index}; }
  // Takes the free slot `index`. Errors: kInvalidArgument (out of range, or
  // in use).
  Result<DeviceSlot> Take(uint32_t index);
  // Grows by an arena holding at least n slots (a regular arena when n fits
  // one, else a dedicated one of n pages); returns the new arena's index.
  // Errors: kInvalidArgument (n is 0), kResourceExhausted (the budget leaves
  // no room for it, or the device is full), kInternal.
  Result<size_t> GrowForRun(uint32_t n);

  uint32_t device() const { return options_.device; }
  uint32_t page_size() const { return options_.page_size; }
  uint64_t budget_bytes() const { return budget_bytes_; }
  // Slots the budget allows.
  uint64_t capacity_slots() const { return budget_bytes_ / options_.page_size; }
  uint64_t used_slots() const { return used_; }
  uint64_t used_bytes() const { return used_ * options_.page_size; }
  // Slots in the arenas held so far (in use or free).
  uint64_t arena_slots() const { return link_.size(); }
  size_t arena_count() const { return arenas_.size(); }
  // Device memory held: the arenas' bytes. Never above budget_bytes().
  uint64_t arena_bytes() const { return held_bytes_; }
  std::span<const DeviceArena> arenas() const { return arenas_; }

 private:
  // link_ values besides the index of the next free slot.
  static constexpr uint32_t kUsed = 0xffffffffu;
  static constexpr uint32_t kEnd = 0xfffffffdu;  // the free list's last (prev_: first) slot
  static constexpr uint64_t kMaxSlots = 0xfffffff0u;

  DevicePagePool(DeviceBackend* backend, DevicePagePoolOptions options, uint64_t budget_bytes);

  // Allocates one more arena of `bytes` and puts its slots on the free
  // list, lowest address first.
  Status Grow(uint64_t bytes);
  DevicePtr SlotPtr(uint32_t index) const;
  size_t ArenaOf(uint32_t index) const;
  void PushFree(uint32_t index);
  void UnlinkFree(uint32_t index);

  DeviceBackend* const backend_;
  const DevicePagePoolOptions options_;
  const uint64_t budget_bytes_;
  std::vector<DeviceArena> arenas_;
  std::vector<uint32_t> arena_first_;  // per arena, its first slot's index (ascending)
  uint64_t held_bytes_ = 0;
  // Per slot of the held arenas: kUsed, or (free) the next free slot's
  // index or kEnd; prev_: (free) the previous free slot's index or kEnd.
  std::vector<uint32_t> link_;
  std::vector<uint32_t> prev_;
  uint32_t free_head_ = kEnd;
  uint64_t used_ = 0;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_DEVICE_PAGE_POOL_H_
