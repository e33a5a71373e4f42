// DeviceTier: the mechanism of the GPU tier (issue #5). It owns a TierTable
// (the placement policy) and carries out the table's steps on real device
// memory: DevicePagePool slots, the regions' PageStores, and copies through
// a DeviceBackend.
//
// Pools: one per region and GPU, made by AddRegion, all of one GPU sharing
// its budget (DeviceBudget): an arena holds the pages of one region only,
// so a client given an arena to reach its map (GpuMapReply) reaches no
// other region's pages. Memory moves between regions an arena at a time:
// a pool short of room first takes the other pools' empty arenas back to
// the budget, then evicts whole arenas of theirs (MakeRoomFor). A removed
// region's pools go once the slots lost maps hold in them are released.
//
// Copies, per call:
//   1. write-backs (kWriteBack), batched per GPU: pages' slots are copied
//      into a staging buffer with one CopyToHost per batch, and once the
//      batch's fence is done each page goes to its store (WritePage);
//   2. slots freed (kFreeSlot), then slots taken (kAllocateSlot);
//   3. copies to the device (kCopyToDevice), batched: pages are read from
//      their stores into a staging buffer and moved with one CopyToDevice
//      per batch, followed by a fence.
// Direct copies (options.direct_copies): a page whose 2 MiB block of its
// store is all in the memfd skips the staging buffer: the block's mapping
// in this process is registered with the backend once (RegisterHost: pinned,
// so copies run as DMA) and pages copy between it and their slots in place,
// both ways. A registration lasts until a punch in its block or a
// transfer's view of one of its pages (the store's unpin listener: the
// pinned page may no longer be the memfd's), the region's removal, the
// tier's end, or until pinning another block would pass pinned_limit_bytes:
// then the blocks least recently used go first, never one the current call
// touches. Retained pages, blocks with holes or views, runs shorter than
// direct_min_bytes and runs whose block finds no room under the limit are
// staged as above.
// The table emits steps so that this phase order is safe (a page written
// back before its slot is freed; slots freed before they are reused; a page
// moved between GPUs written back before it is copied again).
//
// Batching and overlap: a batch is as many pages as fit in `batch_bytes` of
// staging. Pages are staged in the order of their slots' device addresses,
// so pages whose slots are adjacent in one arena merge into one copy entry
// (one cudaMemcpyAsync): small pages go as large copies. Each GPU has lanes,
// each a stream with its own pinned staging buffer; batch i goes on lane
// i % lanes. Batches go in waves of `copy_threads`: the batches of a wave
// are staged at once, one per copy thread (read from their stores, or
// written to them), and there are at least two waves' worth of lanes
// (max(streams_per_gpu, 2 * copy_threads)), so while one wave's copies run
// the host stages the next (or writes the previous one's bytes to the
// stores). A lane's buffer is reused only after the fence of its previous
// batch.
//
// The API is synchronous: every call returns when its copies are done.
// TODO(#5): an asynchronous form for the daemon's GPU strand, so copies
// overlap with kernels and with the network.
//
// Failure: a failure while taking slots, reading stores or copying to the
// device (the device full below its budget, a store I/O error, a device
// error) is rolled back: the call's new GPU copies are undone and its pins
// removed; evictions already done stay done (they were written back). A
// write-back a store refuses (full, RLIMIT_FSIZE: any error but kInternal)
// keeps its copies: each page stays on its GPU, dirty, in its slot (an
// eviction or a move of it is undone, a page leaving the node stays), and
// the call fails with the store's error; a later call writes them back
// again. A write-back the device fails (kInternal) cannot be undone (what
// the device copied is not known): the tier refuses every later call that
// would copy with kFailedPrecondition naming the first failure, and
// WriteBack refuses pages whose current bytes are on a GPU only (dirty, or
// in the failed write-back), so the caller never takes stale host bytes
// for current. Drop, Detach, Release, Unpin and RemoveRegion still work.
//
// Thread safety: none. One owner (the daemon's GPU strand) calls every
// method, the same owner as the backend's and the pools'.
#ifndef DSVM_NODE_MEMORY_DEVICE_TIER_H_
#define DSVM_NODE_MEMORY_DEVICE_TIER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "node/memory/device_backend.h"
#include "node/memory/device_page_pool.h"
#include "node/memory/page_store.h"
#include "node/memory/tier_table.h"
#include "proto/status.h"

