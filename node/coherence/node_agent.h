// NodeAgent: the node side of dsvm's MSI coherence protocol. A pure state
// machine: it holds no page bytes and does no I/O. Faults of local processes
// and messages from the directory and peers go in; Actions come out, which
// the caller carries out in order (the daemon on its memfd and UCX, the
// simulator on its model). Page bytes live with the caller: the agent names
// them by page, by stash txn, or by a DataHandle the caller gave it.
//
// Rules (proto/PROTOCOL.md): at most one request per page outstanding; every
// directory message carries the page's txn, and a message older than the
// newest txn processed (last_txn) is stale and ignored, an equal one is a
// duplicate and re-acknowledged. Bytes handed away by a move stay in a stash
// until the directory's Release (or any newer txn) says the move completed.
#ifndef DSVM_NODE_COHERENCE_NODE_AGENT_H_
#define DSVM_NODE_COHERENCE_NODE_AGENT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "proto/messages.h"

namespace dsvm::node {

using proto::AccessKind;
using proto::NodeId;
using proto::PageAddr;
using proto::PageState;
using proto::TxnId;

using WaiterId = uint64_t;    // a faulting thread, named by the caller
using DataHandle = uint64_t;  // received page bytes, held by the caller

enum class ActionKind : uint8_t {
  kInvalid = 0,
  kSendToDirectory,  // `message` to the directory shard of `page`
  kSendPage,         // PageData{page, txn, version} of the current bytes to `node`
  kSendStash,        // PageData{page, txn, version} of stash `txn` to `node`
  kAskHolder,        // ReadDirect for `page` to a node the caller guesses holds it, or nothing
  kMapRead,          // local processes may read `page`
  kMapWrite,         // local processes may read and write `page`
  kUnmap,            // revoke local access, keep the bytes (a pending give-up)
  kDiscard,          // revoke access and drop the bytes
  kStash,            // move the bytes into stash `txn`; the page itself is dropped
  kInstallZero,      // the page's bytes become zeros
  kInstallData,      // the page's bytes become those of `handle`; the handle is consumed
  kInstallStash,     // the page's bytes come back from stash `txn`; the stash is consumed
  kDropStash,        // free stash `txn`
  kDropData,         // free `handle` unused
  kWake,             // resume `waiter` with `status`
  kProtocolError,    // a message made no sense here; `text` says why (logged, ignored)
};

struct Action {
  ActionKind kind = ActionKind::kInvalid;
  PageAddr page = 0;
  NodeId node = proto::kNoNode;
  TxnId txn = 0;
  uint64_t version = 0;
  DataHandle handle = 0;
  WaiterId waiter = 0;
  StatusCode status = StatusCode::kOk;
  proto::Message message;
  std::string text;
};
using Actions = std::vector<Action>;

struct NodeOptions {
  uint64_t retransmit_after_ms = 200;
};

struct NodeStats {
  uint64_t faults = 0;        // faults that had to wait for the directory
  uint64_t hits = 0;          // faults satisfied locally
  uint64_t requests = 0;
  uint64_t retransmits = 0;
  uint64_t pages_sent = 0;
  uint64_t pages_received = 0;
  uint64_t invalidations = 0;  // copies dropped (Invalidate, or a Fetch that takes the page)
  uint64_t downgrades = 0;     // Modified copies made Shared by a Fetch
  uint64_t protocol_errors = 0;
  uint64_t disowned_copies = 0;  // installed copies dropped because the directory lost their txn
  uint64_t grant_probes = 0;     // directory asked about a grant no request waited for
  uint64_t direct_asks = 0;      // read requests that also asked a holder (kAskHolder)
  uint64_t direct_served = 0;    // ReadDirects answered with this node's copy
  uint64_t direct_ignored = 0;   // ReadDirects for a page not held, or with something under way
  uint64_t direct_installs = 0;  // Shared grants installed from a direct read's bytes
  uint64_t direct_unused = 0;    // direct bytes dropped: late, or of another version than the grant's
  uint64_t direct_repeats = 0;   // ReadDirects ignored: a Fetch just sent that copy there
  uint64_t fetch_sends_skipped = 0;  // Fetches answered by the copy a ReadDirect just sent
};

enum class FaultResult : uint8_t { kHit = 1, kWait = 2 };

class NodeAgent {
 public:
  explicit NodeAgent(NodeId self, NodeOptions options = {});

