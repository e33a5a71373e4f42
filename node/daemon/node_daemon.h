// NodeDaemon: the heart of dsvm-node, the node's coherence agent.
//
// One thread runs Run(): an epoll loop over the UCX worker's event fd (peers:
// PageData and PeerHello), the coordinator connection (directory messages),
// a timer (retransmits, heartbeats) and a wake-up eventfd for work posted
// from other threads. That thread owns everything below; other threads only
// Post() closures to it (STYLE.md, Concurrency).
//
// It carries out the node agent's actions on real parts: page bytes in one
// PageStore (memfd) per region, PageData to and from peers over UCX, the
// directory's messages over the coordinator link. Local accesses come in
// through Access(); the fault backends (userfaultfd, dsvm.ko) turn a process's
// page fault into an Access and its completion into a resolved fault.
//
// The coherence plane still travels on the coordinator's TCP connection;
// it moves to UCX active messages when the coordinator gets a UCX worker
// (docs/PERFORMANCE.md, "Directory transport").
#ifndef DSVM_NODE_DAEMON_NODE_DAEMON_H_
#define DSVM_NODE_DAEMON_NODE_DAEMON_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "node/coherence/node_agent.h"
#include "node/daemon/heap_tuning.h"
#include "node/fault/fault_backend.h"
#include "node/memory/device_backend.h"
#include "node/memory/device_page_pool.h"
#include "node/memory/device_tier.h"
#include "node/memory/page_store.h"
#include "node/transport/ucx_transport.h"
#include "proto/auth.h"
#include "proto/framed_socket.h"
#include "proto/messages.h"
#include "proto/shard_map.h"