namespace dsvm::node {

struct DeviceTierOptions {
  // Bytes of each arena a region's pool takes from its GPU's budget (less
  // when the region or the budget is smaller; at least one page); a
  // multiple of 4 KiB. Every region's pool holds whole arenas, so smaller
  // ones leave more of a budget to share between regions; a run larger
  // than an arena gets one of its own, of its size.
  uint64_t arena_bytes = 64ull << 20;
  // The host budget and aging period of the TierTable (see tier_table.h).
  uint64_t host_budget_bytes = 0;
  uint64_t aging_period = 1024;
  // Staging bytes per lane: the most one copy call moves. At least the
  // page size of every region added (AddRegion).
  uint64_t batch_bytes = 8ull << 20;
  // Streams (each with a staging buffer) per GPU; at least 2 for overlap.
  uint32_t streams_per_gpu = 2;
  // Threads that move page bytes between the stores and the staging
  // buffers, the calling thread included (1: the caller alone). One core's
  // copy (10-20 GB/s) is below what a PCIe 5 link carries (50+ GB/s), so a
  // migration that stages on one thread cannot keep a GPU's copy engine
  // busy. Each GPU gets at least 2 * copy_threads lanes.
  uint32_t copy_threads = 1;
  // Copy pages straight between their stores' mappings and the device where
  // they can (see "Direct copies" above); false: always through staging.
  bool direct_copies = true;
  // Pages that would copy direct but whose run of neighbours (in host and
  // device memory) is smaller than this are staged: a copy call per small
  // page costs more than staging them into one (a guess to measure on a
  // GPU: a cudaMemcpyAsync costs microseconds, 64 KiB at 50 GB/s 1.3 us).
  uint64_t direct_min_bytes = 64 << 10;
  // The most host memory registered for direct copies at once: 0, or at
  // least one 2 MiB block. 0: DefaultPinnedLimit(). Pinned memory cannot be
  // swapped, moved or compacted by the kernel; but a limit near the GPUs'
  // budgets would unpin and pin again the blocks of a working set larger
  // than the GPUs at every pass (oversubscription), and each registration
  // is a driver call that pins its pages one by one.
  uint64_t pinned_limit_bytes = 0;
  // Called on the calling thread each time the tier has waited for a copy
  // (one batch each way; milliseconds apart at most): a migration of many
  // gigabytes holds the caller for seconds, and the node daemon keeps its
  // heartbeats going from here, or the coordinator would declare a node
  // that is only busy dead (and its pages lost). It may serve work that
  // leaves the tier alone (DeviceTier::Touches says which pages the call
  // moves) and punch store pages outside the call (their registrations
  // end at the next outermost call), but must not call into the tier: a
  // call from there stops the process. Empty: nothing.
  std::function<void()> keep_alive;
  // While one wait for a copy lasts longer (a batch queued behind others'),
  // keep_alive is also called this often.
  std::chrono::microseconds keep_alive_every{1000};
};

// A default for DeviceTierOptions::copy_threads on this host: a quarter of
// its CPUs, between 1 and 4 (the daemon's loop and the network keep the
// rest).
uint32_t DefaultCopyThreads();
// A default for DeviceTierOptions::pinned_limit_bytes on this host: half
// its memory (at least one 2 MiB block).
uint64_t DefaultPinnedLimit();

// A contiguous device range holding consecutive pages (DeviceTier::MapRun):
// page i of the run is at ptr + i * page size, all in one arena.
struct DeviceRun {
  uint32_t gpu = 0;
  DevicePtr ptr = 0;          // the first page's slot
  uint64_t bytes = 0;         // pages * page size
  DevicePtr arena = 0;        // base of the arena holding the run
  uint64_t arena_bytes = 0;
  uint64_t offset = 0;        // ptr - arena
};

// A GPU slot a lost gpu map keeps (DeviceTier::Detach) until its client
// unmaps (DeviceTier::Release).
struct HeldSlot {
  DevicePagePool* pool = nullptr;
  DeviceSlot slot;
};

struct DeviceTierStats {
  uint64_t to_device_calls = 0;    // CopyToDevice calls (one per batch)
  uint64_t to_host_calls = 0;      // CopyToHost calls (one per batch)
  uint64_t to_device_entries = 0;  // copy entries after merging adjacent pages
  uint64_t to_host_entries = 0;
  uint64_t pages_to_device = 0;
  uint64_t pages_to_host = 0;
  uint64_t bytes_to_device = 0;
  uint64_t bytes_to_host = 0;
  uint64_t slots_freed = 0;  // kFreeSlot steps carried out
  uint64_t rollbacks = 0;    // calls undone after a failure
  uint64_t write_backs_failed = 0;  // write-backs a store refused (their copies kept)
  uint64_t runs = 0;         // MapRun calls that succeeded
  uint64_t run_evictions = 0;  // GPU copies MapRun moved out of the way of a run
  uint64_t pages_moved_on_device = 0;  // a run's pages moved into it on their GPU (no bus)
  uint64_t arenas_reclaimed = 0;  // arenas emptied for another region (one budget per GPU)
  uint64_t replica_runs = 0;      // MapReplicaRun calls that succeeded
  uint64_t direct_pages_to_device = 0;  // of pages_to_device, copied without staging
  uint64_t direct_pages_to_host = 0;    // of pages_to_host, likewise
  uint64_t blocks_registered = 0;       // RegisterHost calls that succeeded
  uint64_t blocks_unregistered = 0;     // registrations ended (punch, region removed, room)
  uint64_t blocks_unpinned_for_room = 0;  // of blocks_unregistered, to stay under the limit
  uint64_t pinned_bytes = 0;              // registered now (a copy of DeviceTier's count)
};

class DeviceTier {
 public:
  // A tier over `backend`, which must outlive it: GPU i (i below the
  // backend's device count) may give region pages gpu_budget_bytes[i]
  // bytes of its memory (0: none). Creates the streams and staging
  // buffers. Errors: kInvalidArgument (backend null; more budgets than
  // GPUs, or none above 0; streams_per_gpu < 2; batch_bytes or arena_bytes
  // not a positive multiple of 4 KiB), kResourceExhausted (cannot pin
  // staging), kInternal.
  static Result<std::unique_ptr<DeviceTier>> Create(DeviceBackend* backend,
                                                    std::vector<uint64_t> gpu_budget_bytes,
                                                    DeviceTierOptions options = {});
  // Frees the streams, staging buffers and pools (their arenas).
  ~DeviceTier();
  DeviceTier(const DeviceTier&) = delete;
  DeviceTier& operator=(const DeviceTier&) = delete;

