// TierTable: where the bytes of each page the node holds live (issue #5) —
// placement, kept apart from coherence. node/coherence/ says who may read or
// write a page; this table says which tier holds its bytes on this node:
// host DRAM (the region's PageStore memfd) and, optionally, one GPU's HBM
// (a DevicePagePool slot). It is a pure state machine: no CUDA, no syscalls,
// no clock. The caller (the daemon's GPU strand; DeviceTier in tests) asks
// and carries out the TierSteps it gets back, in order.
//
// Model:
// - Host is inclusive: every page the table holds has a host copy in its
//   region's memfd, and counts against the host budget. A page may also have
//   one GPU copy ("resident on GPU k"). The GPU copy is *dirty* when it is
//   newer than the host copy (mapped for write since the last write-back);
//   a clean GPU copy can be dropped without a copy, which is what makes
//   eviction of read-mostly pages free.
// - A page is on at most one GPU. Making it resident on GPU k while it is on
//   GPU j moves it (write back if dirty, free j's slot, copy to k).
//   TODO(#5): read-mostly replication (dsvm_advise) would allow clean copies
//   on several GPUs.
// - Pins: each MakeResident(pin=true) adds one pin (an active dsvm_gpu_map);
//   Unpin removes one. A pinned page is never evicted, moved or sent away.
//   Only coherence (Drop) takes a pinned page: the node has lost the right to
//   it, and the daemon must end the mapping.
// - Pools: a region's pages on a GPU take slots of that region's pool on
//   that GPU (AddPool), so GPU memory is never shared between regions: a
//   client that reaches one region's device memory reaches no other
//   region's pages. Eviction for room chooses among the pool's own pages.
// - Budgets: each pool has a capacity in slots (the DevicePagePool's
//   capacity_slots(); pools of one GPU share its budget, which the caller
//   keeps in step with SetCapacity); the host has a byte budget. Admitting
//   a page past the host budget reports pages that must leave the node
//   (kLeaveNode: the daemon gives them up through NodeAgent::Evict, which
//   hands them to another node's memory — remote swap — and then calls Drop).
//
// Eviction policy: not-frequently-used with aging (NFU-aging, as RSVM), ties
// broken by least recent use, then by address. Each page keeps a counter of
// the accesses the daemon reports (every page of a MakeResident call, and
// Touch); every `aging_period` ticks all counters are halved. The victim is
// the unpinned page with the smallest (counter, last access tick, address).
// Why this and not LRU or CLOCK:
// - The daemon sees GPU accesses only at map granularity (gpu_map calls,
//   kernel launches it is told about); HBM has no per-page accessed bits it
//   could sample the way CLOCK samples CPU page tables. Counting what it is
//   told is the signal there is, and a counter carries more of it than one
//   referenced bit.
// - Frequency protects hot pages (the hot rows of an embedding table, the
//   tiles a matrix multiply reuses) from a stream of pages touched once,
//   which flush an LRU list; aging makes formerly hot pages cool down, which
//   plain LFU never does. With equal counters the policy is LRU.
// - No policy that looks only at the past helps a cyclic scan larger than the
//   budget (every page misses under LRU and NFU alike); dsvm_prefetch and
//   dsvm_advise are the remedy there, not the victim choice.
// Cost: the unpinned pages of each pool sit in an ordered set by
// (counter, tick, address), so an access and an eviction are O(log n);
// crossing an aging period halves every counter and rebuilds the sets, O(n)
// per period.
// Host-budget victims (pages to leave the node) are chosen by the same key,
// among pages with no GPU copy first, then among unpinned GPU-resident pages.
//
// Determinism: ticks are passed in by the caller and must not decrease
// (DSVM_CHECK); nothing else varies, so a test knows every step exactly.
//
// Thread safety: none. One owner (the daemon's GPU strand) calls every method.
#ifndef DSVM_NODE_MEMORY_TIER_TABLE_H_
#define DSVM_NODE_MEMORY_TIER_TABLE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <span>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::node {

using proto::PageAddr;

// TierStep::gpu of a step that concerns no GPU (kLeaveNode).
inline constexpr uint32_t kNoGpu = 0xffffffffu;

enum class TierStepKind : uint8_t {
  kInvalid = 0,
  // Take a slot for `page` in the pool of (`gpu`, the page's region).
  kAllocateSlot,
  // Copy the page's host bytes into its slot on `gpu` (after kAllocateSlot).
  kCopyToDevice,
  // Copy the page's slot on `gpu` to its host bytes (PageStore::WritePage).
  // The GPU copy stays; it is clean from now on.
  kWriteBack,
  // Free the page's slot on `gpu` without copying: the GPU copy is gone.
  // When it was dirty, a kWriteBack for it came first, or the page is leaving
  // the node (Drop) and its bytes no longer matter here.
  kFreeSlot,
  // The node must give the page up (NodeAgent::Evict), because the host
  // budget is exceeded; its host bytes are current (any GPU copy was written
  // back and freed by earlier steps). Call Drop when coherence has taken it,
  // KeepOnNode when the agent refused.
  kLeaveNode,
};