namespace dsvm::node {

struct NodeDaemonOptions {
  // The coordinators, one per directory shard in shard order (the shard
  // map), comma-separated: "host:port" or "host:port,host:port,...".
  std::string coordinator = "127.0.0.1:7700";
  std::string listen = "127.0.0.1:0";  // the UCX listener peers connect to
  proto::NodeId rejoin_as = proto::kNoNode;
  uint64_t host_memory_bytes = 0;
  uint64_t retransmit_after_ms = 200;
  // The client plane: a UNIX SOCK_SEQPACKET socket for libdsvm ("" = none).
  std::string socket_path;
  // How client processes' faults are caught: "uffd", or "" for none (the
  // daemon then serves only Access() calls, as in tests of the core).
  std::string fault_backend = "uffd";
  // The cluster secret file (proto/auth.h); "" = none, which only a
  // coordinator started with --insecure accepts.
  std::string secret_file;
  // After any work, poll without sleeping for this long before blocking in
  // epoll (0: always block). Trades a core's idle time for the wakeup
  // latency of every hop of a fault; see docs/PERFORMANCE.md.
  uint64_t busy_poll_us = 0;
  // While a local process waits on a fault the network must serve, poll
  // (yielding the core) for up to this long before sleeping: the faulting
  // thread's core is idle anyway, and the answer comes in tens of
  // microseconds. 0: sleep as busy_poll_us says. kAutoFaultPoll: 100 us
  // where the host has at least 4 online CPUs, else 0 (on 2 vCPUs the
  // polling daemon and the faulting process end up sharing one often
  // enough to make local faults 5x slower: docs/PERFORMANCE.md).
  static constexpr uint64_t kAutoFaultPoll = ~uint64_t{0};
  uint64_t fault_poll_us = kAutoFaultPoll;
  // The GPU tier (docs/GPU.md): "none", "emulated" (host memory plays the
  // GPUs, for tests and machines without one) or "cuda".
  std::string device_backend = "none";
  // HBM each GPU may give to region pages, all page sizes together (one
  // pool per GPU and page size, sharing the GPU's budget); required with a
  // device backend.
  uint64_t gpu_budget_bytes = 0;
  // "emulated": how many GPUs it plays.
  uint32_t emulated_gpus = 1;
  // Threads that stage the GPU tier's copies (DeviceTierOptions::
  // copy_threads, 1 to 64); 0: DefaultCopyThreads(), a quarter of the CPUs
  // between 1 and 4.
  uint32_t gpu_copy_threads = 0;
  // DeviceTierOptions::direct_copies: pin host pages and copy them to and
  // from GPUs without staging where they can.
  bool gpu_direct_copies = true;
  // DeviceTierOptions::pinned_limit_bytes: the most host memory pinned for
  // direct copies at once (0, or at least 2 MiB); 0: half the host's memory
  // (DefaultPinnedLimit).
  uint64_t gpu_pinned_limit_bytes = 0;
  // GPU memory a region's pool takes at a time (DeviceTierOptions::
  // arena_bytes; a multiple of 4 KiB); 0: 64 MiB. An arena holds one
  // region's pages only, so smaller arenas share a budget between more
  // regions; larger ones allocate (cudaMalloc) less often, and a map of up
  // to an arena's size reuses one.
  uint64_t gpu_arena_bytes = 0;
  // Host DRAM the node's region pages may take (0: no limit); past it the
  // coldest pages leave the node through the directory (remote swap). Kept
  // by the GPU tier, so it needs a device backend.
  uint64_t host_budget_bytes = 0;
  // Test seam, "emulated" only (DeviceBackendOptions::emulated_copy_delay):
  // each copy of the emulated GPUs waits this long first, so a test can
  // make a map's copies take as long as a large one's on a real GPU. No
  // flag: 0 outside tests.
  std::chrono::microseconds emulated_copy_delay{0};
  // Zero-copy page moves between nodes: a page that goes alone (larger
  // than a batch takes) is sent straight from the region's memfd and
  // received straight into it (PageStore::LendForSend, ReceiveInPlace).
  // kAuto: sent so from every region, received so into hugetlb-backed ones
  // only: over a plain memfd a page received in place must be allocated
  // and zeroed 4 KiB at a time first, where an install's pwrite allocates
  // without zeroing (docs/PERFORMANCE.md, Scan, stop 21). kOn: both for
  // every region. Never with a GPU tier, nor for regions a fault backend
  // other than uffd serves (kmod's own copies of a page the store does not
  // see; a kmod node's 2 MiB regions are uffd's).
  enum class ZeroCopy : uint8_t { kOff, kAuto, kOn };
  ZeroCopy zero_copy = ZeroCopy::kAuto;
  // Direct reads (PROTOCOL.md, "Direct reads"): a client's read fault on a
  // page of at most 64 KiB that the node holds nothing of also asks the
  // node that last sent it a page of that region for its copy, which then
  // comes at once rather than after the directory's Fetch. Off: faults ask
  // the directory only. A node serves other nodes' direct reads either way.
  bool direct_reads = true;
  // PageStoreOptions::map_for_copies of the region stores. A test seam: a
  // test that fails the GPU tier's write-backs with RLIMIT_FSIZE, which
  // limits write(2) alone, turns it off. No flag.
  bool map_for_copies = true;
  // How fast a fence takes pages from local processes, in bytes per ms, to
  // start it early enough for what the node holds (FenceLeadMs). 0: assume
  // kDefaultFenceBytesPerMs until a fence has measured it. A test seam (a
  // tiny rate makes any node fence early); no flag.
  uint64_t fence_bytes_per_ms = 0;
  // Test seam: runs on a rejoin's own thread before it connects (a test
  // holds a rejoin there to see the loop serve meanwhile). No flag.
  std::function<void()> before_rejoin;
};

// The fence rate a daemon assumes before it has measured one: 1 GB/s, a
// quarter of what `dsvm-bench fence` measured for 4 KiB pages on a 2-vCPU
// VM (docs/PERFORMANCE.md, "Leases").
inline constexpr uint64_t kDefaultFenceBytesPerMs = 1'000'000;

// How long before its lease lapses a node holding `held_bytes` starts its
// fence, at `bytes_per_ms`, so that the fence is over by half the margin
// after the lapse (the margin: lease_ms / 3, PROTOCOL.md "Leases"), with a
// quarter more time than the estimate and 10 ms to spare. 0: the lapse is
// soon enough. At most lease_ms / 2: a node whose heartbeats are merely
// late keeps its pages mapped. REQUIRES: bytes_per_ms > 0.
uint64_t FenceLeadMs(uint64_t held_bytes, uint64_t bytes_per_ms, uint64_t lease_ms);
// Whether that fence, started FenceLeadMs before the lapse, still ends
// later than the margin after it: the lease is too short for what the node
// holds.
bool FenceOutlastsMargin(uint64_t held_bytes, uint64_t bytes_per_ms, uint64_t lease_ms);

struct NodeDaemonStats {
  uint64_t accesses = 0;
  uint64_t accesses_failed = 0;
  uint64_t pages_sent = 0;
  // Sends of a page a peer was sent already for the same transaction, on
  // the same endpoint, left out (the directory asked again: a resend).
  uint64_t duplicate_sends_skipped = 0;
  uint64_t pages_received = 0;
  // Zero copy (NodeDaemonOptions::zero_copy): pages sent straight from a
  // region's memfd, and pages installed where they were received.
  uint64_t pages_sent_in_place = 0;
  uint64_t pages_received_in_place = 0;
  // Pages received in place whose page was written or punched before they
  // were all in: dropped, and asked for again.
  uint64_t receives_torn = 0;
  // Pages sent for a region deleted since, whose addresses another holds
  // here now (PageData.region): dropped.
  uint64_t pages_of_another_region = 0;
  // ReadDirects ignored before the agent saw them: a page of another or a
  // deleted region, a lapsed lease, a page a GPU write map holds or with
  // directory messages held for its maps.
  uint64_t direct_reads_refused = 0;
  uint64_t direct_asks_by_page = 0;  // asks sent to the page's own last sender (page_hint_)
  uint64_t bytes_sent = 0;
  // Accesses (client faults and Access calls, not prefetches) that had to
  // wait for the directory.
  uint64_t read_faults = 0;
  uint64_t write_faults = 0;
  uint64_t bytes_received = 0;
  uint64_t prefetched_pages = 0;
  uint64_t coordinator_reconnects = 0;
  uint64_t fresh_starts = 0;  // declared dead meanwhile: every page dropped, joined anew
  uint64_t regions_deleted = 0;  // regions dropped on the coordinator's RegionDeleted
  uint64_t protocol_errors = 0;
  uint64_t peer_lookups = 0;
  uint64_t client_faults = 0;
  uint64_t clients = 0;
  uint64_t gpu_maps = 0;             // dsvm_gpu_map calls that succeeded
  uint64_t gpu_maps_failed = 0;
  uint64_t gpu_prefetches = 0;       // dsvm_gpu_prefetch calls that succeeded
  uint64_t gpu_unmaps = 0;           // maps ended: dsvm_gpu_unmap or the client leaving
  uint64_t gpu_maps_lost = 0;        // maps whose pages the node lost (declared dead, region deleted)
  uint64_t gpu_placed = 0;           // pages placed on a GPU by preferred-GPU advice
  uint64_t gpu_zero_copy_maps = 0;   // of gpu_maps, those of the host copy (accessed-by)
  uint64_t gpu_replica_maps = 0;     // of gpu_maps, read-mostly replicas
  uint64_t deferred_requests = 0;    // directory messages held while a page was gpu-mapped
  uint64_t pages_left = 0;           // pages the host budget sent away (Evict started)
  // Attempts at a GPU write-back a store refused before a Fetch, an ask or
  // Evict (HostBytesCurrent): the page stayed dirty on its GPU and the step
  // was left for a later try (the directory's resend). Each attempt counts.
  uint64_t gpu_write_backs_refused = 0;
  // Client faults held because the write-back that would show their page
  // was refused; each is tried again at the daemon's next timer (counted
  // once per try).
  uint64_t faults_held_for_write_back = 0;
  // A GPU map's copies (the GPU tier's calls for dsvm_gpu_map and
  // dsvm_gpu_prefetch) no longer hold the loop: between their batches it
  // serves peers, the coordinator links and local faults (TierJob).
  // Directory messages served meanwhile, and the directory messages, asks
  // and faults held because the copies may move their page (served when
  // they end).
  uint64_t served_during_gpu_copies = 0;
  uint64_t held_for_gpu_copies = 0;
  // Clients found gone while serving then (a reply failed), closed when the
  // copies ended: their maps' pins need the tier.
  uint64_t clients_closed_after_gpu_copies = 0;
  // Leases (docs/PROTOCOL.md, "Leases"): times a shard's lease lapsed and
  // local access to its pages was taken away until it answered again, and
  // accesses that waited meanwhile.
  uint64_t fences = 0;
  uint64_t fenced_accesses = 0;
  // Fences started before the lapse, for a node that holds more than the
  // margin lets it fence after it (FenceLeadMs).
  uint64_t early_fences = 0;
  uint64_t rejoins_started = 0;  // attempts to reach a lost coordinator again
  // Turns of the loop that came more than half a lease's margin after the
  // last (NoteStall), and the longest such gap.
  uint64_t loop_stalls = 0;
  uint64_t longest_stall_ms = 0;
  // Times the heap's free memory went back to the kernel after page
  // traffic stopped (heap_tuning.h).
  uint64_t heap_trims = 0;
};

class NodeDaemon {
 public:
  // Runs with `status` and the page's bytes while the node holds the access
  // asked for: read the span (and write it, for a write access) before
  // returning. On a failed access the span is empty.
  using AccessFn = std::function<void(Status status, std::span<uint8_t> bytes)>;