  // The region whose bytes `store` holds; `store` must outlive the region's
  // membership here. Makes its pools, one per GPU whose budget holds a
  // page of it (none take device memory yet). Errors: kInvalidArgument
  // (null; a page size above batch_bytes), kAlreadyExists (overlaps a
  // region).
  Status AddRegion(PageStore* store);
  // Frees the region's GPU copies without write-back and forgets it; its
  // pools go with it, or once the slots lost maps hold there are
  // released. Errors: kNotFound.
  Status RemoveRegion(PageAddr base);

  // Makes `pages` (of the region at `region`) resident on `gpu` and pins
  // each once; returns each page's device address, in order. Pages the tier
  // does not hold yet are taken from the store (the caller holds the
  // coherence rights to them). `for_write` marks the GPU copies dirty: they
  // are written back on eviction, WriteBack, or never (Drop). `tick` is the
  // caller's clock for the eviction policy (non-decreasing). Errors:
  // kInvalidArgument (no region at `region`; a page outside it, unaligned or
  // listed twice; no pool for `gpu` and the region),
  // kFailedPrecondition (a page is leaving the node or pinned on another
  // GPU; the tier failed earlier), kResourceExhausted (the GPU's budget
  // cannot hold the pages with what is pinned, or the device is full below
  // the budget), kIoError (a store read), kInternal (the device).
  Result<std::vector<DevicePtr>> MakeResident(PageAddr region, std::span<const PageAddr> pages,
                                              uint32_t gpu, bool for_write, uint64_t tick);
  // As MakeResident for consecutive pages (pages[i] = pages[0] + i * page
  // size, the region's), which end up in adjacent slots of one arena: one
  // device range, in address order (dsvm_gpu_map). The run goes where
  // nothing needs to move if it can: (1) a window of free slots (or of the
  // pages already in place, which are hits); (2) a new arena, regular or
  // dedicated when the run is larger than one (DevicePagePool::GrowForRun);
  // (3) the window of an arena whose unpinned occupants are fewest: they
  // are evicted (written back when dirty). Pages of the call on the GPU
  // outside the window move into it (written back first when dirty).
  // Victims are chosen by place, not by the NFU order: a run needs
  // adjacent slots. Errors: as MakeResident, and kInvalidArgument (pages
  // not consecutive, or none), kFailedPrecondition (a page is pinned
  // elsewhere than its place in an existing identical run: mapped already
  // by an overlapping map), kResourceExhausted (no arena can hold the run
  // beside the pinned pages, and the budget has no room for another).
  Result<DeviceRun> MapRun(PageAddr region, std::span<const PageAddr> pages, uint32_t gpu,
                           bool for_write, uint64_t tick);
  // A copy of consecutive pages on `gpu` for a read map that leaves their
  // GPU copies where they are (read-mostly replication: another GPU of the
  // node holds or maps them). The run's slots are taken from `gpu`'s pool
  // like a MapRun's window (its unpinned occupants evicted), filled from
  // the host (a dirty GPU copy elsewhere written back first), and held
  // outside the table (appended to `held`) until Release: the copy is the
  // map's alone and never written back. Errors: as MapRun.
  Result<DeviceRun> MapReplicaRun(PageAddr region, std::span<const PageAddr> pages, uint32_t gpu,
                                  std::vector<HeldSlot>* held);
  // Removes one pin from each page (the end of a gpu_map). Errors:
  // kInvalidArgument (bad page), kFailedPrecondition (a page not pinned; the
  // pages before it were unpinned).
  Status Unpin(std::span<const PageAddr> pages);
  // Writes dirty GPU copies back to their stores and keeps them, clean (the
  // node is about to send or read the bytes). Errors: kInvalidArgument,
  // kFailedPrecondition (the tier failed earlier and a page's current bytes
  // are on a GPU only; pages whose host bytes are current pass), kIoError,
  // kInternal.
  Status WriteBack(std::span<const PageAddr> pages);
  // The pages leave the node (coherence invalidation): GPU copies are freed
  // without write-back and the tier forgets them. Errors: kInvalidArgument.
  Status Drop(std::span<const PageAddr> pages);
  // The pages leave the tier as Drop says, but the GPU slots of those on a
  // GPU stay taken, bytes and all, until Release: a client may still use a
  // lost map's device pointers (the node lost its pages while they were
  // mapped), and no other page may be given those slots meanwhile. Appends
  // one HeldSlot per page that had a GPU copy, or that another map's
  // Detach just took off the GPU (maps of one range share slots: each
  // holds them, and the last Release frees them). Errors: kInvalidArgument.
  Status Detach(std::span<const PageAddr> pages, std::vector<HeldSlot>* held);
  // Ends one hold of each slot Detach kept; a slot no map holds any more is
  // freed. Errors: kInvalidArgument (a slot not held).
  Status Release(std::span<const HeldSlot> held);
  // The node now holds `page` in host DRAM (coherence installed it): the
  // table counts it against the host budget, which may send pages away
  // (TakePagesToLeave). Errors: kInvalidArgument, kFailedPrecondition (the
  // page is leaving; the tier failed earlier), kIoError, kInternal.
  Status AddHostPage(PageAddr page, uint64_t tick);
  // Takes the unpinned GPU copies of `pages` off their GPUs (dirty ones
  // written back first), because the host bytes are about to change under
  // them (a local CPU write); pinned pages and pages with no GPU copy are
  // left alone. Errors: kInvalidArgument, kFailedPrecondition (the tier
  // failed earlier and a page's current bytes are on a GPU only), kIoError,
  // kInternal.
  Status EvictCopies(std::span<const PageAddr> pages);
  // Pages the host budget sends away (kLeaveNode), oldest first, since the
  // last call; the caller gives each up through NodeAgent::Evict and then
  // calls Drop (or table's KeepOnNode when the agent refuses).
  std::vector<PageAddr> TakePagesToLeave();