struct TierStep {
  TierStepKind kind = TierStepKind::kInvalid;
  PageAddr page = 0;
  uint32_t gpu = kNoGpu;
  bool operator==(const TierStep&) const = default;
};
using TierSteps = std::vector<TierStep>;

struct TierTableOptions {
  // Host DRAM the node's pages may take, in bytes; 0: no limit.
  uint64_t host_budget_bytes = 0;
  // Ticks between two halvings of every access counter (> 0).
  uint64_t aging_period = 1024;
};

struct TierTableStats {
  uint64_t hits = 0;              // pages already resident on the GPU asked for
  uint64_t misses = 0;            // pages that had to be copied to it
  uint64_t copies_to_device = 0;  // kCopyToDevice steps
  uint64_t writebacks = 0;        // kWriteBack steps
  uint64_t evictions = 0;         // GPU copies evicted for room (clean or dirty)
  uint64_t clean_evictions = 0;   // of which dropped without a copy
  uint64_t moves = 0;             // GPU copies moved to another GPU
  uint64_t drops = 0;             // pages dropped by coherence (Drop, RemoveRegion)
  uint64_t leaves = 0;            // kLeaveNode steps
  uint64_t host_over_budget = 0;  // admissions that left the host over budget:
                                  // every other page was pinned or leaving
};

class TierTable {
 public:
  // Errors: kInvalidArgument (aging_period 0).
  static Result<std::unique_ptr<TierTable>> Create(TierTableOptions options);
  TierTable(const TierTable&) = delete;
  TierTable& operator=(const TierTable&) = delete;

  // A region [base, base + size) of pages of `page_size` whose pages the
  // table may hold. Errors: kInvalidArgument (bad page size; base or size not
  // a multiple of it; size 0 or overflow), kAlreadyExists (overlaps a region).
  Status AddRegion(PageAddr base, uint64_t size, uint32_t page_size);
  // Forgets the region and its pages; their GPU copies are freed without
  // write-back (the region is gone). Its pools take no page any more; their
  // indices stay valid for the slots they hold (ReleaseHeldSlot). Errors:
  // kNotFound (no region at base).
  Status RemoveRegion(PageAddr base, TierSteps* out);
  // A pool of `capacity_slots` slots for the pages of the region at `base`
  // on `gpu` (capacity 0: none placed until SetCapacity); returns its index.
  // Errors: kNotFound (no region at base), kAlreadyExists (the region has a
  // pool on that GPU).
  Result<int> AddPool(uint32_t gpu, PageAddr base, uint64_t capacity_slots);

  // The node now holds `page` in host DRAM (coherence installed it). Counts
  // as an access. May report pages to leave the node. Nothing happens when
  // the page is held already, besides the access. Errors: kInvalidArgument
  // (not a page of a region), kFailedPrecondition (the page is leaving).
  Status AddHostPage(PageAddr page, uint64_t tick, TierSteps* out);

  // Makes every page of `pages` resident on `gpu`, admitting pages the table
  // does not hold yet as host pages (the caller has their bytes in the
  // memfd). Each page counts one access; `for_write` marks its GPU copy
  // dirty; `pin` adds one pin to each. All or nothing: on an error nothing
  // changed and `out` is untouched. Steps: per page not on `gpu`: its move
  // off another GPU, the evictions that make room, kAllocateSlot,
  // kCopyToDevice; then any pages that must leave the node. Errors:
  // kInvalidArgument (not a page of a region, a page listed twice, no pool
  // for (gpu, the page's region)), kFailedPrecondition (a page is leaving the
  // node, or pinned on another GPU), kResourceExhausted (the pool's slots
  // cannot hold the pages: too many, or the others are pinned).
  Status MakeResident(std::span<const PageAddr> pages, uint32_t gpu, bool for_write, bool pin,
                      uint64_t tick, TierSteps* out);
  // MakeResident's checks but room: OK when the call would be refused for
  // no other reason than too few free or evictable slots. The caller
  // makes room (DeviceTier reclaims other regions' arenas) only then.
  // Errors: as MakeResident, but kResourceExhausted.
  Status CheckAdmissible(std::span<const PageAddr> pages, uint32_t gpu) const;
  // Takes the page's GPU copy off its GPU now (kWriteBack when dirty, then
  // kFreeSlot), counted as an eviction: the caller needs its slot (a
  // contiguous run for dsvm_gpu_map, DeviceTier::MapRun). The page stays
  // held, host only. Errors: kInvalidArgument (bad page), kFailedPrecondition
  // (not on a GPU, pinned, or leaving).
  Status EvictFromGpu(PageAddr page, TierSteps* out);
  // Removes one pin. Errors: kInvalidArgument (bad page), kFailedPrecondition
  // (not pinned).
  Status Unpin(PageAddr page);
  // Reports an access to a held page (e.g. a kernel launch on a mapped page).
  // Errors: kInvalidArgument (bad page), kNotFound (not held).
  Status Touch(PageAddr page, uint64_t tick);

