// PageDirectory: the directory side of dsvm's MSI coherence protocol, for the
// pages of one shard. A pure state machine: no sockets, threads, clocks,
// storage or syscalls. Inputs are messages from nodes, membership changes and
// Tick(now); outputs are messages (Outbox) and the set of page records that
// changed (TakeDirty). The caller must persist the dirty records before it
// sends the outbox: what a node has been told is always on disk first
// (write-ahead), so a restarted directory resumes every transaction in flight.
//
// One transaction per page at a time: requests for a busy page wait in that
// page's queue (at most one per node) and run in arrival order. The protocol,
// its state tables and the rules for duplicates are in proto/PROTOCOL.md.
#ifndef DSVM_COORDINATOR_DIRECTORY_PAGE_DIRECTORY_H_
#define DSVM_COORDINATOR_DIRECTORY_PAGE_DIRECTORY_H_

#include <cstdint>
#include <optional>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "proto/messages.h"

namespace dsvm::coordinator {

using proto::AccessKind;
using proto::DataSource;
using proto::NodeId;
using proto::PageAddr;
using proto::PageState;
using proto::TxnId;

// The largest cluster one directory serves; bounds every per-page queue.
inline constexpr size_t kMaxNodes = 4096;

struct Outgoing {
  NodeId to = proto::kNoNode;
  proto::Message message;
};
using Outbox = std::vector<Outgoing>;

// A node holding a copy, and the txn in which it got its current role.
struct Sharer {
  NodeId node = proto::kNoNode;
  TxnId since = 0;
  template <typename A> void Visit(A& a) { a.U32(node); a.U64(since); }
};

// The transaction in flight on a page. The page record already shows the
// state after it; this holds what must still be delivered. A lost page
// (never busy) keeps here the txn it was lost in and, in pending_acks, the
// nodes that have not yet acknowledged being told (PageDirectory::TellLost).
struct Transaction {
  TxnId txn = 0;
  NodeId requester = proto::kNoNode;  // receives the Grant and answers Done
  uint64_t request_seq = 0;           // echoed in the Grant; 0 if unsolicited
  PageState grant_state = PageState::kShared;
  DataSource source = DataSource::kZero;
  TxnId stash_txn = 0;                // with DataSource::kStash
  NodeId fetch_from = proto::kNoNode; // the node sending data or stashing
  PageState fetch_next = PageState::kShared;
  uint8_t fetch_send_data = 0;
  PageState prev_state = PageState::kInvalid;  // to revert an aborted read
  std::vector<NodeId> pending_acks;   // Invalidate (or no-data Fetch; or a loss notice) not yet acked
  uint8_t grant_sent = 0;
  uint64_t last_send_ms = 0;          // not persisted meaningfully: 0 after restart
  template <typename A> void Visit(A& a) {
    a.U64(txn); a.U32(requester); a.U64(request_seq); a.Enum(grant_state, proto::kMaxPageState);
    a.Enum(source, proto::kMaxDataSource); a.U64(stash_txn); a.U32(fetch_from);
    a.Enum(fetch_next, proto::kMaxPageState); a.Flag(fetch_send_data);
    a.Enum(prev_state, proto::kMaxPageState); a.U32List(pending_acks, kMaxNodes);
    a.Flag(grant_sent); a.U64(last_send_ms);
  }
};

// What the directory knows of one page. This is what storage persists.
struct PageRecord {
  PageAddr page = 0;
  PageState state = PageState::kInvalid;  // kInvalid: no node holds a copy
  NodeId owner = proto::kNoNode;          // kModified: the writer; kShared: the supplier
  std::vector<Sharer> sharers;            // every holder, the owner included
  uint64_t version = 0;                   // bumped on every write grant
  TxnId txn = 0;                          // last txn number issued
  uint8_t lost = 0;                       // the only copy died with its node
  uint8_t busy = 0;
  Transaction tx;                         // valid when busy, or lost with notices owed
  template <typename A> void Visit(A& a) {
    a.U64(page); a.Enum(state, proto::kMaxPageState); a.U32(owner);
    a.List(sharers, kMaxNodes); a.U64(version); a.U64(txn); a.Flag(lost); a.Flag(busy);
    tx.Visit(a);
  }
  const Sharer* FindSharer(NodeId n) const;
};

struct DirectoryOptions {
  uint64_t retransmit_after_ms = 200;  // resend a transaction's messages after this
  uint32_t page_size = 4096;           // for the writeback target choice only
};

struct DirectoryStats {
  uint64_t transactions = 0;  // transactions started
  uint64_t grants = 0;
  uint64_t fetches = 0;
  uint64_t invalidations = 0;
  uint64_t retransmits = 0;
  uint64_t queued = 0;
  uint64_t stale_ignored = 0;
  uint64_t pages_lost = 0;
};

class PageDirectory {
 public:
  explicit PageDirectory(DirectoryOptions options = {});

  // Membership. A request from a node that is not live is ignored.
  void NodeUp(NodeId node);
  // Handles every page the node held or was part of a transaction on:
  // sole copies are lost; aborted moves are restored from the sender's stash.
  void NodeDown(NodeId node, Outbox* out);
  bool IsLive(NodeId node) const { return live_.count(node) != 0; }

  // Messages from nodes. Each validates what it can: a message that makes no
  // sense for the page's state is counted and ignored, never trusted.
  void HandleAcquire(const proto::Acquire& m, uint64_t now_ms, Outbox* out);
  void HandleInvalidateAck(const proto::InvalidateAck& m, uint64_t now_ms, Outbox* out);
  void HandleDone(const proto::Done& m, uint64_t now_ms, Outbox* out);