  // With TrackTouches(true): whether the call in progress moves or frees
  // the bytes of `page` on the host or a GPU: its arguments, and the pages
  // of every step it has run (victims evicted, pages moved on the device).
  // For a keep_alive that serves other work, which must leave those pages'
  // host bytes alone; false outside a call. Off by default: the pages are
  // not recorded (every install and drop is a call).
  void TrackTouches(bool on) { track_touches_ = on; }
  bool Touches(PageAddr page) const { return touched_.count(page) != 0; }

  TierTable& table() { return *table_; }
  const TierTable& table() const { return *table_; }
  // OK, or the device error that failed the tier (see Failure, above).
  const Status& failure() const { return failed_; }
  const DeviceTierStats& stats() const { return stats_; }
  // The device address of the page's GPU copy; 0 when it has none.
  DevicePtr SlotOf(PageAddr page) const;
  // The pool of the region at `base` on `gpu`; null when none (no such
  // region, or the GPU's budget holds no page of it).
  const DevicePagePool* PoolOf(uint32_t gpu, PageAddr base) const;
  // Bytes of device memory GPU `gpu`'s pools hold (their arenas), and the
  // number of pools (regions', and removed regions' that still hold slots).
  uint64_t arena_bytes(uint32_t gpu) const;
  size_t pool_count() const;