  // The node must read the page's host bytes (to send them to another node,
  // or to map them for local processes): a dirty GPU copy is written back
  // and kept, clean. Nothing for a page with no dirty copy, or not held.
  // Errors: kInvalidArgument (bad page).
  Status PrepareHostRead(PageAddr page, TierSteps* out);
  // The page leaves the node (invalidation, a move taken by another node, or
  // the end of a kLeaveNode): its GPU copy is freed without write-back, pins
  // included, and the table forgets it. Nothing for a page not held.
  // Errors: kInvalidArgument (bad page).
  Status Drop(PageAddr page, TierSteps* out);
  // As Drop, for a page on a GPU whose slot the caller keeps (a lost gpu
  // map's, whose client may still use its device pointers): no kFreeSlot,
  // and the slot stays counted as used in its pool, so nothing is planned
  // into it, until ReleaseHeldSlot. Errors: kInvalidArgument (bad page),
  // kFailedPrecondition (not on a GPU).
  Status DropHoldingSlot(PageAddr page, TierSteps* out);
  // One slot DropHoldingSlot kept in pool `pool` is free again. Errors:
  // kInvalidArgument (no such pool), kFailedPrecondition (none held there).
  Status ReleaseHeldSlot(int pool);
  // n free slots of pool `pool` are held by the caller (a replica run's),
  // counted as used until ReleaseHeldSlot. Errors: kInvalidArgument (no
  // such pool, or one of a removed region), kResourceExhausted (fewer free).
  Status HoldFreeSlots(int pool, uint64_t n);
  // Undoes a kLeaveNode the agent refused (NodeAgent::Evict returned false):
  // the page stays and may be chosen again later. Errors: kInvalidArgument,
  // kFailedPrecondition (not leaving).
  Status KeepOnNode(PageAddr page);
  // Rollback for the mechanism: the page's GPU copy could not be made (no
  // device memory below the budget, a failed copy), so it is host-only again
  // with `unpins` pins removed; its slot, if one was taken, is the caller's
  // to free. Errors: kInvalidArgument, kFailedPrecondition (not on a GPU, or
  // fewer pins).
  Status Unplace(PageAddr page, uint32_t unpins);
  // Rollback of a kWriteBack from `gpu` whose bytes did not reach the host
  // (a store refused them): the GPU copy stays, dirty. A page the steps
  // took off `gpu` (kFreeSlot, not carried out) is on `gpu` again, in the
  // slot it never left; a page the steps sent away (kLeaveNode) is kept
  // on the node (its host bytes are not current).
  // Call after the rollback of the steps' new placements, whose slots the
  // page may need. Errors: kInvalidArgument (bad page, no pool for `gpu`
  // and its region), kFailedPrecondition (not held, or on another GPU).
  Status KeepDirtyOnGpu(PageAddr page, uint32_t gpu);

  // Queries. A page not held is on no GPU, clean, unpinned.
  bool Holds(PageAddr page) const { return pages_.count(page) != 0; }
  std::optional<uint32_t> GpuOf(PageAddr page) const;
  bool IsDirty(PageAddr page) const;
  uint32_t PinsOf(PageAddr page) const;
  bool IsLeaving(PageAddr page) const;
  // The page's access counter, aged to the last tick seen.
  uint32_t AccessCount(PageAddr page) const;
  // How hot the page is in the eviction order: (access counter, last access
  // tick); the colder of two pages compares less. (0, 0) when not held.
  std::pair<uint32_t, uint64_t> HeatOf(PageAddr page) const;
  // The page size of the region holding `page`; 0 when no region does.
  uint32_t PageSizeOf(PageAddr page) const;
  // The index of the pool of the region at `base` on `gpu`; -1 when none.
  int PoolIndex(uint32_t gpu, PageAddr base) const;
  // REQUIRES (these four): `pool` is an index AddPool returned.
  uint64_t used_slots(int pool) const { return PoolAt(pool).used; }
  uint64_t held_slots(int pool) const { return PoolAt(pool).held; }
  uint64_t evictable_slots(int pool) const { return PoolAt(pool).evictable.size(); }
  // The pool's capacity changed (pools of one GPU share its budget: what
  // one holds the others cannot). Errors: kInvalidArgument (no such pool),
  // kFailedPrecondition (below the slots in use).
  Status SetCapacity(int pool, uint64_t slots);
  uint64_t capacity_slots(int pool) const { return PoolAt(pool).capacity_slots; }
  size_t page_count() const { return pages_.size(); }
  uint64_t host_bytes() const { return host_bytes_; }
  const TierTableOptions& options() const { return options_; }
  const TierTableStats& stats() const { return stats_; }