  // Joins the cluster through the coordinator and opens the UCX listener.
  // Errors: kUnavailable (coordinator or UCX unreachable, or the id asked
  // for, rejoin_as, still live on another connection after 10 s of asking:
  // the coordinator's message), and the coordinator's other refusals.
  static Result<std::unique_ptr<NodeDaemon>> Create(const NodeDaemonOptions& options);
  ~NodeDaemon();

  proto::NodeId id() const { return id_; }
  std::string peer_address() const;

  // Runs the loop on the calling thread until Stop(), or until the daemon
  // cannot go on without passing stale bytes for current (fatal()).
  void Run();
  // Why the loop stopped on its own; OK when it did not.
  const Status& fatal() const { return fatal_; }
  // Thread-safe.
  void Stop();
  // Thread-safe: runs `fn` on the loop thread.
  void Post(std::function<void()> fn);

  // --- loop thread only (call from Post) ---

  // Makes a region's pages usable here: a PageStore for its bytes.
  // Errors: kAlreadyExists, and PageStore's.
  Status OpenRegion(const proto::RegionReply& region);
  // One local access to the page containing `address`.
  void Access(proto::PageAddr address, bool write, AccessFn fn);
  // Gives up the node's copy of a page (memory pressure).
  bool Evict(proto::PageAddr page);
  const NodeDaemonStats& stats() const { return stats_; }
  // What the daemon reports in heartbeats and to dsvm_stats.
  proto::NodeCounters Counters() const;
  const NodeAgent& agent() const { return agent_; }
  // The GPU tier; null with device_backend "none".
  const DeviceTier* tier() const { return tier_.get(); }
  // Pages gpu-mapped on this node now (pinned), and directory messages held
  // for them.
  size_t gpu_mapped_pages() const { return gpu_pins_.size(); }
  // Regions deleted while local processes still map them (kept until then).
  size_t deleted_kept() const { return deleted_mapped_.size(); }
  size_t deferred_count() const;

 private:
  size_t fault_waiters_ = 0;  // waiters_ with fault set
  struct Waiter {
    proto::PageAddr page;
    AccessFn fn;          // an Access() call (`write`: for writing), or
    bool write = false;
    bool prefetch = false;  // a prefetch's access: fn gets no bytes
    bool fault = false;   // a client's fault, resolved through the backend
    FaultToken token;
  };
  // One dsvm_gpu_map of a client: pages [first, end) pinned on `gpu`.
  struct GpuMapping {
    proto::PageAddr region = 0;
    proto::PageAddr first = 0;
    proto::PageAddr end = 0;
    uint32_t page_size = 0;
    uint32_t gpu = 0;
    bool write = false;
    // Lost: the node dropped the map's pages while it lived (declared dead,
    // or the region deleted): `lost_why` says which. Its slots stay held, so
    // no other page takes the memory the client may still use, until it
    // unmaps (told kDataLoss) or leaves.
    bool lost = false;
    std::string lost_why;
    std::vector<HeldSlot> held;
    bool zero_copy = false;  // accessed-by: the GPU uses the host copy, no tier pins
    bool replica = false;    // read-mostly: a copy of its own in `held`, no tier pins
  };
  struct Client {
    UniqueFd fd;
    uint64_t serial = 0;  // unique for the daemon's life (a descriptor number is reused)
    pid_t pid = 0;
    uid_t uid = 0;
    gid_t gid = 0;
    std::map<proto::PageAddr, MappingId> mappings;  // by region base
    std::vector<GpuMapping> gpu_maps;
    // Regions this process opened or created through this daemon (the
    // coordinator checked its credentials), by base: the only ones it may
    // map, prefetch, advise or map on a GPU. The id tells a region from a
    // later one at the same addresses.
    std::map<proto::PageAddr, proto::RegionId> opened;
  };
  // A client's request forwarded to the coordinator, by the forward's request id.
  struct Forwarded {
    int client_fd;
    uint64_t client_serial;
    uint64_t client_request;
  };
  // A client's dsvm_prefetch, or a read-ahead of read-mostly pages: the
  // pages of [next, end) made valid, a bounded number of accesses at a time.
  struct Prefetch {
    int client_fd = -1;       // who is answered when done; -1: nobody (a read-ahead)
    uint64_t client_serial = 0;
    uint64_t client_request = 0;
    proto::PageAddr next = 0;
    proto::PageAddr end = 0;
    uint32_t page_size = 0;
    bool write = false;
    bool pumping = false;     // PumpPrefetch is issuing accesses for it now
    uint32_t in_flight = 0;
    Status error;             // the first access that failed
    // When set, called with the outcome instead of answering the client.
    std::function<void(Status)> done;
  };