  // A local access to `page`. kHit: the node's copy allows it now. kWait:
  // `waiter` is resumed by a kWake action. `ask_holder`: a read that sends
  // a request for a page this node holds nothing of also asks a node that
  // may hold it for its copy (kAskHolder; PROTOCOL.md, "Direct reads").
  FaultResult Fault(PageAddr page, bool write, WaiterId waiter, uint64_t now_ms, Actions* out,
                    bool ask_holder = false);

  // Gives up the node's copy (memory pressure). Local access is revoked at
  // once; the bytes stay until the directory answers. Returns false when the
  // node holds no copy or a request is outstanding for the page.
  // `target`: the node that should take the last copy (preferred-node
  // advice), or kNoNode.
  bool Evict(PageAddr page, uint64_t now_ms, Actions* out, NodeId target = proto::kNoNode);

  // Forgets every page: the node was declared dead, and the directory has
  // handed its copies on. Returns the waiters of every page, which the
  // caller ends. Counters are kept.
  std::vector<WaiterId> Forget();
  // As Forget, for the pages of [begin, end) only: a deleted region, whose
  // addresses a new region may take.
  std::vector<WaiterId> ForgetRange(PageAddr begin, PageAddr end);

  void HandleGrant(const proto::Grant& m, uint64_t now_ms, Actions* out);
  void HandleFetch(const proto::Fetch& m, uint64_t now_ms, Actions* out);
  void HandleInvalidate(const proto::Invalidate& m, uint64_t now_ms, Actions* out);
  void HandleRelease(const proto::Release& m, Actions* out);
  void HandleEvictReply(const proto::EvictReply& m, uint64_t now_ms, Actions* out);
  // `m.data` is ignored: the caller keeps the bytes under `handle`. Txn 0:
  // a direct read's bytes, kept for a Shared grant of their version.
  void HandlePageData(const proto::PageData& m, DataHandle handle, uint64_t now_ms, Actions* out);
  // A peer asks for this node's copy (PROTOCOL.md, "Direct reads"). Served
  // (true) when the node holds the page and nothing is under way for it: a
  // Modified copy is made Shared first (kMapRead), then kSendPage with txn
  // 0 goes to m.node. Else nothing happens (false): also when a Fetch just
  // sent m.node this very copy. The caller checks that m.region is the
  // region mapped at the page.
  bool HandleReadDirect(const proto::ReadDirect& m, uint64_t now_ms, Actions* out);
  // The copy of `page` a kSendPage or kSendStash asked for did not leave
  // for `to` (the caller could not read or send it): a Fetch or an ask of
  // `to` that comes next is answered with a copy, not taken as answered by
  // that one.
  void ForgetRecentCopy(PageAddr page, NodeId to);
  // Whether HandlePageData would keep `m`'s bytes, for a page this node
  // holds no copy of (Invalid, not retained) and has a request in flight
  // for, with no data for it yet: such bytes may arrive straight in the
  // page's place in the store, since nothing else writes the page
  // meanwhile. Asked before the bytes arrive; changes nothing.
  bool MayReceiveInPlace(const proto::PageData& m) const;

  // Resends requests outstanding for retransmit_after_ms, doubled with each
  // resend of the same request up to 16 times: a request that is slow to be
  // answered (a large page on a slow link) is not asked for again and again,
  // each time moving the page once more. Forgets recent_copies_ past their
  // time.
  void Tick(uint64_t now_ms, Actions* out);
  // Resends every outstanding request now (after a directory reconnect).
  void ResendAll(uint64_t now_ms, Actions* out);