 private:
  struct Entry {
    uint32_t page_size = 0;
    int pool = -1;  // index into pools_; -1: host only
    bool dirty = false;
    bool leaving = false;
    uint32_t pins = 0;
    uint32_t count = 0;
    uint64_t last_tick = 0;
  };
  // Victim order: fewest accesses, then least recent, then lowest address.
  using Key = std::tuple<uint32_t, uint64_t, PageAddr>;
  struct Pool {
    uint32_t gpu = 0;
    PageAddr region = 0;      // its region's base
    uint64_t capacity_slots = 0;
    bool removed = false;     // its region is gone: it takes no page
    uint64_t used = 0;        // slots of resident pages, and held ones
    uint64_t held = 0;        // slots kept by DropHoldingSlot
    std::set<Key> evictable;  // resident, unpinned, not leaving
  };
  struct Region {
    uint64_t size;
    uint32_t page_size;
  };
  // Where a page is: its region's base and page size.
  struct Location {
    PageAddr base;
    uint32_t page_size;
  };

  explicit TierTable(TierTableOptions options);
  const Pool& PoolAt(int pool) const {
    DSVM_CHECK_MSG(pool >= 0 && static_cast<size_t>(pool) < pools_.size(),
                   "tier table: no pool " + std::to_string(pool));
    return pools_[pool];
  }

  // The region's page size when `page` is the first byte of a page of a
  // region; else kInvalidArgument.
  Result<uint32_t> CheckPage(PageAddr page) const;
  // As CheckPage, with the region's base.
  Result<Location> Locate(PageAddr page) const;
  // CheckAdmissible, also giving each page's pool index and, per pool, the
  // slots the call needs and its unpinned resident pages it will pin.
  Status CheckAdmissible(std::span<const PageAddr> pages, uint32_t gpu, std::vector<int>* pool_of,
                         std::vector<uint64_t>* needed, std::vector<uint64_t>* kept) const;
  // Halves every counter once per aging period crossed since the last tick.
  void Advance(uint64_t tick);
  // Candidate-set membership follows (pool, pins, leaving): Unlink before a
  // change to any of them or to (count, last_tick), Link after.
  static Key KeyOf(PageAddr page, const Entry& e) { return {e.count, e.last_tick, page}; }
  std::set<Key>* SetOf(const Entry& e);
  void Link(PageAddr page, Entry& e);
  void Unlink(PageAddr page, Entry& e);
  void Access(PageAddr page, Entry& e, uint64_t tick);
  // Takes the page off its GPU: kWriteBack when dirty (and `write_back`),
  // kFreeSlot. REQUIRES: e.pool >= 0, and the page unlinked.
  void LeaveGpu(PageAddr page, Entry& e, bool write_back, TierSteps* out);
  // Frees one slot of `pool` by evicting its victim. REQUIRES: one evictable.
  void EvictOne(int pool, TierSteps* out);
  // Reports pages to leave the node until the host is within budget.
  void FitHostBudget(TierSteps* out);
  // Admits a page not held yet as a host page.
  Entry& Admit(PageAddr page, uint32_t page_size);

  const TierTableOptions options_;
  std::vector<Pool> pools_;                                // by index; never reused
  std::map<std::pair<uint32_t, PageAddr>, int> pool_index_;  // (gpu, region base) -> index
  std::map<PageAddr, Region> regions_;  // by base
  std::unordered_map<PageAddr, Entry> pages_;
  std::set<Key> host_only_;     // held, on no GPU, unpinned, not leaving
  uint64_t host_bytes_ = 0;     // every held page
  uint64_t leaving_bytes_ = 0;  // of which leaving
  uint64_t tick_ = 0;
  uint64_t epoch_ = 0;
  TierTableStats stats_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_TIER_TABLE_H_