 private:
  // Wraps every public call that may copy or change the table: refuses a
  // call from keep_alive, and the outermost call (no copy in flight) first
  // ends the registrations of blocks punched during keep_alive; at its end
  // touched_ is cleared.
  class CallScope {
   public:
    explicit CallScope(DeviceTier* tier);
    ~CallScope();
    CallScope(const CallScope&) = delete;
    CallScope& operator=(const CallScope&) = delete;

   private:
    DeviceTier* const tier_;
  };
  // Notes pages whose bytes the call in progress moves (Touches), when
  // tracked.
  void NoteTouched(std::span<const PageAddr> pages);
  void NoteTouched(PageAddr page) { NoteTouched(std::span<const PageAddr>(&page, 1)); }
  // The stores' unpin listener: ends registrations at once, or, during
  // keep_alive (copies may be in flight from registered blocks), at the
  // next outermost call.
  void OnStorePunched(PageAddr first, uint64_t bytes);
  struct Lane {
    StreamId stream;
    StagingBuffer staging;
    bool busy = false;  // a fence after this lane's last batch is pending
    Fence fence;
  };
  struct Placed {
    DevicePagePool* pool;
    DeviceSlot slot;
  };
  // A page to copy, in either direction.
  struct Move {
    PageAddr page;
    PageStore* store;
    DevicePtr ptr;
    uint32_t bytes;
    DevicePtr arena_end;  // end of the arena holding the slot: merges stop there
  };

  DeviceTier(DeviceBackend* backend, std::vector<uint64_t> gpu_budget_bytes,
             DeviceTierOptions options, std::unique_ptr<TierTable> table);