  NodeId self() const { return self_; }
  PageState StateOf(PageAddr page) const;
  // Whether the refusal `m` (the page is lost, in txn m.txn) makes this node
  // drop a copy it holds: one of that txn or older (HandleGrant).
  bool Disowns(const proto::Grant& m) const;
  // The pages local processes may access now (Shared or Modified), in no
  // particular order.
  std::vector<PageAddr> AccessiblePages() const;
  uint64_t VersionOf(PageAddr page) const;
  // The newest directory txn this node acted on for the page; 0 if none.
  TxnId LastTxnOf(PageAddr page) const;
  bool HasPending(PageAddr page) const;
  size_t stash_count() const;
  const NodeStats& stats() const { return stats_; }

 private:
  struct Waiter {
    WaiterId id;
    bool write;
  };
  // What a page needs only while something is under way for it: a request
  // pending, a grant or data in hand, waiters, a stash, a refusal newer than
  // its last txn. Made when needed and freed once idle (Settle), so that a
  // page at rest, which a node keeps for every page it touched, costs only
  // its LocalPage. Kept past its request: a stash until the directory
  // releases it, data that came before its grant, and a refusal of a lost
  // page (which must go on refusing that txn's late data).
  struct PageTxn {
    AccessKind pending = AccessKind::kInvalid;  // kInvalid: nothing outstanding
    uint64_t pending_seq = 0;
    uint64_t sent_ms = 0;
    uint32_t resends = 0;             // of the pending request, by Tick
    NodeId give_up_target = proto::kNoNode;  // of a pending Evict
    bool has_grant = false;           // a Grant waiting for its PageData
    bool has_data = false;            // PageData received, newest txn kept
    uint32_t grant_probes = 0;
    proto::Grant grant;
    TxnId data_txn = 0;
    DataHandle data = 0;
    uint64_t data_ms = 0;             // when the data came
    bool has_direct = false;          // a direct read's bytes, for a grant of their version
    uint64_t direct_version = 0;
    DataHandle direct = 0;
    TxnId stash_txn = 0;              // 0: no stash
    TxnId refused_txn = 0;            // data of this txn or older can never be installed
    uint64_t grant_ms = 0;            // a grant no request waits for: when last asked about
    std::vector<Waiter> waiters;
  };
  struct LocalPage {
    PageState state = PageState::kInvalid;  // what local processes may do
    bool retained = false;            // bytes kept, unmapped, for a pending give-up
    PageState retained_from = PageState::kInvalid;
    uint64_t version = 0;
    TxnId last_txn = 0;
    std::unique_ptr<PageTxn> active;  // null: nothing under way (see PageTxn)
  };

  // The page's PageTxn, made if it has none (for a page that must have one,
  // use *lp.active).
  static PageTxn& Active(LocalPage& lp) {
    if (!lp.active) lp.active = std::make_unique<PageTxn>();
    return *lp.active;
  }
  // The page's PageTxn to read; an idle one when it has none.
  static const PageTxn& ActiveOrIdle(const LocalPage& lp) { return lp.active ? *lp.active : kIdleTxn; }
  static const PageTxn kIdleTxn;
  // Frees the page's PageTxn once nothing in it is under way. Call at the
  // end of a public entry point, when no reference into it is held.
  static void Settle(LocalPage& lp);