  // The coordinator of one directory shard. shards_[0] is also the control
  // plane: membership, regions, peer lookups, forwarded client requests.
  // What a rejoin's thread brings back: the joined link, or why not.
  struct Rejoin {
    Status status;
    bool resume = false;       // asked to resume (the node's pages intact)
    uint64_t sent_ms = 0;      // when the JoinRequest left (NowMs's clock)
    proto::FramedSocket link;  // joined, when status is OK
    proto::JoinReply joined;
  };
  struct ShardLink {
    std::string address;
    proto::FramedSocket link;
    // Heartbeats not answered yet on this link: (request id, when sent),
    // oldest first; at most kMaxHeartbeatsInFlight.
    std::deque<std::pair<uint64_t, uint64_t>> heartbeats;
    uint64_t last_reconnect_ms = 0;
    // The node's lease on this shard's pages (docs/PROTOCOL.md, "Leases"):
    // until lease_until_ms the shard cannot have declared this node dead,
    // so local processes may use the node's copies of its pages. Each
    // answered heartbeat or join renews it to lease_ms after it was sent.
    uint64_t lease_ms = 0;
    uint64_t lease_until_ms = 0;
    // The lease lapsed and local access to the shard's pages was taken
    // away (Fence); it comes back with the shard's next answer.
    bool fenced = false;
    // The lease has not lapsed yet, but the node holds more than it could
    // fence after the lapse: its pages were taken away early. Accesses go
    // on until the lapse (mapping pages again), when the fence runs again.
    bool fenced_early = false;
    // Rejoin as a new daemon: another shard declared this node dead, so it
    // dropped every page, and this shard must hand its copies on too.
    bool fresh = false;
    // A rejoin in flight on a thread of its own (ReconnectCoordinator).
    std::future<Rejoin> rejoin;
  };