  Status Init();
  PageStore* StoreOf(PageAddr page) const;
  // kInvalidArgument naming the first of `pages` that is no page of a region.
  Status CheckPages(std::span<const PageAddr> pages) const;
  DevicePagePool* MutablePoolOf(uint32_t gpu, PageAddr base) const;
  // Every pool on `gpu`: regions' and removed regions' (retired).
  std::vector<DevicePagePool*> PoolsOn(uint32_t gpu) const;
  // The table's index of `pool`.
  int TableIndex(const DevicePagePool* pool) const { return table_index_.at(pool); }
  // Drops what the tier keeps about a pool that holds no slot and is about
  // to be freed (a removed region's).
  void ForgetPool(const DevicePagePool* pool);
  // Pools of one GPU share its budget (DevicePagePool::shared): before
  // `pool` takes up to `pages` more pages, memory other regions hold
  // without need goes back to the budget: first their empty arenas, then,
  // when the pool would still have to refuse, arenas whose pages may all be
  // evicted (written back when dirty), emptiest first. Then the table
  // learns every pool's capacity on that GPU.
  Status MakeRoomFor(DevicePagePool* pool, uint64_t pages);
  // How many of `pages` have no copy on `gpu` yet (the slots a call needs).
  uint64_t NotOn(uint32_t gpu, std::span<const PageAddr> pages) const;
  // A run's store and pool, after checking the tier has not failed, the
  // region exists, the pages are consecutive pages of it, and `gpu` has a
  // pool for it. Errors: as MapRun's.
  struct RunTarget {
    PageStore* store;
    DevicePagePool* pool;
  };
  Result<RunTarget> CheckRun(PageAddr region, std::span<const PageAddr> pages, uint32_t gpu) const;
  // The first slot of n adjacent slots of one arena of `pool` for a run:
  // free ones, or those whose occupants are coldest (the table's eviction
  // order: the window whose hottest occupant is coldest, then the fewest
  // copies to evict; none pinned, held or leaving; pages in `mine` are
  // free), or a new arena when the budget has room and the best window
  // would evict. With no window, the budget makes room for a new arena
  // (ReclaimOneArena of any pool on the GPU). Errors: kResourceExhausted
  // (no such window and no room).
  Result<uint32_t> ChooseRunWindow(DevicePagePool* pool, uint32_t n,
                                   const std::unordered_set<PageAddr>& mine);
  // The run over slots [start, start + n) of `pool`.
  DeviceRun RunAt(DevicePagePool* pool, uint32_t start, uint32_t n) const;
  // Reclaims (ReclaimArena) the arena of a pool on `gpu` other than `skip`
  // with the fewest pages, all of which may be evicted; false when there is
  // none. Errors: as Execute.
  Result<bool> ReclaimOneArena(uint32_t gpu, const DevicePagePool* skip);
  // Evicts every page of arena `arena` of `pool` (none pinned, held or
  // leaving) and gives the arena back. Errors: as Execute.
  Status ReclaimArena(DevicePagePool* pool, size_t arena);
  void SyncCapacities(uint32_t gpu);
  // Carries out `steps` (phase order, see above). `placed` receives the
  // pages given a slot here. A page in forced_ takes that slot index.
  Status Execute(const TierSteps& steps, std::vector<PageAddr>* placed);
  // Moves each (page, slot index) of `moves` into that slot of `pool`,
  // free, with a copy on the device (MapRun: a run's pages on its GPU
  // outside its window); the GPU copy keeps its dirty bit. Errors:
  // kInternal (the device; the tier fails), and the pool's.
  Status MoveOnDevice(DevicePagePool* pool, uint32_t gpu, uint64_t page_bytes,
                      const std::vector<std::pair<PageAddr, uint32_t>>& moves);
  // Undoes a failed MakeResident's new GPU copies and its pins, then
  // KeepDirtyCopies.
  void RollBack(const TierSteps& steps, std::span<const PageAddr> pages);
  // Puts the pages of a write-back a store refused (keep_dirty_) back in
  // the table, dirty on their GPUs, and off the list of pages to leave.
  void KeepDirtyCopies();
  // The page in slot `index` of `pool`; kNoPage when free.
  PageAddr OccupantOf(const DevicePagePool* pool, uint32_t index);
  static constexpr PageAddr kNoPage = ~PageAddr{0};
  static constexpr PageAddr kHeld = ~PageAddr{0} - 1;  // a slot Detach kept
  Status WriteBackMoves(uint32_t gpu, const std::vector<Move>& moves);
  Status CopyMovesToDevice(uint32_t gpu, const std::vector<Move>& moves);
  // Direct copies: a move with the page's bytes in its store's mapping, in
  // a registered block that ends at block_end.
  struct DirectMove {
    Move move;
    uint8_t* host = nullptr;
    const uint8_t* block_end = nullptr;
  };
  // True when b's bytes follow a's in host and device memory, in a's block
  // and arena: the two go in one copy.
  static bool Follows(const DirectMove& a, const DirectMove& b);
  // The moves of `moves` that can go direct (their block registered, or
  // registered now, in runs of direct_min_bytes or more), taken out of it;
  // the rest stay, in order.
  std::vector<DirectMove> TakeDirect(std::vector<Move>* moves);
  // Queues the copies of `direct` on `gpu`'s direct lanes in turn, up to
  // batch_bytes each, and records a fence after each: host to device with
  // `to_device`, else back. One batch in flight per lane (a lane is drained
  // before its next); the caller drains the last ones.
  Status QueueDirect(uint32_t gpu, const std::vector<DirectMove>& direct, bool to_device);
  // Ends the registrations of blocks overlapping [first, first + bytes).
  void Unregister(PageAddr first, uint64_t bytes);
  // Moves [begin, end) of a copy, staged together in one lane's buffer.
  struct Batch {
    size_t begin;
    size_t end;
    uint64_t bytes;  // of its pages
  };
  // `moves` cut into batches of at most batch_bytes each, in order.
  std::vector<Batch> SplitBatches(const std::vector<Move>& moves) const;
  // Reads the batch's pages from their stores into `staging`, and sets
  // `entries` to its copies (adjacent slots merged). Runs on a copy thread.
  static Status StageToDevice(const std::vector<Move>& moves, Batch batch,
                              const StagingBuffer& staging, std::vector<HostToDevice>* entries);
  // Writes the batch's pages from `staging` to their stores, those that are
  // not retained (PageStore::WriteUnretained). Runs on a copy thread.
  static Status UnstageToStores(const std::vector<Move>& moves, Batch batch,
                                const StagingBuffer& staging);
  // Runs fn(0) .. fn(n - 1) at once on the copy threads and the calling
  // thread; returns the first error by index, once all have returned.
  Status ParallelFor(size_t n, const std::function<Status(size_t)>& fn);
  // Waits for the lane's pending fence, if any, calling keep_alive every
  // keep_alive_every meanwhile and once after.
  Status Drain(Lane& lane);
  // After a failed copy: waits for what every lane queued (the caller may
  // free its slots), then returns `first`, the error to report.
  Status DrainAll(std::vector<Lane>& lanes, Status first);
  void FreeSlotOf(PageAddr page);
  // The end of the pool's arena that holds `ptr`.
  DevicePtr ArenaEnd(const DevicePagePool* pool, DevicePtr ptr);
  Status Fail(Status s);