  LocalPage& Get(PageAddr page) { return pages_[page]; }
  void SendRequest(PageAddr page, LocalPage& lp, AccessKind kind, uint64_t now_ms, Actions* out);
  void SendAcquire(PageAddr page, const LocalPage& lp, Actions* out);
  void TryInstall(PageAddr page, LocalPage& lp, uint64_t now_ms, Actions* out);
  // A loss notice (a DATA_LOSS Grant, also one that answers a request) is
  // resent until acknowledged: acknowledges `m` if it is one, once the
  // node holds no copy that loss disowns.
  void AckLossNotice(const proto::Grant& m, Actions* out);
  // Clears a satisfied request, wakes satisfied waiters, asks for what the
  // remaining waiters need.
  void Progress(PageAddr page, LocalPage& lp, uint64_t now_ms, Actions* out);
  void ClearPending(PageAddr page, LocalPage& lp);
  void DropStashBefore(PageAddr page, LocalPage& lp, TxnId txn, Actions* out);
  // Frees the received data held for the page if it is of `txn` or older.
  void DropDataUpTo(PageAddr page, LocalPage& lp, TxnId txn, Actions* out);
  // Frees a direct read's bytes held for the page, if any.
  void DropDirect(PageAddr page, LocalPage& lp, Actions* out);
  // Tick's part for unclaimed_data_.
  void DropUnclaimedData(uint64_t now_ms, Actions* out);
  void HandleDirectData(const proto::PageData& m, DataHandle handle, uint64_t now_ms, Actions* out);
  // How a copy in recent_copies_ left: for a ReadDirect, or for a Fetch.
  enum class CopyFor : uint8_t { kAsk, kFetch };
  // Whether `page`'s copy at `version` went to `to` for `why` less than
  // retransmit_after_ms ago. Consumes `to`'s record when it matches.
  bool TakeRecentCopy(PageAddr page, NodeId to, uint64_t version, CopyFor why, uint64_t now_ms);
  // Records that copy, in place of `to`'s record of the page.
  void NoteRecentCopy(PageAddr page, NodeId to, uint64_t version, CopyFor why, uint64_t now_ms);
  // The kind of a write request from a node holding `held`: an upgrade of
  // a Shared copy, else a write (the directory takes the kind as what the
  // node holds now).
  static AccessKind WriteKind(PageState held) {
    return held == PageState::kShared ? AccessKind::kUpgrade : AccessKind::kWrite;
  }
  void Map(PageAddr page, PageState state, Actions* out);
  void ToDirectory(PageAddr page, proto::Message m, Actions* out);
  void ProtocolError(PageAddr page, std::string why, Actions* out);

  NodeId self_;
  NodeOptions options_;
  uint64_t next_seq_ = 0;
  std::unordered_map<PageAddr, LocalPage> pages_;
  // Pages holding a grant whose data has not come and that no pending
  // request of this node covers (Tick asks about them).
  std::unordered_set<PageAddr> awaiting_data_;
  // Pages holding data that came with no request pending and no grant
  // here: a move's target gets its data before its unsolicited grant, or a
  // restarted node gets what was sent to its former process. Tick drops
  // data no grant claimed within the longest resend interval (a grant that
  // comes later asks for its data again: awaiting_data_).
  std::unordered_set<PageAddr> unclaimed_data_;
  std::unordered_set<PageAddr> pending_pages_;
  // Per page, the last copy this node sent each reader, by a ReadDirect or
  // by a Fetch that kept the page Shared, for retransmit_after_ms: a read
  // that asked both the holder and the directory gets one copy, not two,
  // in whichever order its ReadDirect and the directory's Fetch come here
  // (PROTOCOL.md, "Direct reads"), also when several readers ask at once
  // (a page every node polls). A copy that is lost after all costs the
  // reader one resend of the Fetch, which is always answered. At most one
  // record per reader: a page's list is no longer than the cluster.
  struct RecentCopy {
    NodeId to = proto::kNoNode;
    uint64_t version = 0;
    uint64_t sent_ms = 0;
    CopyFor why = CopyFor::kAsk;
  };
  std::unordered_map<PageAddr, std::vector<RecentCopy>> recent_copies_;
  NodeStats stats_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_COHERENCE_NODE_AGENT_H_
