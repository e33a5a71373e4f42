// Every message that crosses a process boundary in dsvm.
//
// Wire format (all integers little-endian, fixed width):
//   header (24 bytes): magic u32 "DSVM", version u16, type u16,
//                      payload_length u32, reserved u32 (must be 0),
//                      request_id u64
//   payload: the fields of the message type, in the order its Visit() lists.
// Strings and byte blobs are a u32 length followed by the bytes, each with a
// per-field bound. Decode refuses anything malformed with a Status: wrong
// magic or version, unknown type, enum out of range, lengths that overrun or
// exceed their bound, trailing bytes, and values a type's Validate() refuses.
// It never allocates more than the bound.
//
// The message table (sender, receiver, state change) is in proto/PROTOCOL.md.
#ifndef DSVM_PROTO_MESSAGES_H_
#define DSVM_PROTO_MESSAGES_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "proto/status.h"

namespace dsvm::proto {

class Reader;  // proto/wire.h

using NodeId = uint32_t;    // 0 is never a node
using RegionId = uint64_t;  // 0 is never a region
using PageAddr = uint64_t;  // cluster-wide virtual address of a page's first byte
using TxnId = uint64_t;     // per-page directory transaction number; 0 = none yet

inline constexpr NodeId kNoNode = 0;
inline constexpr uint32_t kMagic = 0x4D565344;  // "DSVM" read as little-endian u32
inline constexpr uint16_t kWireVersion = 10;    // history: PROTOCOL.md, Versions
inline constexpr size_t kHeaderSize = 24;
// The smallest page size: every region's base and size are multiples of it.
inline constexpr uint32_t kMinPageSize = 4096;
inline constexpr uint32_t kMaxPageSize = 2u << 20;            // 2 MiB
inline constexpr uint32_t kMaxControlPayload = 64u << 10;     // every type but PageData
inline constexpr uint32_t kMaxDataPayload = kMaxPageSize + 64;
inline constexpr uint32_t kMaxNameLength = 255;               // region names
inline constexpr uint32_t kMaxAddressLength = 255;            // "host:port"
inline constexpr uint32_t kMaxTextLength = 1024;              // status messages
inline constexpr uint32_t kMaxBlobLength = 4096;              // opaque transport addresses
inline constexpr uint32_t kMaxSharersInReply = 1024;
inline constexpr uint32_t kMaxListEntries = 128;
inline constexpr uint32_t kMaxBatchPages = 64;          // pages in one PageBatch
inline constexpr uint32_t kMaxBatchBytes = 1u << 20;     // their bytes together
inline constexpr uint32_t kMaxRunPages = 1024;         // messages one PageRun stands for
inline constexpr uint32_t kMaxAuthBytes = 32;     // a nonce or an HMAC-SHA256 proof  // per list reply; 128 * ~300 B < 64 KiB

enum class MessageType : uint16_t {
  kInvalid = 0,
  // Control plane: node or tool <-> coordinator.
  kStatusReply = 1,
  kJoinRequest = 2,
  kJoinReply = 3,
  kHeartbeat = 4,
  kLeaveRequest = 5,
  kRegionCreate = 6,
  kRegionOpen = 7,
  kRegionDelete = 8,
  kRegionReply = 9,
  kPageQuery = 10,
  kPageQueryReply = 11,
  kNodeList = 12,
  kNodeListReply = 13,
  kRegionList = 14,
  kRegionListReply = 15,
  kAuthHello = 16,
  kAuthChallenge = 17,
  kAuthProof = 18,
  // Coherence plane: node <-> directory shard.
  kAcquire = 20,
  kGrant = 21,
  kFetch = 22,
  kInvalidate = 23,
  kInvalidateAck = 24,
  kDone = 25,
  kRelease = 26,
  kEvictReply = 27,
  // Data plane: node <-> node.
  kPageData = 30,
  kPeerHello = 31,
  kPeerChallenge = 32,
  kPeerProof = 33,
  // Client plane: libdsvm <-> dsvm-node over a UNIX socket.
  kClientHello = 40,
  kClientHelloReply = 41,
  kMapRegion = 42,
  kUnmapRegion = 43,
  kNodeStats = 44,
  kNodeStatsReply = 45,
  kPrefetch = 46,
  kAdvise = 47,
  kGpuMap = 48,
  kGpuMapReply = 49,
  // Control plane, continued (1..19 are taken).
  kRegionPages = 50,
  kRegionPagesReply = 51,
  kRegionDeleted = 52,
  kRegionWatch = 53,
  kRegionCreated = 54,
  kRegionSnapshotDone = 55,
  // Client plane, continued (40..49 are taken).
  kGpuUnmap = 56,
  kGpuPrefetch = 57,
  kPageBatch = 58,
  // Coherence plane, continued (20..27 are taken).
  kPageRun = 59,
  // Data plane, continued (30..33 are taken).
  kReadDirect = 60,
};

// What a node asks of the directory for one page.
enum class AccessKind : uint8_t {
  kInvalid = 0,
  kRead = 1,       // wants a Shared copy
  kWrite = 2,      // wants Modified, holding nothing
  kUpgrade = 3,    // wants Modified, holding a Shared copy (no data needed)
  kEvict = 4,      // drops a clean Shared copy
  kWriteback = 5,  // gives up the last copy (Modified or sole Shared): data moves elsewhere
};
inline constexpr uint8_t kMaxAccessKind = 5;

// MSI state of a page, as a node holds it or as the directory records it.
enum class PageState : uint8_t {
  kReserved = 0,
  kInvalid = 1,   // no copy (directory: no node holds one)
  kShared = 2,    // read-only copy; the directory names one sharer as owner (supplier)
  kModified = 3,  // the only copy, writable
};
inline constexpr uint8_t kMaxPageState = 3;

// Where a granted page's data comes from.
enum class DataSource : uint8_t {
  kReserved = 0,
  kZero = 1,   // never written: fill with zeros, no transfer
  kSelf = 2,   // the requester already holds the current data
  kOwner = 3,  // a PageData message from the owner, same txn
  kStash = 4,  // the requester's own stash of stash_txn (restored after an aborted move)
};
inline constexpr uint8_t kMaxDataSource = 4;

struct StatusReply {
  static constexpr MessageType kType = MessageType::kStatusReply;
  uint16_t code = 0;  // StatusCode
  std::string message;
  template <typename A> void Visit(A& a) { a.Code(code); a.Str(message, kMaxTextLength); }
};

// The authentication handshake (proto/auth.h; PROTOCOL.md, Authentication).
// Connector -> coordinator: the first message on every connection.
struct AuthHello {
  static constexpr MessageType kType = MessageType::kAuthHello;
  std::vector<uint8_t> nonce;  // kNonceSize bytes
  template <typename A> void Visit(A& a) { a.Blob(nonce, kMaxAuthBytes); }
};

// Coordinator -> connector: its nonce and its proof (empty when it runs
// without a secret, --insecure).
struct AuthChallenge {
  static constexpr MessageType kType = MessageType::kAuthChallenge;
  std::vector<uint8_t> nonce;
  std::vector<uint8_t> proof;
  template <typename A> void Visit(A& a) { a.Blob(nonce, kMaxAuthBytes); a.Blob(proof, kMaxAuthBytes); }
};

// Connector -> coordinator: its proof (empty: it has no secret). Reply:
// StatusReply, OK or PERMISSION_DENIED (then the connection closes).
struct AuthProof {
  static constexpr MessageType kType = MessageType::kAuthProof;
  std::vector<uint8_t> proof;
  template <typename A> void Visit(A& a) { a.Blob(proof, kMaxAuthBytes); }
};

// Node -> coordinator: join the cluster (or rejoin with the id it had).
struct JoinRequest {
  static constexpr MessageType kType = MessageType::kJoinRequest;
  NodeId node = kNoNode;  // kNoNode asks the coordinator to assign one
  std::string address;    // where peers reach this node, "host:port"
  uint64_t host_memory_bytes = 0;
  uint32_t gpu_count = 0;
  std::vector<uint8_t> transport_address;  // opaque (UCX worker address)
  // 1: the same daemon reconnecting with its pages intact; 0: a new daemon
  // process (the id's former pages are gone).
  uint8_t resume = 0;
  template <typename A> void Visit(A& a) {
    a.U32(node); a.Str(address, kMaxAddressLength); a.U64(host_memory_bytes);
    a.U32(gpu_count); a.Blob(transport_address, kMaxBlobLength); a.Flag(resume);
  }
};

struct JoinReply {
  static constexpr MessageType kType = MessageType::kJoinReply;
  NodeId node = kNoNode;
  uint32_t heartbeat_interval_ms = 0;
  uint32_t dead_after_ms = 0;
  uint32_t shard = 0;        // this coordinator's shard index
  uint32_t shard_count = 0;  // shards in the cluster's shard map
  uint64_t window_base = 0;  // the cluster-wide virtual address window
  uint64_t window_size = 0;
  template <typename A> void Visit(A& a) {
    a.U32(node); a.U32(heartbeat_interval_ms); a.U32(dead_after_ms); a.U32(shard);
    a.U32(shard_count); a.U64(window_base); a.U64(window_size);
  }
};

// A node daemon's counters since it started (statistics: they only grow
// within one daemon's life and start again at 0 with the next).
struct NodeCounters {
  uint64_t read_faults = 0;   // local reads of pages not valid on the node
  uint64_t write_faults = 0;  // local writes of pages the node did not own
  uint64_t local_hits = 0;    // faults resolved on the node without a message
  uint64_t pages_fetched = 0; // pages received from other nodes
  uint64_t pages_sent = 0;    // pages sent to other nodes
  uint64_t bytes_fetched = 0;
  uint64_t bytes_sent = 0;
  uint64_t invalidations = 0; // copies dropped on the directory's word
  uint64_t downgrades = 0;    // Modified pages made Shared on the directory's word
  uint64_t prefetched_pages = 0;
  // The GPU tier (zero without one).
  uint64_t gpu_maps = 0;            // dsvm_gpu_map calls that succeeded
  uint64_t gpu_zero_copy_maps = 0;  // of which of the host copy (accessed-by)
  uint64_t gpu_maps_lost = 0;       // maps whose pages the node lost (declared dead)
  uint64_t gpu_placed_pages = 0;    // pages placed by preferred-GPU advice
  uint64_t gpu_pages_in = 0;        // pages copied to a GPU
  uint64_t gpu_pages_out = 0;       // dirty pages written back from a GPU
  // Leases (wire version 5; PROTOCOL.md, Leases).
  uint64_t fences = 0;           // lapsed leases: the node took its pages from its processes
  uint64_t fenced_accesses = 0;  // accesses held until a lapsed lease came back
  // Direct reads (wire version 8; PROTOCOL.md, Direct reads).
  uint64_t direct_reads = 0;         // read faults answered by a holder's direct bytes
  uint64_t direct_reads_served = 0;  // ReadDirects this node answered with its copy
  // Direct GPU copies (wire version 9; docs/GPU.md, "Direct copies"): of
  // gpu_pages_in and gpu_pages_out, those copied straight between the
  // node's memory and the GPU, with no staging buffer.
  uint64_t gpu_direct_pages_in = 0;
  uint64_t gpu_direct_pages_out = 0;
  template <typename A> void Visit(A& a) {
    a.U64(read_faults); a.U64(write_faults); a.U64(local_hits); a.U64(pages_fetched);
    a.U64(pages_sent); a.U64(bytes_fetched); a.U64(bytes_sent); a.U64(invalidations);
    a.U64(downgrades); a.U64(prefetched_pages); a.U64(gpu_maps); a.U64(gpu_zero_copy_maps);
    a.U64(gpu_maps_lost); a.U64(gpu_placed_pages); a.U64(gpu_pages_in); a.U64(gpu_pages_out);
    a.U64(fences); a.U64(fenced_accesses); a.U64(direct_reads); a.U64(direct_reads_served);
    a.U64(gpu_direct_pages_in); a.U64(gpu_direct_pages_out);
  }
  bool operator==(const NodeCounters&) const = default;
};

// Node -> coordinator, every heartbeat interval. Reply: StatusReply.
struct Heartbeat {
  static constexpr MessageType kType = MessageType::kHeartbeat;
  NodeId node = kNoNode;
  NodeCounters counters;
  template <typename A> void Visit(A& a) { a.U32(node); counters.Visit(a); }
};

// Node -> coordinator: leaves cleanly. Reply: StatusReply.
struct LeaveRequest {
  static constexpr MessageType kType = MessageType::kLeaveRequest;
  NodeId node = kNoNode;
  template <typename A> void Visit(A& a) { a.U32(node); }
};

// Any client -> coordinator. Reply: RegionReply or StatusReply.
// Who a region request is for: the local process a node daemon forwards it
// for, as the daemon's socket saw it (SO_PEERCRED; the daemon overwrites
// whatever the process sent). Absent on a tool's own request: whoever holds
// the cluster secret administers the cluster.
struct Credentials {
  uint8_t present = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  template <typename A> void Visit(A& a) { a.Flag(present); a.U32(uid); a.U32(gid); }
  bool operator==(const Credentials&) const = default;
};

inline constexpr uint32_t kMaxRegionMode = 0777;
inline constexpr uint32_t kDefaultRegionMode = 0600;
inline constexpr uint32_t kMaxTokenLength = 255;

struct RegionCreate {
  static constexpr MessageType kType = MessageType::kRegionCreate;
  std::string name;
  uint64_t size = 0;        // bytes; rounded up to page_size
  uint32_t page_size = 0;   // 4096, 65536 or 2097152
  // Who may open it: permission bits as for a file (read and write both
  // needed), owner = the creator's credentials; and/or anyone presenting
  // `token` (empty: no token). Only a hash of the token is kept.
  uint32_t mode = kDefaultRegionMode;
  std::string token;
  Credentials creds;
  template <typename A> void Visit(A& a) {
    a.Str(name, kMaxNameLength); a.U64(size); a.U32(page_size); a.U32(mode);
    a.Str(token, kMaxTokenLength); creds.Visit(a);
  }
};

struct RegionOpen {
  static constexpr MessageType kType = MessageType::kRegionOpen;
  std::string name;
  std::string token;  // empty: none
  Credentials creds;
  template <typename A> void Visit(A& a) {
    a.Str(name, kMaxNameLength); a.Str(token, kMaxTokenLength); creds.Visit(a);
  }
};

// Reply: StatusReply. Only the owner, root or a tool may delete.
struct RegionDelete {
  static constexpr MessageType kType = MessageType::kRegionDelete;
  std::string name;
  Credentials creds;
  template <typename A> void Visit(A& a) { a.Str(name, kMaxNameLength); creds.Visit(a); }
};

struct RegionReply {
  static constexpr MessageType kType = MessageType::kRegionReply;
  RegionId region = 0;
  uint64_t base = 0;  // same address on every node
  uint64_t size = 0;
  uint32_t page_size = 0;
  std::string name;
  template <typename A> void Visit(A& a) {
    a.U64(region); a.U64(base); a.U64(size); a.U32(page_size); a.Str(name, kMaxNameLength);
  }
};

// Coordinator -> every live node connected when a RegionDelete was persisted
// and answered; unsolicited (request_id 0), sent once, never acknowledged.
// The node drops its copy of the region if it has one of this id and no
// local process maps it. A node that misses it learns lazily (PROTOCOL.md,
// Refusals).
struct RegionDeleted {
  static constexpr MessageType kType = MessageType::kRegionDeleted;
  RegionId region = 0;
  PageAddr base = 0;  // [base, base + size): where the region was
  uint64_t size = 0;
  template <typename A> void Visit(A& a) { a.U64(region); a.U64(base); a.U64(size); }
  // Decode refuses region 0, size 0, a base or size that is not a multiple
  // of kMinPageSize, and a range that wraps. Errors: kCorruption.
  Status Validate() const;
};

// Follower shard -> shard 0, on an authenticated tool connection (no
// JoinRequest, no credentials): "send me the region table and every change
// to it" (PROTOCOL.md, Shards). Shard 0 answers with one RegionCreated per
// region, in id order, then RegionSnapshotDone, all with this request's id;
// from then on it pushes, unsolicited (request_id 0), a RegionCreated after
// each create and a RegionDeleted after each delete, in the order it made
// them, until the connection closes. A second RegionWatch on the connection
// gets a fresh snapshot. A coordinator that is not the region authority
// answers StatusReply FAILED_PRECONDITION.
struct RegionWatch {
  static constexpr MessageType kType = MessageType::kRegionWatch;
  template <typename A> void Visit(A&) {}
};

// Shard 0 -> watching shard: region `region` is at [base, base + size) with
// pages of `page_size`: part of a snapshot, or (request_id 0) just created
// and persisted. The follower adds it to its region table.
struct RegionCreated {
  static constexpr MessageType kType = MessageType::kRegionCreated;
  RegionId region = 0;
  PageAddr base = 0;
  uint64_t size = 0;
  uint32_t page_size = 0;
  std::string name;
  template <typename A> void Visit(A& a) {
    a.U64(region); a.U64(base); a.U64(size); a.U32(page_size); a.Str(name, kMaxNameLength);
  }
  // Decode refuses region 0, an empty name, a page size other than 4 KiB,
  // 64 KiB or 2 MiB, size 0, a base or size that is not a multiple of the
  // page size, and a range that wraps. Errors: kCorruption.
  Status Validate() const;
};

// Shard 0 -> watching shard: the snapshot answering a RegionWatch is
// complete; `regions` RegionCreated messages came before it. The follower
// now makes its table exactly that snapshot.
struct RegionSnapshotDone {
  static constexpr MessageType kType = MessageType::kRegionSnapshotDone;
  uint64_t regions = 0;
  // The id shard 0 gives its next region (wire version 5): every id below
  // it was given, so one of them not in the snapshot was deleted.
  RegionId next_region = 0;
  template <typename A> void Visit(A& a) { a.U64(regions); a.U64(next_region); }
};

// Tool -> coordinator: the directory's record of one page. Reply: PageQueryReply.
struct PageQuery {
  static constexpr MessageType kType = MessageType::kPageQuery;
  PageAddr page = 0;
  template <typename A> void Visit(A& a) { a.U64(page); }
};

struct PageQueryReply {
  static constexpr MessageType kType = MessageType::kPageQueryReply;
  PageAddr page = 0;
  PageState state = PageState::kInvalid;
  NodeId owner = kNoNode;
  uint64_t version = 0;
  TxnId txn = 0;
  uint8_t lost = 0;  // 1: the only copy died with its node
  uint8_t busy = 0;  // 1: a transaction is in flight
  std::vector<NodeId> sharers;  // the first kMaxSharersInReply holders
  template <typename A> void Visit(A& a) {
    a.U64(page); a.Enum(state, kMaxPageState); a.U32(owner); a.U64(version); a.U64(txn);
    a.Flag(lost); a.Flag(busy); a.U32List(sharers, kMaxSharersInReply);
  }
};

// Node or tool -> coordinator: members with id > start_after. Reply: NodeListReply.
struct NodeList {
  static constexpr MessageType kType = MessageType::kNodeList;
  NodeId start_after = kNoNode;
  template <typename A> void Visit(A& a) { a.U32(start_after); }
};

struct NodeEntry {
  NodeId node = kNoNode;
  uint8_t live = 0;
  std::string address;  // the node's UCX listener, "host:port"
  uint64_t host_memory_bytes = 0;
  uint32_t gpu_count = 0;
  NodeCounters counters;  // from its latest heartbeat; zero before the first
  template <typename A> void Visit(A& a) {
    a.U32(node); a.Flag(live); a.Str(address, kMaxAddressLength); a.U64(host_memory_bytes);
    a.U32(gpu_count); counters.Visit(a);
  }
};

struct NodeListReply {
  static constexpr MessageType kType = MessageType::kNodeListReply;
  std::vector<NodeEntry> nodes;  // id order, at most kMaxListEntries
  uint8_t more = 0;              // 1: ask again after the last id
  template <typename A> void Visit(A& a) { a.List(nodes, kMaxListEntries); a.Flag(more); }
};

// Tool -> coordinator: where the pages of region `name` are, as this
// coordinator's shard of the directory knows them. Reply: RegionPagesReply.
struct RegionPages {
  static constexpr MessageType kType = MessageType::kRegionPages;
  std::string name;
  template <typename A> void Visit(A& a) { a.Str(name, kMaxNameLength); }
};

struct NodePages {
  NodeId node = kNoNode;
  uint64_t modified = 0;  // pages this node holds Modified
  uint64_t shared = 0;    // pages this node holds a Shared copy of
  template <typename A> void Visit(A& a) { a.U32(node); a.U64(modified); a.U64(shared); }
};

struct RegionPagesReply {
  static constexpr MessageType kType = MessageType::kRegionPagesReply;
  RegionId region = 0;
  uint64_t pages = 0;    // in the region
  uint64_t touched = 0;  // with a directory record here (never touched: zero, nowhere)
  uint64_t lost = 0;
  uint64_t in_flight = 0;
  std::vector<NodePages> nodes;  // node order, at most kMaxListEntries
  template <typename A> void Visit(A& a) {
    a.U64(region); a.U64(pages); a.U64(touched); a.U64(lost); a.U64(in_flight);
    a.List(nodes, kMaxListEntries);
  }
};

// Tool -> coordinator: regions with id > start_after. Reply: RegionListReply.
struct RegionList {
  static constexpr MessageType kType = MessageType::kRegionList;
  RegionId start_after = 0;
  template <typename A> void Visit(A& a) { a.U64(start_after); }
};

struct RegionListReply {
  static constexpr MessageType kType = MessageType::kRegionListReply;
  std::vector<RegionReply> regions;  // id order, at most kMaxListEntries
  uint8_t more = 0;
  template <typename A> void Visit(A& a) { a.List(regions, kMaxListEntries); a.Flag(more); }
};

// Node -> directory: a request for one page. A node has at most one request
// outstanding per page; request_seq grows per node, so replies can be matched
// and duplicates recognised. last_txn is the newest txn of this page that the
// node has processed: the directory uses it to tell a stale duplicate from a
// new request (PROTOCOL.md, "Duplicates"). `region` is the id of the region
// the node maps at `page` (wire version 5): a directory whose region at that
// address has another id does not serve it as that region's page
// (PROTOCOL.md, "Refusals" and "Shards").
struct Acquire {
  static constexpr MessageType kType = MessageType::kAcquire;
  bool operator==(const Acquire&) const = default;
  PageAddr page = 0;
  NodeId node = kNoNode;
  AccessKind kind = AccessKind::kRead;
  uint64_t request_seq = 0;
  TxnId last_txn = 0;
  // For kEvict and kWriteback: the node the giver would have take the last
  // copy (its preferred-node advice); kNoNode: the directory picks.
  NodeId target = kNoNode;
  RegionId region = 0;
  template <typename A> void Visit(A& a) {
    a.U64(page); a.U32(node); a.Enum(kind, kMaxAccessKind); a.U64(request_seq); a.U64(last_txn);
    a.U32(target); a.U64(region);
  }
  // Errors: kCorruption (region 0).
  Status Validate() const;
};

// Directory -> node: the node now holds the page in `state` at `version`.
// Sent to the requester, or unsolicited (writeback target, restore).
struct Grant {
  static constexpr MessageType kType = MessageType::kGrant;
  bool operator==(const Grant&) const = default;
  PageAddr page = 0;
  TxnId txn = 0;
  uint64_t request_seq = 0;  // echo of the Acquire's; 0 when unsolicited
  PageState state = PageState::kShared;
  DataSource source = DataSource::kZero;
  uint16_t status = 0;       // StatusCode: kOk, or kDataLoss (page lost; no state change)
  uint64_t version = 0;
  TxnId stash_txn = 0;       // with kStash: the txn whose stash to restore
  template <typename A> void Visit(A& a) {
    a.U64(page); a.U64(txn); a.U64(request_seq); a.Enum(state, kMaxPageState);
    a.Enum(source, kMaxDataSource); a.Code(status); a.U64(version); a.U64(stash_txn);
  }
};

// Directory -> owner: send your copy to `requester` (if send_data), then
// keep a Shared copy (state kShared) or drop it into a stash (kInvalid).
struct Fetch {
  static constexpr MessageType kType = MessageType::kFetch;
  bool operator==(const Fetch&) const = default;
  PageAddr page = 0;
  TxnId txn = 0;
  NodeId requester = kNoNode;
  PageState next_state = PageState::kShared;  // kShared or kInvalid
  uint8_t send_data = 1;
  template <typename A> void Visit(A& a) {
    a.U64(page); a.U64(txn); a.U32(requester); a.Enum(next_state, kMaxPageState);
    a.Flag(send_data);
  }
};

// Directory -> sharer: drop your Shared copy and acknowledge. `writer` is
// the node the write goes to (the txn's requester), where a later read of
// the page may ask first (Direct reads); kNoNode when none.
struct Invalidate {
  static constexpr MessageType kType = MessageType::kInvalidate;
  bool operator==(const Invalidate&) const = default;
  PageAddr page = 0;
  TxnId txn = 0;
  NodeId writer = kNoNode;
  template <typename A> void Visit(A& a) { a.U64(page); a.U64(txn); a.U32(writer); }
};

struct InvalidateAck {
  static constexpr MessageType kType = MessageType::kInvalidateAck;
  bool operator==(const InvalidateAck&) const = default;
  PageAddr page = 0;
  TxnId txn = 0;
  NodeId node = kNoNode;
  template <typename A> void Visit(A& a) { a.U64(page); a.U64(txn); a.U32(node); }
};

// Requester -> directory: it installed the grant of txn; the page is free for
// the next transaction.
struct Done {
  static constexpr MessageType kType = MessageType::kDone;
  bool operator==(const Done&) const = default;
  PageAddr page = 0;
  TxnId txn = 0;
  NodeId node = kNoNode;
  template <typename A> void Visit(A& a) { a.U64(page); a.U64(txn); a.U32(node); }
};

// Directory -> former owner: the move of txn is complete; free its stash.
struct Release {
  static constexpr MessageType kType = MessageType::kRelease;
  bool operator==(const Release&) const = default;
  PageAddr page = 0;
  TxnId txn = 0;
  template <typename A> void Visit(A& a) { a.U64(page); a.U64(txn); }
};

// Directory -> node: answer to an Evict or Writeback that needed no data move
// (kOk), or that cannot be done (kFailedPrecondition: no other live node to
// take the last copy; the node keeps it). The node raises its last_txn to
// `txn`, so a Fetch sent while it was a sharer and delivered late is stale.
struct EvictReply {
  static constexpr MessageType kType = MessageType::kEvictReply;
  bool operator==(const EvictReply&) const = default;
  PageAddr page = 0;
  uint64_t request_seq = 0;
  uint16_t status = 0;
  TxnId txn = 0;  // the page's newest txn; the page is idle, so every txn up to it is complete
  template <typename A> void Visit(A& a) {
    a.U64(page); a.U64(request_seq); a.Code(status); a.U64(txn);
  }
};

// Owner -> requester (over UCX between node daemons): the page's bytes for
// txn. Txn 0 (no txn has that number): a direct read's bytes, the sender's
// copy at `version`, which the requester installs only with a Shared grant
// of that very version (wire version 8; PROTOCOL.md, "Direct reads").
// `region` (wire version 8): the id of the sender's region at `page`; a
// receiver whose region there has another id drops the bytes (the region
// was deleted and another made at its addresses meanwhile, where txns and
// versions start again).
struct PageData {
  static constexpr MessageType kType = MessageType::kPageData;
  PageAddr page = 0;
  TxnId txn = 0;
  NodeId sender = kNoNode;
  uint64_t version = 0;
  std::vector<uint8_t> data;
  RegionId region = 0;
  template <typename A> void Visit(A& a) {
    a.U64(page); a.U64(txn); a.U32(sender); a.U64(version); a.U64(region);
    a.Blob(data, kMaxPageSize);
  }
};

// One page of a PageBatch: PageData's fields but the bytes, and how many
// bytes of the batch's data are this page's.
struct BatchedPage {
  PageAddr page = 0;
  TxnId txn = 0;
  uint64_t version = 0;
  uint32_t length = 0;
  RegionId region = 0;
  template <typename A> void Visit(A& a) {
    a.U64(page); a.U64(txn); a.U64(version); a.U32(length); a.U64(region);
  }
};

// Owner -> requester (over UCX between node daemons): several pages for one
// peer in one active message (wire version 4). The pages' bytes, in order,
// are the active message's data; `pages` says how they divide. Each page is
// handled exactly as the PageData it stands for.
struct PageBatch {
  static constexpr MessageType kType = MessageType::kPageBatch;
  NodeId sender = kNoNode;
  std::vector<BatchedPage> pages;
  template <typename A> void Visit(A& a) { a.U32(sender); a.List(pages, kMaxBatchPages); }
  // At least one page; each length a positive multiple of kMinPageSize and
  // at most kMaxPageSize; together at most kMaxBatchBytes. Errors: kCorruption.
  Status Validate() const;
  uint64_t TotalBytes() const;
};

// Node <-> directory: `count` coherence messages of one type in one frame,
// for the many pages a prefetch, a read-ahead or a region's invalidation
// moves at once. Message i is `first` with its page advanced by
// i * page_stride and, for the types that carry one (Acquire, Grant,
// EvictReply), its request_seq by i * seq_stride; every other field is the
// same. Senders pack consecutive messages into runs (RunPacker) and receivers
// expand them (PageRunAt) before anything else looks at them, so a run means
// exactly what its messages one by one would.
struct PageRun {
  static constexpr MessageType kType = MessageType::kPageRun;
  using Item = std::variant<Acquire, Grant, Fetch, Invalidate, InvalidateAck, Done, Release,
                            EvictReply>;
  uint32_t count = 0;
  uint32_t page_stride = 0;
  uint8_t seq_stride = 0;
  Item first;
  template <typename A> void Visit(A& a) {
    uint16_t inner = static_cast<uint16_t>(ItemType(first));
    a.U16(inner);
    if constexpr (std::is_same_v<A, Reader>) {
      if (!MakeItem(static_cast<MessageType>(inner), &first)) {
        a.Refuse("message type " + std::to_string(inner) + " cannot be in a PageRun");
      }
    }
    a.U32(count); a.U32(page_stride); a.Flag(seq_stride);
    std::visit([&a](auto& x) { x.Visit(a); }, first);
  }
  // count in [2, kMaxRunPages]; page_stride a positive multiple of
  // kMinPageSize, at most kMaxPageSize; seq_stride (a flag) 0 for a type
  // without request_seq; the last page and request_seq do not wrap; `first`
  // valid. Errors: kCorruption.
  Status Validate() const;
  static MessageType ItemType(const Item& item);
  // Builds the alternative of type `t`; false if `t` is not one.
  static bool MakeItem(MessageType t, Item* item);
};

// First message on a new node-to-node endpoint: who is calling. Then a
// challenge-response with the cluster secret (PeerChallenge, PeerProof)
// before the listener accepts any other message on the endpoint.
struct PeerHello {
  static constexpr MessageType kType = MessageType::kPeerHello;
  NodeId node = kNoNode;
  std::vector<uint8_t> nonce;  // kNonceSize bytes
  template <typename A> void Visit(A& a) { a.U32(node); a.Blob(nonce, kMaxAuthBytes); }
};

// Listener -> connector, answering PeerHello: its nonce and its proof.
struct PeerChallenge {
  static constexpr MessageType kType = MessageType::kPeerChallenge;
  std::vector<uint8_t> nonce;
  std::vector<uint8_t> proof;
  template <typename A> void Visit(A& a) { a.Blob(nonce, kMaxAuthBytes); a.Blob(proof, kMaxAuthBytes); }
};

// Requester -> a node it guesses holds the page (over UCX, wire version 8):
// send me your copy of `page` now, as PageData with txn 0, if you hold it
// and nothing is under way for it; else ignore this. Sent alongside the
// Acquire, never instead of it (PROTOCOL.md, "Direct reads"). `region` is
// the id of the region the requester maps there: a node whose region at
// the page has another id ignores it.
struct ReadDirect {
  static constexpr MessageType kType = MessageType::kReadDirect;
  bool operator==(const ReadDirect&) const = default;
  PageAddr page = 0;
  NodeId node = kNoNode;  // the requester
  RegionId region = 0;
  template <typename A> void Visit(A& a) { a.U64(page); a.U32(node); a.U64(region); }
  // Errors: kCorruption (region 0, a page not a multiple of kMinPageSize).
  Status Validate() const;
};

// Connector -> listener: its proof; from here on the listener accepts the
// endpoint's messages as the node's.
struct PeerProof {
  static constexpr MessageType kType = MessageType::kPeerProof;
  std::vector<uint8_t> proof;
  template <typename A> void Visit(A& a) { a.Blob(proof, kMaxAuthBytes); }
};

// The ABI version libdsvm and dsvm-node speak on the client plane.
// 3: GpuMap, GpuMapReply, GpuUnmap; 4: GpuPrefetch; 5: GPU advice, host
// maps; 6: lease counters; 7: direct-read counters; 8: direct GPU copy
// counters.
inline constexpr uint32_t kClientAbi = 8;

// Client -> daemon: the first record on a client connection.
struct ClientHello {
  static constexpr MessageType kType = MessageType::kClientHello;
  uint32_t abi = kClientAbi;
  template <typename A> void Visit(A& a) { a.U32(abi); }
};

struct ClientHelloReply {
  static constexpr MessageType kType = MessageType::kClientHelloReply;
  NodeId node = kNoNode;
  uint64_t window_base = 0;
  uint64_t window_size = 0;
  template <typename A> void Visit(A& a) { a.U32(node); a.U64(window_base); a.U64(window_size); }
};

// Client -> daemon, with [fault fd, pidfd] attached: serve the client's
// mapping of the region at `base`. Reply: StatusReply.
struct MapRegion {
  static constexpr MessageType kType = MessageType::kMapRegion;
  PageAddr base = 0;
  template <typename A> void Visit(A& a) { a.U64(base); }
};

// Client -> daemon: stop serving the client's mapping at `base`. Reply: StatusReply.
struct UnmapRegion {
  static constexpr MessageType kType = MessageType::kUnmapRegion;
  PageAddr base = 0;
  template <typename A> void Visit(A& a) { a.U64(base); }
};

// Client -> daemon: the node's counters. Reply: NodeStatsReply.
struct NodeStats {
  static constexpr MessageType kType = MessageType::kNodeStats;
  template <typename A> void Visit(A&) {}
};

struct NodeStatsReply {
  static constexpr MessageType kType = MessageType::kNodeStatsReply;
  NodeId node = kNoNode;
  uint32_t clients = 0;  // processes connected to the daemon now
  NodeCounters counters;
  template <typename A> void Visit(A& a) { a.U32(node); a.U32(clients); counters.Visit(a); }
};

// Client -> daemon: make the pages of [address, address + length) valid on
// the node, Shared or (write) Modified. Reply: StatusReply once all are, or
// the first error.
struct Prefetch {
  static constexpr MessageType kType = MessageType::kPrefetch;
  PageAddr address = 0;
  uint64_t length = 0;
  uint8_t write = 0;
  template <typename A> void Visit(A& a) { a.U64(address); a.U64(length); a.Flag(write); }
};

// What a process expects of a range's accesses (dsvm_advise).
enum class Advice : uint8_t {
  kInvalid = 0,
  kNormal = 1,      // no advice: each fault fetches its own page
  kReadMostly = 2,  // a read fault also fetches the next pages of the range
  kPreferredNode = 3,  // pages this node gives up go to `node` (Advise.node)
  kPreferredGpu = 4,   // pages Shared on this node get a copy on GPU `node` (Advise.node)
  kAccessedBy = 5,     // gpu maps on GPU `node` (Advise.node) use the host copy: zero-copy
};
inline constexpr uint8_t kMaxAdvice = 5;

// Client -> daemon: advice for [address, address + length), for every
// process of the node. Reply: StatusReply.
struct Advise {
  static constexpr MessageType kType = MessageType::kAdvise;
  PageAddr address = 0;
  uint64_t length = 0;
  Advice advice = Advice::kNormal;
  NodeId node = kNoNode;  // the node (or, GPU advice, the GPU) advice names; else 0
  template <typename A> void Visit(A& a) {
    a.U64(address); a.U64(length); a.Enum(advice, kMaxAdvice); a.U32(node);
  }
};

// Client -> daemon (dsvm_gpu_map): make the pages of [address, address +
// length), inside one region and aligned to its pages, resident on GPU
// `gpu` of the node in one contiguous device range, holding them Shared or
// (write) Modified cluster-wide until GpuUnmap: while mapped, a directory
// request that would take them from the node (or, for a write map,
// downgrade them) waits (PROTOCOL.md, "GPU maps"). Reply: GpuMapReply, with
// the arena's memfd attached for an emulated device; or StatusReply.
struct GpuMap {
  static constexpr MessageType kType = MessageType::kGpuMap;
  PageAddr address = 0;
  uint64_t length = 0;
  uint32_t gpu = 0;
  uint8_t write = 0;
  template <typename A> void Visit(A& a) { a.U64(address); a.U64(length); a.U32(gpu); a.Flag(write); }
  // Decode refuses length 0, an address or length that is not a multiple of
  // kMinPageSize, and a range that wraps. Errors: kCorruption.
  Status Validate() const;
};

// What kind of device memory a GpuMapReply names.
enum class DeviceKind : uint8_t {
  kInvalid = 0,
  kEmulated = 1,  // host memory: the attached memfd is the arena (offset 0 = arena)
  kCuda = 2,      // cudaMalloc'd: ipc_handle is its cudaIpcMemHandle_t
  // Zero-copy (accessed-by advice): the "arena" is the mapped range of the
  // region itself (arena = its address, offset 0), host memory the GPU
  // reaches over the bus.
  kEmulatedHost = 3,  // the device pointer is the address itself
  kCudaHost = 4,      // the client registers the range with CUDA (mapped pinned memory)
};
inline constexpr uint8_t kMaxDeviceKind = 4;
inline constexpr uint32_t kCudaIpcHandleSize = 64;  // sizeof(cudaIpcMemHandle_t)

// Daemon -> client: the map's device range is [offset, offset + length) of
// the arena `arena` (an id the daemon keeps for the arena's life; the same
// arena has the same id in every reply) of `arena_bytes` on `gpu`.
struct GpuMapReply {
  static constexpr MessageType kType = MessageType::kGpuMapReply;
  uint32_t gpu = 0;
  DeviceKind kind = DeviceKind::kEmulated;
  uint64_t arena = 0;
  uint64_t arena_bytes = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<uint8_t> ipc_handle;  // kCuda: kCudaIpcHandleSize bytes; else empty
  template <typename A> void Visit(A& a) {
    a.U32(gpu); a.Enum(kind, kMaxDeviceKind); a.U64(arena); a.U64(arena_bytes); a.U64(offset);
    a.U64(length); a.Blob(ipc_handle, kCudaIpcHandleSize);
  }
  // Decode refuses arena 0, length 0, a range past the arena's end, and an
  // ipc_handle that does not match the kind. Errors: kCorruption.
  Status Validate() const;
};

// Client -> daemon (dsvm_gpu_unmap): ends this client's map of exactly
// [address, address + length). Reply: StatusReply.
struct GpuUnmap {
  static constexpr MessageType kType = MessageType::kGpuUnmap;
  PageAddr address = 0;
  uint64_t length = 0;
  template <typename A> void Visit(A& a) { a.U64(address); a.U64(length); }
  // As GpuMap's. Errors: kCorruption.
  Status Validate() const;
};

// Client -> daemon (dsvm_gpu_prefetch): makes [address, address + length)
// (whole pages) resident on GPU `gpu` of the node without pinning it,
// acquired Shared, or Modified with `write`, as a GpuMap would place it (so
// a later map of the range finds the pages in place). Reply: StatusReply.
struct GpuPrefetch {
  static constexpr MessageType kType = MessageType::kGpuPrefetch;
  PageAddr address = 0;
  uint64_t length = 0;
  uint32_t gpu = 0;
  uint8_t write = 0;
  template <typename A> void Visit(A& a) { a.U64(address); a.U64(length); a.U32(gpu); a.Flag(write); }
  // As GpuMap's. Errors: kCorruption.
  Status Validate() const;
};

using Message = std::variant<StatusReply, JoinRequest, JoinReply, Heartbeat, LeaveRequest,
                             RegionCreate, RegionOpen, RegionDelete, RegionReply, PageQuery,
                             PageQueryReply, NodeList, NodeListReply, RegionList, RegionListReply,
                             Acquire, Grant, Fetch, Invalidate, InvalidateAck,
                             Done, Release, EvictReply, PageData, PeerHello, ClientHello,
                             ClientHelloReply, MapRegion, UnmapRegion, NodeStats, NodeStatsReply,
                             Prefetch, Advise, AuthHello, AuthChallenge, AuthProof,
                             PeerChallenge, PeerProof, RegionPages, RegionPagesReply,
                             RegionDeleted, RegionWatch, RegionCreated, RegionSnapshotDone,
                             GpuMap, GpuMapReply, GpuUnmap, GpuPrefetch, PageBatch, PageRun,
                             ReadDirect>;

struct Header {
  uint32_t magic = kMagic;
  uint16_t version = kWireVersion;
  MessageType type = MessageType::kInvalid;
  uint32_t payload_length = 0;
  uint64_t request_id = 0;
};

struct Frame {
  Header header;
  Message message;
};

MessageType TypeOf(const Message& m);
const char* TypeName(MessageType t);

// Appends header + payload of `m` to `out`.
void EncodeTo(const Message& m, uint64_t request_id, std::vector<uint8_t>* out);
std::vector<uint8_t> Encode(const Message& m, uint64_t request_id);

// Decodes and validates a header (exactly kHeaderSize bytes). Errors:
// kCorruption for bad magic, reserved bits or a payload length over the
// type's bound; kInvalidArgument for an unknown type or version.
Result<Header> DecodeHeader(std::span<const uint8_t> bytes);

// Decodes the payload that follows a validated header. Errors: kCorruption.
Result<Message> DecodePayload(const Header& header, std::span<const uint8_t> payload);

// Decodes exactly one whole frame: header, payload, nothing after.
Result<Frame> Decode(std::span<const uint8_t> bytes);

// Message i (< run.count) of a validated run.
Message PageRunAt(const PageRun& run, uint32_t i);
// `m` as a run's item, if its type can be in a run.
std::optional<PageRun::Item> PageRunItemOf(const Message& m);

// Packs the coherence messages a sender queues into PageRun frames where
// they line up (same type, pages a fixed stride apart, request_seq 0 or 1
// apart, every other field equal, request_id 0), and encodes every other
// message as it is. Keeps one open run per type, so interleaved streams (a
// prefetch's Acquires between the Dones of its grants) each pack; messages
// of different types may so leave in another order than queued, which the
// protocol allows (PROTOCOL.md, Network model), but never two of one page.
// Finish() writes the open runs, oldest first.
class RunPacker {
 public:
  void Add(const Message& m, uint64_t request_id, std::vector<uint8_t>* out);
  void Finish(std::vector<uint8_t>* out);

 private:
  std::vector<PageRun> open_;  // at most one per type, oldest first
};

// Convenience for replies: StatusReply from a Status.
// A message longer than a StatusReply carries (kMaxTextLength) is cut, and
// says so: an error text built from paths or peer input must never make the
// reply unencodable.
inline StatusReply ToReply(const Status& s) {
  std::string text = s.message();
  if (text.size() > kMaxTextLength) {
    static constexpr std::string_view kCut = " [...]";
    text.resize(kMaxTextLength - kCut.size());
    text += kCut;
  }
  return StatusReply{static_cast<uint16_t>(s.code()), std::move(text)};
}
inline Status FromReply(const StatusReply& r) {
  if (r.code == 0) return Status::Ok();
  return Status(static_cast<StatusCode>(r.code), r.message);
}

}  // namespace dsvm::proto

#endif  // DSVM_PROTO_MESSAGES_H_