  NodeDaemon(const NodeDaemonOptions& options, const proto::JoinReply& joined,
             std::vector<ShardLink> shards, std::unique_ptr<UcxTransport> transport,
             std::shared_ptr<const proto::ClusterSecret> secret);
  // One join on `link`, each request waiting timeout_ms for its answer. A
  // refusal because the id is live on another connection (kUnavailable:
  // this daemon's former connection or process, not yet seen closed or
  // quiet by the coordinator, or another daemon with the same id) is asked
  // again every kJoinRetryMs for up to live_wait_ms, then returned.
  // `sent_ms`: when the last JoinRequest left (NowMs's clock), from which
  // the lease of its answer runs. Errors: the link's, and the coordinator's
  // refusal.
  static Result<proto::JoinReply> Join(proto::FramedSocket& link, const NodeDaemonOptions& o,
                                       proto::NodeId as, const std::string& peer_address,
                                       bool resume, int timeout_ms, int live_wait_ms,
                                       uint64_t* sent_ms);
  Status Setup();
  void DrainPosted();
  // Sends what the turn queued: peers' page batches, coordinator links.
  void FlushOutgoing();
  void OnCoordinatorReadable(size_t shard);
  void OnTimer();
  // A heartbeat to each connected shard when one is due. Also called by
  // the GPU tier while its copies hold the loop (DeviceTierOptions::
  // keep_alive): a busy node is not a dead one.
  void BeatIfDue();
  // Starts a rejoin of the shard on a thread of its own (connect,
  // handshake, join); FinishRejoin takes its result on the loop.
  void ReconnectCoordinator(size_t shard);
  void FinishRejoin(size_t shard);
  // Leases. Whether the lease of the shard that holds `page` has lapsed:
  // local accesses of the page wait (Park) until it is renewed.
  bool LeaseLapsed(proto::PageAddr page) const;
  // The shard answered a heartbeat or join sent at `sent_ms`: the lease
  // runs to sent_ms + lease_ms, and a fence is lifted (the parked accesses
  // run at the top of the next loop turn).
  void RenewLease(size_t shard, uint64_t sent_ms);
  // From OnTimer: fences each shard whose lease lapsed, or is about to for
  // a node that holds much (FenceLeadMs), after reading what its link has
  // brought (an answer may be waiting unread).
  void CheckLeases();
  // Takes local processes' access to the shard's pages away (the backend's
  // Unmap, the agent's state unchanged): they fault, and after the lapse
  // the faults wait. `early`: before the lapse (ShardLink::fenced_early).
  void Fence(size_t shard, bool early);
  // The time before the lapse at which a fence starts (FenceLeadMs), for
  // what the node held at its last heartbeat.
  uint64_t FenceLead(const ShardLink& s) const;
  // At each heartbeat: held_bytes_, and a warning when the lease is too
  // short for it (FenceOutlastsMargin).
  void UpdateHeldBytes();
  // From OnTimer: counts and logs a loop that stood still for more than
  // half a lease's margin since the last timer turn.
  void NoteStall(uint64_t now);
  // Keeps an access for when its page's lease is back.
  void Park(std::function<void()> access);
  void RunParked();
  // If `rid` names a heartbeat sent on `s`, forgets it and every older one
  // and gives when it was sent.
  static std::optional<uint64_t> TakeHeartbeat(ShardLink& s, uint64_t rid);
  // Closes shard's link (reconnected by OnTimer); with shard 0, fails the
  // client requests forwarded on it.
  void CloseShardLink(size_t shard);
  // The shard whose link has `fd`; shards_.size() if none.
  size_t ShardOfFd(int fd) const;
  // The control-plane link (shard 0's coordinator).
  proto::FramedSocket& control() { return shards_[0].link; }
  // The link of the shard that holds `page`'s directory entry.
  proto::FramedSocket& LinkFor(proto::PageAddr page) {
    return shards_[shard_map_.ShardOf(page)].link;
  }
  // The coordinator declared this node dead (it was cut off or stalled): the
  // directory has handed its copies on, so every local copy is stale. Drops
  // them all and ends every wait, so processes fault and fetch afresh.
  void DropEverything(const std::string& why);
  // Ends waits the agent forgot: a process's fault is retried, an Access()
  // call fails with `why`.
  void EndWaits(const std::vector<WaiterId>& waiting, const std::string& why);
  // agent_.ForgetRange, and the bytes received for those pages and not yet
  // installed go too (the agent forgets their handles).
  std::vector<WaiterId> ForgetPages(proto::PageAddr begin, proto::PageAddr end);
  // Forgets the store at `base` (its region was deleted) and its pages.
  // Errors: kFailedPrecondition (local processes still map it).
  Status DropRegion(proto::PageAddr base, const std::string& why);
  // The coordinator deleted a region: drops this node's copy if it has one
  // of that id and no local process maps it.
  void HandleRegionDeleted(const proto::RegionDeleted& m);
  // Drops the deleted regions kept for their local mappings that no local
  // process maps any more. Called wherever a mapping goes.
  void DropUnmappedDeleted();
  // Whether `page` is of a region deleted but kept for local mappings
  // (deleted_mapped_). Accesses of such pages that reach the daemon fail:
  // the directory knows pages by address only, and would answer for
  // whatever region took the addresses since.
  bool IsOfADeletedRegion(proto::PageAddr page) const;
  // Whether the node may give `page` up (Evict, the host budget's LeavePages).
  bool MayGiveUp(proto::PageAddr page) const;
  void HandleDirectoryMessage(proto::Message m);
  // Returns how much UCX work there was (0: none).
  size_t HandlePeerMessages();
  // Direct reads (PROTOCOL.md): whether a fault on `page` also asks a
  // holder; the ask itself (kAskHolder), to the page's page_hint_ or the
  // region's holder_hint_; and
  // a peer's ask, served by the agent when the page is at rest here.
  bool AsksHolder(proto::PageAddr page, bool write) const;
  void AskHolder(const PageStore& store, proto::PageAddr page);
  // Writes back a dirty GPU copy of `page` before a step that needs its
  // host bytes and cannot wait once the agent has taken it (a Fetch, an
  // ask, a give-up by Evict). False when a store refused it (full, a limit):
  // the tier keeps the copy and the caller leaves the step for a later try
  // (the directory resends a Fetch). True otherwise, also when the device
  // failed (the step's own write-back then stops the node).
  bool HostBytesCurrent(proto::PageAddr page);
  // Records `node` (not this one, not kNoNode) as the guess for `page`.
  void NotePageHolder(proto::PageAddr page, proto::NodeId node);
  void HandleReadDirect(proto::NodeId from, const proto::ReadDirect& m, Actions* acts);
  void OnFaultEvents();
  // One client fault (an event of kind kFault).
  void HandleFault(const FaultEvent& e);
  void OnClientListenReadable();
  void OnClientReadable(int fd);
  void CloseClient(int fd);
  // Marks every live gpu map of [begin, end) lost (`why`) and keeps its
  // GPU slots held, then forgets the range's GPU pins: the pages are about
  // to leave the tier. Call before the tier drops them.
  void LoseGpuMaps(proto::PageAddr begin, proto::PageAddr end, const std::string& why);
  // Stops the loop for good: `why` is logged and kept in fatal_; no
  // action runs after it.
  void Fatal(Status why);
  bool IsClient(int fd, uint64_t serial) const;
  // OK when `address` lies in no region here (the request's own checks
  // say what is wrong), or in a region `client` opened; else
  // kPermissionDenied.
  Status CheckOpenedBy(const Client& client, proto::PageAddr address) const;
  // Checks that [address, address + length) lies in one open region; gives
  // its first page and the page after its last.
  Status CheckClientRange(proto::PageAddr address, uint64_t length, proto::PageAddr* first,
                          proto::PageAddr* end, uint32_t* page_size);
  // Access(), or (prefetch) one page of a prefetch: not counted as a fault.
  void AccessPage(proto::PageAddr address, bool write, AccessFn fn, bool prefetch);
  void StartPrefetch(Prefetch p);
  void PumpPrefetch(uint64_t id);
  Status SetAdvice(const proto::Advise& m);
  // The GPU tier: built by Create from the options.
  Status SetupDeviceTier();
  // dsvm_gpu_map: acquires the pages (as a prefetch), then pins them on the
  // GPU and answers the client; `round` counts acquisitions lost to remote
  // requests before the pin.
  // With `prefetch` (dsvm_gpu_prefetch): the pages are placed as a map
  // would place them, then unpinned, and the client gets a StatusReply.
  void StartGpuMap(int fd, uint64_t request, const proto::GpuMap& m, uint32_t round,
                   bool prefetch = false);
  void FinishGpuMap(int fd, uint64_t serial, uint64_t request, const proto::GpuMap& m,
                    uint32_t round, bool prefetch, Status acquired);
  // Ends one map: unpins its pages, and replays the directory messages held
  // for pages no map pins any more.
  void ReleaseGpuMap(const GpuMapping& g);
  // True when a directory message about a gpu-mapped page must wait for the
  // unmap (it would take the page, or downgrade a write-mapped one).
  bool MustDefer(const proto::Message& m) const;
  // Keeps a directory message for `page` behind those held already
  // (deferred_; a resend of one held is dropped).
  void Defer(proto::PageAddr page, proto::Message m);
  // A GPU map's tier calls, from its TierJob: the tier's keep_alive serves
  // the loop's peers, coordinator links and local faults between their
  // batches (ServeDuringTierJob), and what needs the tier, or pages whose
  // bytes it moves, waits for the job's end (EndTierJob): directory
  // messages and asks for those pages, faults on them, the tier's own
  // bookkeeping (TierNote), region deletions and forwarded replies.
  class TierJob {
   public:
    TierJob(NodeDaemon* d, std::span<const proto::PageAddr> pages);
    ~TierJob();
    TierJob(const TierJob&) = delete;
    TierJob& operator=(const TierJob&) = delete;
    // The job's main tier calls are done: later ones (a failure's, the
    // prefetch's LeavePages) only beat, and the tier's bookkeeping noted
    // meanwhile is applied now, before any of them.
    void StopServing();