  // Resends the messages of transactions idle for retransmit_after_ms,
  // and loss notices not yet acknowledged (TellLost).
  void Tick(uint64_t now_ms, Outbox* out);

  // Persistence: records changed since the last call, each once.
  void TakeDirty(std::vector<PageRecord>* records);
  // Loads a persisted record at startup (before any message).
  void Restore(const PageRecord& record);
  // Forgets every page in [begin, end) (a deleted region), transactions in
  // flight included; late messages about them are then ignored as stale.
  // The caller deletes the range from storage itself.
  void DropRange(PageAddr begin, PageAddr end);

  const PageRecord* Find(PageAddr page) const;
  // Where the pages of [begin, end) are: per node, Modified and Shared
  // counts; pages with a record, lost, in flight. Visits every record.
  proto::RegionPagesReply Summarize(PageAddr begin, PageAddr end) const;
  proto::PageQueryReply Query(PageAddr page) const;
  size_t page_count() const { return pages_.size(); }
  size_t busy_count() const { return busy_.size(); }
  // Lost pages whose loss some node has yet to acknowledge.
  size_t telling_count() const { return telling_.size(); }
  const DirectoryStats& stats() const { return stats_; }

  // Checks the invariants of every record (sim and tests): sharers distinct
  // and live; owner among the sharers; Modified has exactly one holder; a busy
  // page's transaction is consistent. Returns the first violation.
  Status CheckInvariants() const;
  // Every node a record names: holders, and the nodes of transactions in
  // flight. (At a restart, the dead among them are nodes whose hand-over,
  // NodeDown, was not flushed before the stop.)
  std::set<NodeId> NodesNamed() const;

 private:
  struct Waiting {
    proto::Acquire request;
  };
  struct Page {
    PageRecord rec;
    // Bounded by kMaxNodes: one per node. A vector, not a deque: an empty
    // std::deque allocates over 500 bytes, and most pages never queue.
    std::vector<Waiting> queue;
    bool dirty = false;  // listed in dirty_
  };

  Page& GetPage(PageAddr page);
  // Lists the page for the next TakeDirty, once. Takes the Page, not its
  // address: every caller holds it, and a lookup per change cost a hash
  // probe on the directory's hottest path.
  void MarkDirty(Page& p);

  // Runs queued requests until one starts a transaction or the queue is empty.
  void Drain(Page& p, uint64_t now_ms, Outbox* out);
  // Serves one request on an idle page; may start a transaction.
  void Serve(Page& p, const proto::Acquire& m, uint64_t now_ms, Outbox* out);
  void ServeAcquire(Page& p, const proto::Acquire& m, uint64_t now_ms, Outbox* out);
  void ServeGiveUp(Page& p, const proto::Acquire& m, uint64_t now_ms, Outbox* out);
  Transaction& Begin(Page& p, NodeId requester, uint64_t request_seq, uint64_t now_ms);
  void SendTxn(Page& p, uint64_t now_ms, bool resend, Outbox* out);
  void MaybeGrant(Page& p, Outbox* out);
  void Finish(Page& p, uint64_t now_ms, Outbox* out);
  // A read or write whose only supplier died (NodeDown): it waits for the
  // requester's Done (it got the data) or, once its Grant has left, its next
  // request, whose last txn says whether it installed the txn (a resend:
  // not). Data was to come, from no one now.
  static bool SupplierDied(const Transaction& tx) {
    return tx.fetch_send_data != 0 && tx.fetch_from == proto::kNoNode;
  }
  // Marks the page lost (every copy gone for the cluster). Whoever may hold
  // a copy is told (TellLost): the sharers the txn in flight had yet to
  // invalidate, and its requester once its Grant has gone; a requester
  // still waiting for its Grant is only answered.
  void MarkLost(Page& p, uint64_t now_ms, Outbox* out);
  // Tells `node`, which may hold a copy of the lost page, that it is lost:
  // a DATA_LOSS Grant answering its request `request_seq` (0: unsolicited),
  // and again, unsolicited, at every retransmit interval until its
  // InvalidateAck of the txn the page was lost in. The nodes still to
  // answer are the record's tx.pending_acks (a lost page is never busy), so
  // a restarted directory tells them again.
  void TellLost(Page& p, NodeId node, uint64_t request_seq, uint64_t now_ms, Outbox* out);
  void ResendLossNotices(Page& p, uint64_t now_ms, Outbox* out);
  void LossNoticeAcked(Page& p, NodeId node);
  // Tells `node` the page of `rec` is lost: a DATA_LOSS Grant of the txn it
  // was lost in, answering its request `request_seq` (0: unsolicited).
  void ReplyLost(NodeId node, uint64_t request_seq, const PageRecord& rec, Outbox* out);
  void RemoveSharer(Page& p, NodeId n);
  NodeId PickTarget(const PageRecord& rec, NodeId not_this) const;

  DirectoryOptions options_;
  std::unordered_map<PageAddr, Page> pages_;
  std::unordered_set<PageAddr> busy_;
  // Lost pages whose loss notices some node has not acknowledged (TellLost).
  std::unordered_set<PageAddr> telling_;
  // Pages changed since the last TakeDirty, each once (Page::dirty), in the
  // order they changed; a page dropped meanwhile (DropRange) may remain.
  // A vector, not a set: a set allocates a node per page changed.
  std::vector<PageAddr> dirty_;
  std::set<NodeId> live_;
  DirectoryStats stats_;
};

}  // namespace dsvm::coordinator

#endif  // DSVM_COORDINATOR_DIRECTORY_PAGE_DIRECTORY_H_