  DeviceBackend* const backend_;
  const std::vector<uint64_t> gpu_budget_bytes_;
  const DeviceTierOptions options_;
  // Per GPU, its budget, which its pools share (declared before the pools:
  // they give their arenas back to it when destroyed).
  std::vector<std::unique_ptr<DeviceBudget>> budgets_;
  // Per region (by base), its pool on each GPU (null where none).
  std::map<PageAddr, std::vector<std::unique_ptr<DevicePagePool>>> region_pools_;
  // Pools of removed regions that still hold slots of lost maps.
  std::vector<std::unique_ptr<DevicePagePool>> retired_;
  std::unordered_map<const DevicePagePool*, int> table_index_;
  std::unique_ptr<TierTable> table_;
  std::vector<std::vector<Lane>> lanes_;   // per GPU (index = device number)
  // Per GPU, the streams of direct copies (no staging buffers), with
  // direct_copies.
  std::vector<std::vector<Lane>> direct_lanes_;
  // True while copy threads run (ParallelFor): no registration may end then.
  std::atomic<bool> copying_{false};
  // copy_threads - 1 threads beside the caller's (a Boost.Asio thread pool,
  // in device_tier.cc); null with one.
  struct Copiers;
  std::unique_ptr<Copiers> copiers_;
  std::map<PageAddr, PageStore*> stores_;  // by region base
  // Registered blocks (Direct copies), by first address: their mapping.
  struct Registered {
    uint8_t* data;
    uint64_t bytes;
    uint64_t last_use;  // the TakeDirect call that last touched it (calls_)
  };
  using RegisteredMap = std::map<PageAddr, Registered>;
  RegisteredMap registered_;
  // registered_ by (last_use, first): least recently used first.
  std::set<std::pair<uint64_t, PageAddr>> by_use_;
  uint64_t pinned_bytes_ = 0;  // of registered_
  uint64_t calls_ = 0;         // TakeDirect calls
  uint64_t pinned_limit_ = 0;  // options_.pinned_limit_bytes, or its default
  void AddRegistration(const PageStore::Block& block);
  // Marks the registration at `it` used by this call (calls_).
  void Touch(RegisteredMap::iterator it);
  // Ends the registration at `it`; returns the next.
  RegisteredMap::iterator EndRegistration(RegisteredMap::iterator it);
  // Unregisters blocks this TakeDirect call has not touched, least
  // recently used first, so that `bytes` more fit under the limit. False,
  // unregistering none, when they cannot (this call's blocks fill it).
  bool MakePinRoom(uint64_t bytes);
  // The backend refused to pin a store's memory (kFailedPrecondition): every
  // later copy is staged, without asking again.
  bool register_refused_ = false;
  std::unordered_map<PageAddr, Placed> slots_;
  // Per pool, its live arenas as (base, end) sorted by base; refreshed when
  // the pool's arena generation changed (grown, or arenas released).
  std::unordered_map<const DevicePagePool*, std::vector<std::pair<DevicePtr, DevicePtr>>> arenas_;
  std::unordered_map<const DevicePagePool*, uint64_t> arena_generations_;  // of arenas_' lists
  std::deque<PageAddr> leave_;
  // Per pool, the page in each slot (kNoPage: free), by slot index.
  std::unordered_map<const DevicePagePool*, std::vector<PageAddr>> occupants_;
  // Slots held outside the table (Detach, MapReplicaRun), by (pool, slot
  // index), with how many maps hold each (maps of one range share slots):
  // the last Release, or the destructor, frees it.
  using SlotKey = std::pair<const DevicePagePool*, uint32_t>;
  struct HeldEntry {
    HeldSlot slot;
    uint32_t holds = 0;
    PageAddr page = kNoPage;  // Detach: the page it held; kNoPage for a replica's
  };
  std::map<SlotKey, HeldEntry> held_;
  // The held slot each detached page had: a second map of the page detached
  // in the same loss holds it too.
  std::unordered_map<PageAddr, SlotKey> detached_;
  // During MapRun: the slot index each page must take.
  std::unordered_map<PageAddr, uint32_t> forced_;
  Status failed_;
  // The pages of the write-back the device failed: their bytes are on a
  // GPU only (the table counts them as written back).
  std::unordered_set<PageAddr> unsaved_;
  // The pages, and their GPUs, of a write-back a store refused, until
  // KeepDirtyCopies puts them back in the table.
  std::vector<std::pair<PageAddr, uint32_t>> keep_dirty_;
  DeviceTierStats stats_;
  uint32_t call_depth_ = 0;               // CallScopes open
  bool in_keep_alive_ = false;            // Drain is calling keep_alive
  bool track_touches_ = false;            // TrackTouches
  std::unordered_set<PageAddr> touched_;  // Touches; cleared by the outermost CallScope
  // Store ranges punched during keep_alive, unregistered by the next
  // outermost CallScope.
  std::vector<std::pair<PageAddr, uint64_t>> punched_meanwhile_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_DEVICE_TIER_H_