   private:
    NodeDaemon* const d_;
  };
  void EndTierJob();
  void ApplyTierNotes();
  void ServeDuringTierJob();
  // During a TierJob: whether the job moves or may move the page's bytes
  // (a page of the map, a page the tier's call has touched, any page with
  // a GPU copy); false outside one.
  bool TierMayTouch(proto::PageAddr page) const;
  // During a TierJob: holds a directory message the job's end must see
  // (a page it may touch, a region deletion). False: handle it now.
  bool HoldForTierJob(proto::Message& m);
  // Gives up the pages the host budget sends away (NodeAgent::Evict).
  void LeavePages();
  // Same-node coherence of a write map: HideFromCpu takes local processes'
  // mappings of `pages` away while a GPU may write them; RevealToCpu, on a
  // local fault on one, writes its GPU copy back and maps it again as the
  // agent holds it (it also maps again a page a fence took: Leases). `writes_only`: the GPU copy is clean (a prefetch or a
  // placement of Modified pages), so local reads may go on: the pages are
  // only write-protected, and a local write reveals them (the next map
  // then refreshes the GPU copy).
  void HideFromCpu(std::span<const proto::PageAddr> pages, bool writes_only = false);
  Status RevealToCpu(proto::PageAddr page);
  // Whether local processes' mappings of `page` were taken away with its
  // state unchanged (for a GPU, or by a fence): RevealToCpu maps it again.
  bool TakenFromCpu(proto::PageAddr page) const {
    return gpu_hidden_.count(page) != 0 || fenced_pages_.count(page) != 0;
  }
  // After a read miss on `page`: reads ahead when the misses of its region
  // run sequentially (the window doubles while they do), or else, on
  // read-mostly pages, the next kReadAhead of them.
  void ReadAhead(proto::PageAddr page);
  // The sequential part of ReadAhead; false when the miss is not sequential.
  bool ReadAheadSequential(PageStore* store, proto::PageAddr page);
  // The preferred-node advice of `page`, or kNoNode.
  proto::NodeId PreferredNodeOf(proto::PageAddr page);
  uint32_t PreferredGpuOf(proto::PageAddr page) const;
  // Whether every page has read-mostly advice.
  bool AllReadMostly(std::span<const proto::PageAddr> pages) const;
  // A gpu map of pages with accessed-by advice for its GPU, held as
  // FinishGpuMap found them: pinned for coherence, the host copy current.
  void FinishZeroCopyMap(int fd, uint64_t request, const proto::GpuMap& m,
                         const std::vector<proto::PageAddr>& pages);
  // The GPU per-page advice (preferred GPU, accessed-by) names for `page`;
  // kNoGpuAdvice where none.
  uint32_t GpuAdviceOf(const std::map<proto::PageAddr, std::vector<uint32_t>>& advice,
                       proto::PageAddr page) const;
  // Preferred-GPU and accessed-by advice (they name a GPU of this node).
  Status SetGpuAdvice(const proto::Advise& m);
  // Options with their automatic values settled (fault_poll_us).
  static NodeDaemonOptions WithAutoDefaults(NodeDaemonOptions o);
  // Places `pages` (of one region, valid on the node) on their preferred
  // GPU: clean copies, unpinned, as a GPU prefetch leaves them; Modified
  // ones leave local page tables. Best effort (the budget may not hold them).
  void PlaceOnPreferredGpu(std::vector<proto::PageAddr> pages);
  void ReplyToClient(int fd, uint64_t request_id, const proto::Message& m, int attach_fd = -1);
  void ForwardedReply(const Forwarded& f, proto::Message m);
  Status SetupClientSocket();
  void Execute(Actions& actions);
  void ExecuteOne(Action& a);
  // ExecuteOne's GPU tier bookkeeping: a page installed (counted against
  // the host budget), given up (Drop), or kept after all (KeepOnNode).
  // Applied now, or noted while serving during a GPU map's copies (the
  // tier is in a call) and applied in order once they are done.
  struct TierNote {
    enum class Kind : uint8_t { kAddHostPage, kDrop, kKeepOnNode } kind;
    proto::PageAddr page;
  };
  void TierBookkeeping(TierNote n);
  void ApplyTierNote(TierNote n);
  // Execute's coalescing of neighbouring pages (a batch of pages received):
  // installs held in a run go to the store in one write, maps in one map of
  // the run, and wake-ups after both. False: `a` must run on its own, after
  // FlushRuns().
  bool Coalesce(Action& a);
  void FlushRuns();
  // Sends the page `header` names, whose `length` bytes `fill` writes (see
  // UcxTransport::SendPage), or holds it until the peer's address is known.
  // With `lent` (a PageStore::LendForSend view), the bytes leave from there
  // when the page goes alone (UcxTransport::SendPageFrom).
  void SendPage(proto::NodeId to, const proto::PageData& header, size_t length,
                const UcxTransport::PageFill& fill, std::shared_ptr<const uint8_t> lent = nullptr);
  // Whether pages of `store` are sent (received) without copies
  // (NodeDaemonOptions::zero_copy).
  bool ZeroCopyFor(const PageStore& store, bool receive) const;
  // The transport's ReceivePlacer: a view of the page in its store, when
  // the agent would take these bytes and the page is a hole here.
  std::shared_ptr<uint8_t> PlaceReceived(const proto::PageData& header, size_t length);
  // Makes received data the page's bytes: adopted where it arrived in place
  // (stats_.pages_received_in_place), else written. Drops the data.
  Status InstallReceived(PageStore& store, proto::PageAddr page, DataHandle handle);
  // Whether the page went to `to` for `txn` on the endpoint in use now.
  bool SentAlready(proto::NodeId to, proto::PageAddr page, proto::TxnId txn) const;
  // Forgets which pages of [first, end) were sent (a region dropped, a shard
  // rejoined, everything dropped): transaction numbers may start again.
  void ForgetSends(proto::PageAddr first, proto::PageAddr end);
  void LookupPeers();
  void FlushPendingPeers();
  PageStore* StoreOf(proto::PageAddr page) const;
  std::span<uint8_t> Bytes(proto::PageAddr page);
  // Runs an Access() call's fn on the page's bytes, which the node holds as
  // the access needs: the backend's copy written back to the store first,
  // and after a write the store's bytes made what local processes see.
  // A prefetch's fn gets no bytes (nothing to write back for it).
  void CallAccessFn(proto::PageAddr page, bool write, bool prefetch, const AccessFn& fn);
  uint64_t NowMs() const;

