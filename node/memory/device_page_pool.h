// DevicePagePool: fixed-size page slots in one device's memory, under a byte
// budget (the per-GPU HBM budget of issue #5).
//
// One pool serves one device and one page size (4 KiB, 64 KiB or 2 MiB); the
// GPU tier holds one pool per (GPU, region), so that an arena never holds
// two regions' pages (DeviceTier). Slots are carved from
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
// One budget per GPU: the pools of one device may share a DeviceBudget,
// from which each takes an arena's bytes to grow and to which
// ReleaseEmptyArenas gives back the arenas whose slots are all free, so
// device memory moves between pools an arena at a time. A released
// arena keeps its slot indices (they are never reused by another arena); a
// later arena of the same size takes its place (new device memory, the same
// indices), so indices stay bounded.
//
// The pool does bookkeeping only: it never copies bytes. Writing and reading
// a slot is the caller's business, through the backend's copies.
//
// Thread safety: none; single-threaded. One owner (the daemon's GPU strand)
// calls every method, the same owner as the backend's.
#ifndef DSVM_NODE_MEMORY_DEVICE_PAGE_POOL_H_
#define DSVM_NODE_MEMORY_DEVICE_PAGE_POOL_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "node/memory/device_backend.h"
#include "proto/status.h"

namespace dsvm::node {

// The device memory one GPU may give region pages, shared by its pools (see
// above). Single-threaded, as the pools.
class DeviceBudget {
 public:
  explicit DeviceBudget(uint64_t bytes) : bytes_(bytes) {}
  uint64_t bytes() const { return bytes_; }
  uint64_t taken() const { return taken_; }
  uint64_t free_bytes() const { return bytes_ - taken_; }
  // False (and nothing taken) when fewer than n bytes are free.
  bool Take(uint64_t n) {
    if (n > free_bytes()) return false;
    taken_ += n;
    return true;
  }
  void Give(uint64_t n) { taken_ -= std::min(n, taken_); }

 private:
  const uint64_t bytes_;
  uint64_t taken_ = 0;
};

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
  // The GPU's budget, shared with its other pools; must outlive the pool.
  // Null: budget_bytes alone bounds the pool. With one, the pool holds at
  // most budget_bytes and what the shared budget lets it take.
  DeviceBudget* shared = nullptr;
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
  bool IsFree(uint32_t index) const { return link_[index] != kUsed && link_[index] != kReleased; }
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

  // Frees every arena whose slots are all free and gives its bytes back to
  // the shared budget; returns the bytes freed. Errors: kInternal (from
  // the backend; the arena is forgotten all the same).
  Result<uint64_t> ReleaseEmptyArenas();
  // Whether arena `arena` (< arena_count()) holds device memory now.
  bool ArenaLive(size_t arena) const { return arenas_[arena].bytes != 0; }
  // Changes whenever an arena is added, released or takes a released
  // arena's place (device addresses of slots may change).
  uint64_t arena_generation() const { return generation_; }

  uint32_t device() const { return options_.device; }
  uint32_t page_size() const { return options_.page_size; }
  uint64_t budget_bytes() const { return budget_bytes_; }
  // Bytes the pool may still take for arenas: its own budget's rest, and
  // no more than the shared budget has free.
  uint64_t room_bytes() const;
  // Slots the pool may hold now: its arenas' and what room_bytes() allows.
  uint64_t capacity_slots() const { return (held_bytes_ + room_bytes()) / options_.page_size; }
  uint64_t used_slots() const { return used_; }
  uint64_t used_bytes() const { return used_ * options_.page_size; }
  // Slots in the arenas held so far (in use or free).
  uint64_t arena_slots() const { return link_.size(); }
  size_t arena_count() const { return arenas_.size(); }
  // Device memory held: the arenas' bytes. Never above budget_bytes().
  uint64_t arena_bytes() const { return held_bytes_; }
  // Every arena by index; a released one has base and bytes 0.
  std::span<const DeviceArena> arenas() const { return arenas_; }

 private:
  // link_ values besides the index of the next free slot.
  static constexpr uint32_t kUsed = 0xffffffffu;
  static constexpr uint32_t kReleased = 0xfffffffeu;  // a slot of a released arena
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
  std::vector<uint32_t> arena_slots_;  // per arena, its slots (kept while released)
  uint64_t generation_ = 0;
  uint64_t held_bytes_ = 0;
  // Per slot of the held arenas: kUsed, or (free) the next free slot's
  // index or kEnd; prev_: (free) the previous free slot's index or kEnd.
  std::vector<uint32_t> link_;
  std::vector<uint32_t> prev_;
  uint32_t free_head_ = kEnd;
  size_t last_grown_ = 0;  // the arena the last Grow filled
  uint64_t used_ = 0;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_DEVICE_PAGE_POOL_H_