  NodeDaemonOptions options_;
  std::shared_ptr<const proto::ClusterSecret> secret_;  // null: none
  proto::NodeId id_;
  std::vector<ShardLink> shards_;
  proto::ShardMap shard_map_;
  std::unique_ptr<UcxTransport> transport_;
  uint32_t heartbeat_ms_;
  NodeAgent agent_;
  std::map<proto::PageAddr, std::unique_ptr<PageStore>> stores_;  // by region base
  std::map<proto::PageAddr, proto::RegionId> region_ids_;        // which region each store is
  // Per region (by base): the node that last sent this node a page of it,
  // which a direct read asks when page_hint_ has no guess.
  std::unordered_map<proto::PageAddr, proto::NodeId> holder_hint_;
  // Per page: the node that last sent this node that page, or that the
  // directory last named as its next holder (the writer an Invalidate names,
  // the requester a moving Fetch names), which a direct read asks first: in
  // a region whose pages different nodes write (a stencil's boundary rows),
  // a page's own holder is the better guess. At most kMaxPageHints; past
  // that the table starts again (NotePageHolder).
  std::unordered_map<proto::PageAddr, proto::NodeId> page_hint_;
  static constexpr size_t kMaxPageHints = size_t{1} << 16;
  // Deleted regions (base -> id) kept because local processes still map them.
  std::map<proto::PageAddr, proto::RegionId> deleted_mapped_;
  struct Received {
    proto::PageAddr page = 0;
    ReceivedPage bytes;
  };
  std::unordered_map<DataHandle, Received> data_;  // received, not yet installed
  DataHandle next_handle_ = 0;
  std::unordered_map<WaiterId, Waiter> waiters_;
  WaiterId next_waiter_ = 0;
  // PageData for peers whose address is being looked up; bounded.
  std::unordered_map<proto::NodeId, std::vector<proto::PageData>> pending_peer_;
  // The last kRecentSends pages sent straight to a peer: (peer, page, txn)
  // and the endpoint's generation. A directory that resends a transaction
  // (its requester asked again, e.g. because a large page is slow to come)
  // makes the agent send the page again; on the same endpoint that copy is
  // on its way already, so it is left out.
  struct SentPage {
    proto::NodeId peer = 0;
    proto::PageAddr page = 0;
    proto::TxnId txn = 0;
    bool operator==(const SentPage&) const = default;
  };
  struct SentPageHash {
    size_t operator()(const SentPage& s) const {
      return std::hash<uint64_t>()(s.page ^ (s.txn * 0x9e3779b97f4a7c15ull) ^
                                   (static_cast<uint64_t>(s.peer) << 48));
    }
  };
  std::unordered_map<SentPage, uint64_t, SentPageHash> recent_sends_;  // -> generation
  std::deque<SentPage> recent_sends_order_;  // oldest first
  size_t pending_peer_count_ = 0;
  uint64_t lookup_request_ = 0;  // request id of the NodeList in flight, 0 if none
  uint64_t last_heartbeat_ms_ = 0;
  std::unique_ptr<FaultBackend> backend_;
  int listen_fd_ = -1;
  std::unordered_map<int, Client> clients_;
  uint64_t next_client_serial_ = 0;
  std::unordered_map<uint64_t, Prefetch> prefetches_;
  uint64_t next_prefetch_ = 0;
  // Per open region (by base), the proto::Advice of each page; absent: all kNormal.
  std::map<proto::PageAddr, std::vector<proto::Advice>> advice_;
  // Preferred-node advice per region base, per page (kNoNode: none): where
  // the pages go when this node gives them up (Evict's target).
  std::map<proto::PageAddr, std::vector<proto::NodeId>> preferred_;
  // Per region: the GPU its pages are placed on (preferred-GPU advice), by
  // page index; kNoGpuAdvice where none.
  static constexpr uint32_t kNoGpuAdvice = ~0u;
  std::map<proto::PageAddr, std::vector<uint32_t>> preferred_gpu_;
  // Per region: the GPU whose maps of a page use the host copy (accessed-by
  // advice: zero-copy), by page index; kNoGpuAdvice where none.
  std::map<proto::PageAddr, std::vector<uint32_t>> accessed_by_;
  std::vector<proto::PageAddr> to_place_;  // installed Shared under preferred-GPU advice
  // Sequential read-ahead, per region (by base): where the last read miss
  // was and the window read ahead after it.
  // Held by Coalesce: [first, first + n pages) of one store.
  struct InstallRun {
    PageStore* store = nullptr;
    proto::PageAddr first = 0;
    std::vector<DataHandle> handles;  // one per page
  };
  struct MapRun {
    PageStore* store = nullptr;
    proto::PageAddr first = 0;
    size_t pages = 0;
    bool write = false;
  };
  InstallRun install_run_;
  MapRun map_run_;
  std::vector<Action> held_wakes_;
  struct ReadAheadState {
    proto::PageAddr last_miss = 0;
    proto::PageAddr window_begin = 0;  // [window_begin, window_end): read ahead
    proto::PageAddr window_end = 0;
    uint64_t pages = 0;                // the window's size
  };
  std::map<proto::PageAddr, ReadAheadState> read_ahead_;
  std::unordered_map<uint64_t, Forwarded> forwarded_;
  uint64_t window_base_ = 0;
  uint64_t window_size_ = 0;
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  int timer_fd_ = -1;
  bool stopping_ = false;
  Status fatal_;  // set once by Fatal
  std::mutex posted_mu_;  // guards posted_; lock order: leaf
  std::deque<std::function<void()>> posted_;
  NodeDaemonStats stats_;
  // The GPU tier (both null with device_backend "none"): one backend, the
  // tier over it (which makes a pool per region and GPU).
  std::unique_ptr<DeviceBackend> device_;
  std::unique_ptr<DeviceTier> tier_;
  bool leaving_ = false;  // LeavePages is running (it runs actions itself)
  struct GpuPins {
    uint32_t reads = 0;
    uint32_t writes = 0;
  };
  std::unordered_map<proto::PageAddr, GpuPins> gpu_pins_;  // gpu-mapped pages
  // Pages whose GPU copy may be newer than the host's (mapped for write on a
  // GPU): local processes' mappings of them are taken away (the backend's
  // Unmap, with the agent's state unchanged), so their next access faults
  // and reads the GPU's bytes, written back first (RevealToCpu). Also
  // Modified pages with a clean GPU copy (prefetch, placement): only
  // write-protected, so that a local write reveals them.
  std::unordered_set<proto::PageAddr> gpu_hidden_;
  // Pages whose local mappings a fence (or a map while the lease was
  // lapsed) took away, the agent's state unchanged: mapped again as the
  // agent holds them (RevealToCpu) at their next fault with the lease back.
  std::unordered_set<proto::PageAddr> fenced_pages_;
  // Accesses (client faults, Access calls, prefetches) that came while
  // their page's lease was lapsed, run again by RunParked.
  std::vector<std::function<void()>> parked_;
  // Client faults on pages hidden for the GPU whose write-back a store
  // refused: tried again at each OnTimer, until it goes through.
  std::vector<FaultEvent> held_for_write_back_;
  bool run_parked_ = false;  // a lease came back: RunParked at the next turn
  bool running_parked_ = false;  // RunParked is running them
  // What a fence would take, as of the last heartbeat: the bytes the
  // regions' memfds hold (PageStore::ResidentBytes, an upper bound).
  uint64_t held_bytes_ = 0;
  uint64_t last_timer_ms_ = 0;  // the last OnTimer, or the timer's start (NoteStall)
  // The fence rate (options' or measured by the last large fence).
  uint64_t fence_bytes_per_ms_ = kDefaultFenceBytesPerMs;
  uint64_t fence_warned_bytes_ = 0;  // held_bytes_ when FenceOutlastsMargin was last logged
  // The TierJob in progress (tier_job_), its pages, and whether the loop
  // is serving from the tier's keep_alive now (serving_).
  bool tier_job_ = false;
  bool serving_ = false;
  std::unordered_set<proto::PageAddr> tier_job_pages_;
  // What serving during a TierJob left for its end: the tier's bookkeeping
  // for pages the job does not touch, in order; pages whose directory
  // messages were deferred for it; region deletions; forwarded replies
  // (they may open a region); client faults.
  std::vector<TierNote> tier_notes_;
  std::unordered_set<proto::PageAddr> deferred_for_job_;
  std::vector<proto::Message> held_for_job_;
  std::vector<std::pair<Forwarded, proto::Message>> replies_held_for_job_;
  std::vector<FaultEvent> faults_held_for_job_;
  // PageData for pages the copies may touch, with their data_ handles.
  std::vector<std::pair<proto::PageData, DataHandle>> pages_held_for_job_;
  // The job's copies serve the loop until StopServing (its tier calls are
  // done; what follows in FinishGpuMap only beats).
  bool job_serves_ = false;
  // Accesses whose bytes need the tier, and clients whose close does.
  std::vector<std::function<void()>> after_tier_job_;
  // Directory messages held for gpu-mapped pages, per page in arrival order
  // (duplicates of one txn kept once; bounded by kMaxDeferredPerPage).
  std::unordered_map<proto::PageAddr, std::vector<proto::Message>> deferred_;
  IdleTrim idle_trim_;  // gives the heap back once page traffic stops
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_DAEMON_NODE_DAEMON_H_
