#include "coordinator/directory/page_directory.h"

#include <algorithm>
#include <map>
#include <string>

namespace dsvm::coordinator {
namespace {

bool Contains(const std::vector<NodeId>& v, NodeId n) {
  return std::find(v.begin(), v.end(), n) != v.end();
}

void Erase(std::vector<NodeId>& v, NodeId n) { v.erase(std::remove(v.begin(), v.end(), n), v.end()); }

}  // namespace

const Sharer* PageRecord::FindSharer(NodeId n) const {
  for (const Sharer& s : sharers) {
    if (s.node == n) return &s;
  }
  return nullptr;
}

PageDirectory::PageDirectory(DirectoryOptions options) : options_(options) {
  DSVM_CHECK(options_.page_size > 0);
}

PageDirectory::Page& PageDirectory::GetPage(PageAddr page) {
  auto [it, inserted] = pages_.try_emplace(page);
  if (inserted) it->second.rec.page = page;
  return it->second;
}

const PageRecord* PageDirectory::Find(PageAddr page) const {
  auto it = pages_.find(page);
  return it == pages_.end() ? nullptr : &it->second.rec;
}

void PageDirectory::NodeUp(NodeId node) {
  DSVM_CHECK(node != proto::kNoNode);
  live_.insert(node);
}

// ---------------------------------------------------------------------------
// Requests

void PageDirectory::HandleAcquire(const proto::Acquire& m, uint64_t now_ms, Outbox* out) {
  if (!IsLive(m.node)) {
    ++stats_.stale_ignored;
    return;
  }
  Page& p = GetPage(m.page);
  if (p.rec.busy) {
    Transaction& tx = p.rec.tx;
    if (tx.requester == m.node && SupplierDied(tx) && tx.grant_sent && m.request_seq != 0 &&
        m.request_seq >= tx.request_seq) {
      // The requester of a read or write whose only supplier died asks
      // (again, or anew): it says whether it installed the txn (its last
      // txn). Only once its Grant has left: before (a write still waiting
      // for invalidation acks) it cannot have installed anything, and its
      // resend is only a resend.
      // Installed, it holds the only copy, as its Done would have said;
      // not, the data never came and never will: lost. Then its request
      // is handled as any other.
      const bool installed = m.last_txn >= tx.txn;
      const uint64_t seq = tx.request_seq;  // tx is reset below
      if (installed) {
        Finish(p, now_ms, out);
      } else {
        MarkLost(p, now_ms, out);
        Drain(p, now_ms, out);
      }
      if (m.request_seq != seq) HandleAcquire(m, now_ms, out);
      return;
    }
    if (tx.requester == m.node && m.request_seq != 0 && tx.request_seq == m.request_seq) {
      // The requester asks again, so part of its transaction was lost.
      SendTxn(p, now_ms, /*resend=*/true, out);
      return;
    }
    for (Waiting& w : p.queue) {
      if (w.request.node == m.node) {
        // A node has one request per page outstanding: a newer one replaces.
        if (m.request_seq > w.request.request_seq) w.request = m;
        return;
      }
    }
    DSVM_CHECK(p.queue.size() < kMaxNodes);
    p.queue.push_back(Waiting{m});
    ++stats_.queued;
    return;
  }
  DSVM_CHECK(p.queue.empty());
  Serve(p, m, now_ms, out);
}

void PageDirectory::Serve(Page& p, const proto::Acquire& m, uint64_t now_ms, Outbox* out) {
  switch (m.kind) {
    case AccessKind::kRead:
    case AccessKind::kWrite:
    case AccessKind::kUpgrade:
      ServeAcquire(p, m, now_ms, out);
      return;
    case AccessKind::kEvict:
    case AccessKind::kWriteback:
      ServeGiveUp(p, m, now_ms, out);
      return;
    case AccessKind::kInvalid:
      break;
  }
  DSVM_CHECK_MSG(false, "decoder let an invalid AccessKind through");
}

void PageDirectory::ServeAcquire(Page& p, const proto::Acquire& m, uint64_t now_ms, Outbox* out) {
  PageRecord& r = p.rec;
  if (r.lost) {
    ReplyLost(m.node, m.request_seq, r, out);
    return;
  }
  const bool want_write = m.kind != AccessKind::kRead;
  const Sharer* s = r.FindSharer(m.node);
  bool holds = s != nullptr;
  bool holds_modified = holds && r.state == PageState::kModified;

  if (holds && m.last_txn < s->since) {
    // Sent before the node learned of its current role: by now it has
    // installed that role (its transaction completed), so if the role
    // satisfies the request this is a stale duplicate.
    if (!want_write || holds_modified) {
      ++stats_.stale_ignored;
      return;
    }
    // It asked to write and now holds a Shared copy: serve as an upgrade.
  } else if (holds && m.kind != AccessKind::kUpgrade) {
    // The node has seen its role and says it holds nothing: it lost its copy
    // (a restarted daemon). A sole copy is gone with it.
    const bool sole = r.state == PageState::kModified || r.sharers.size() == 1;
    if (sole) {
      MarkLost(p, now_ms, out);
      ReplyLost(m.node, m.request_seq, r, out);
      return;
    }
    RemoveSharer(p, m.node);
    holds = false;
    holds_modified = false;
  }

  Transaction& tx = Begin(p, m.node, m.request_seq, now_ms);
  const TxnId t = tx.txn;
  if (!want_write) {
    tx.grant_state = PageState::kShared;
    if (r.state == PageState::kInvalid) {
      tx.source = DataSource::kZero;
      r.state = PageState::kShared;
      r.owner = m.node;
      r.sharers = {Sharer{m.node, t}};
    } else {
      // Forward to the owner: one directory hop, then data straight to the requester.
      tx.source = DataSource::kOwner;
      tx.fetch_from = r.owner;
      tx.fetch_next = PageState::kShared;
      tx.fetch_send_data = 1;
      r.state = PageState::kShared;  // a Modified owner becomes the supplier
      r.sharers.push_back(Sharer{m.node, t});
    }
  } else {
    tx.grant_state = PageState::kModified;
    ++r.version;
    if (holds_modified) {
      tx.source = DataSource::kSelf;
    } else if (r.state == PageState::kInvalid) {
      tx.source = DataSource::kZero;
    } else if (r.state == PageState::kModified) {
      tx.source = DataSource::kOwner;
      tx.fetch_from = r.owner;
      tx.fetch_next = PageState::kInvalid;
      tx.fetch_send_data = 1;
    } else {
      NodeId supplier = r.owner;
      if (holds) {
        // Upgrade: the requester has the data. One other sharer (the
        // supplier, or any other if the requester is the supplier) still
        // stashes its copy and acks, so an upgrade aborted by the
        // requester's death can be restored from it.
        tx.source = DataSource::kSelf;
        if (supplier == m.node) {
          supplier = proto::kNoNode;
          for (const Sharer& sh : r.sharers) {
            if (sh.node != m.node) supplier = sh.node;
          }
        }
        if (supplier != proto::kNoNode) {
          tx.fetch_from = supplier;
          tx.fetch_next = PageState::kInvalid;
          tx.fetch_send_data = 0;
          tx.pending_acks.push_back(supplier);
        }
      } else {
        tx.source = DataSource::kOwner;
        tx.fetch_from = supplier;
        tx.fetch_next = PageState::kInvalid;
        tx.fetch_send_data = 1;
      }
      for (const Sharer& sh : r.sharers) {
        if (sh.node != m.node && sh.node != supplier) tx.pending_acks.push_back(sh.node);
      }
    }
    r.state = PageState::kModified;
    r.owner = m.node;
    r.sharers = {Sharer{m.node, t}};
  }
  SendTxn(p, now_ms, /*resend=*/false, out);
}

void PageDirectory::ServeGiveUp(Page& p, const proto::Acquire& m, uint64_t now_ms, Outbox* out) {
  PageRecord& r = p.rec;
  auto reply = [&](StatusCode code) {
    out->push_back(
        {m.node, proto::EvictReply{m.page, m.request_seq, static_cast<uint16_t>(code), r.txn}});
  };
  const Sharer* s = r.FindSharer(m.node);
  if (s == nullptr) {
    reply(StatusCode::kOk);  // holds nothing here: done already
    return;
  }
  if (m.last_txn < s->since) {
    ++stats_.stale_ignored;  // sent before the node regained the page
    return;
  }
  const bool sole = r.state == PageState::kModified || r.sharers.size() == 1;
  if (!sole) {
    RemoveSharer(p, m.node);
    reply(StatusCode::kOk);
    return;
  }
  // The last copy: move it to another live node (remote swap), the one the
  // giver names if it can.
  const NodeId target = m.target != proto::kNoNode && m.target != m.node && IsLive(m.target)
                            ? m.target
                            : PickTarget(r, m.node);
  if (target == proto::kNoNode) {
    reply(StatusCode::kFailedPrecondition);
    return;
  }
  Transaction& tx = Begin(p, target, /*request_seq=*/0, now_ms);
  tx.grant_state = PageState::kShared;
  tx.source = DataSource::kOwner;
  tx.fetch_from = m.node;
  tx.fetch_next = PageState::kInvalid;
  tx.fetch_send_data = 1;
  r.state = PageState::kShared;
  r.owner = target;
  r.sharers = {Sharer{target, tx.txn}};
  SendTxn(p, now_ms, /*resend=*/false, out);
}

// ---------------------------------------------------------------------------
// Transactions

Transaction& PageDirectory::Begin(Page& p, NodeId requester, uint64_t request_seq,
                                  uint64_t now_ms) {
  PageRecord& r = p.rec;
  DSVM_CHECK(!r.busy);
  r.busy = 1;
  r.tx = Transaction{};
  r.tx.txn = ++r.txn;
  r.tx.requester = requester;
  r.tx.request_seq = request_seq;
  r.tx.prev_state = r.state;
  r.tx.last_send_ms = now_ms;
  busy_.insert(r.page);
  MarkDirty(p);
  ++stats_.transactions;
  return r.tx;
}

void PageDirectory::SendTxn(Page& p, uint64_t now_ms, bool resend, Outbox* out) {
  PageRecord& r = p.rec;
  Transaction& tx = r.tx;
  if (tx.fetch_from != proto::kNoNode &&
      (!resend || tx.fetch_send_data || Contains(tx.pending_acks, tx.fetch_from))) {
    out->push_back({tx.fetch_from, proto::Fetch{r.page, tx.txn, tx.requester, tx.fetch_next,
                                                tx.fetch_send_data}});
    ++stats_.fetches;
  }
  for (NodeId n : tx.pending_acks) {
    if (n == tx.fetch_from) continue;
    out->push_back({n, proto::Invalidate{r.page, tx.txn, tx.requester}});
    ++stats_.invalidations;
  }
  if (resend && tx.grant_sent) tx.grant_sent = 0;  // MaybeGrant sends it again
  MaybeGrant(p, out);
  tx.last_send_ms = now_ms;
  if (resend) ++stats_.retransmits;
}

void PageDirectory::MaybeGrant(Page& p, Outbox* out) {
  PageRecord& r = p.rec;
  Transaction& tx = r.tx;
  if (!tx.pending_acks.empty() || tx.grant_sent) return;
  proto::Grant g;
  g.page = r.page;
  g.txn = tx.txn;
  g.request_seq = tx.request_seq;
  g.state = tx.grant_state;
  g.source = tx.source;
  g.version = r.version;
  g.stash_txn = tx.stash_txn;
  out->push_back({tx.requester, g});
  tx.grant_sent = 1;
  MarkDirty(p);
  ++stats_.grants;
}

void PageDirectory::Finish(Page& p, uint64_t now_ms, Outbox* out) {
  PageRecord& r = p.rec;
  const Transaction& tx = r.tx;
  if (tx.fetch_from != proto::kNoNode && tx.fetch_next == PageState::kInvalid &&
      IsLive(tx.fetch_from)) {
    out->push_back({tx.fetch_from, proto::Release{r.page, tx.txn}});
  }
  r.busy = 0;
  r.tx = Transaction{};
  busy_.erase(r.page);
  MarkDirty(p);
  Drain(p, now_ms, out);
}

void PageDirectory::Drain(Page& p, uint64_t now_ms, Outbox* out) {
  while (!p.rec.busy && !p.queue.empty()) {
    proto::Acquire m = p.queue.front().request;
    p.queue.erase(p.queue.begin());
    if (IsLive(m.node)) Serve(p, m, now_ms, out);
  }
}

void PageDirectory::HandleInvalidateAck(const proto::InvalidateAck& m, uint64_t now_ms,
                                        Outbox* out) {
  auto it = pages_.find(m.page);
  if (it != pages_.end() && it->second.rec.lost && it->second.rec.tx.txn == m.txn &&
      Contains(it->second.rec.tx.pending_acks, m.node)) {
    LossNoticeAcked(it->second, m.node);  // the node dropped its copy of the lost page
    return;
  }
  if (it == pages_.end() || !it->second.rec.busy || it->second.rec.tx.txn != m.txn ||
      !Contains(it->second.rec.tx.pending_acks, m.node)) {
    ++stats_.stale_ignored;
    return;
  }
  Page& p = it->second;
  Erase(p.rec.tx.pending_acks, m.node);
  MarkDirty(p);
  MaybeGrant(p, out);
}

void PageDirectory::HandleDone(const proto::Done& m, uint64_t now_ms, Outbox* out) {
  auto it = pages_.find(m.page);
  if (it != pages_.end() && it->second.rec.lost && it->second.rec.txn == m.txn) {
    // The node installed the txn the page was lost in (its data came after
    // all, after a resend had said it never would): the loss stands, and the
    // node is told again, so that it drops the copy nobody else may have.
    if (IsLive(m.node)) TellLost(it->second, m.node, /*request_seq=*/0, now_ms, out);
    ++stats_.stale_ignored;
    return;
  }
  if (it == pages_.end() || !it->second.rec.busy || it->second.rec.tx.txn != m.txn ||
      it->second.rec.tx.requester != m.node || !it->second.rec.tx.grant_sent) {
    ++stats_.stale_ignored;
    return;
  }
  Finish(it->second, now_ms, out);
}

void PageDirectory::Tick(uint64_t now_ms, Outbox* out) {
  for (PageAddr page : busy_) {
    Page& p = pages_.at(page);
    if (p.rec.tx.last_send_ms + options_.retransmit_after_ms <= now_ms) {
      SendTxn(p, now_ms, /*resend=*/true, out);
    }
  }
  for (PageAddr page : telling_) {
    Page& p = pages_.at(page);
    if (p.rec.tx.last_send_ms + options_.retransmit_after_ms <= now_ms) {
      ResendLossNotices(p, now_ms, out);
    }
  }
}

// ---------------------------------------------------------------------------
// Loss, membership

void PageDirectory::ReplyLost(NodeId node, uint64_t request_seq, const PageRecord& r,
                              Outbox* out) {
  proto::Grant g;
  g.page = r.page;
  g.txn = r.txn;
  g.request_seq = request_seq;
  g.state = PageState::kInvalid;
  g.source = DataSource::kZero;
  g.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  g.version = r.version;
  out->push_back({node, g});
}

void PageDirectory::MarkLost(Page& p, uint64_t now_ms, Outbox* out) {
  PageRecord& r = p.rec;
  r.lost = 1;
  // Who may hold a copy now, with the request_seq its first notice
  // answers (0: unsolicited).
  std::vector<std::pair<NodeId, uint64_t>> told;
  if (r.busy) {
    const Transaction& tx = r.tx;
    if (IsLive(tx.requester) && tx.grant_sent) {
      // The data may have come: a give-up's target asked for nothing, and
      // a requester whose request was satisfied waits for no answer. It is
      // told until it acknowledges, as a sharer is.
      told.emplace_back(tx.requester, tx.request_seq);
    } else if (IsLive(tx.requester) && tx.request_seq != 0) {
      // Nothing came: it holds no copy, and resends its request until the
      // answer reaches it.
      ReplyLost(tx.requester, tx.request_seq, r, out);
    }
    // Sharers the txn had yet to invalidate still hold copies: the page
    // they hold is gone for everyone else, so they drop theirs too.
    for (NodeId n : tx.pending_acks) {
      if (n != tx.requester && IsLive(n)) told.emplace_back(n, 0);
    }
    r.busy = 0;
    busy_.erase(r.page);
  }
  r.tx = Transaction{};
  r.state = PageState::kInvalid;
  r.owner = proto::kNoNode;
  r.sharers.clear();
  for (const auto& [n, seq] : told) TellLost(p, n, seq, now_ms, out);
  MarkDirty(p);
  ++stats_.pages_lost;
}

void PageDirectory::TellLost(Page& p, NodeId node, uint64_t request_seq, uint64_t now_ms,
                             Outbox* out) {
  Transaction& tx = p.rec.tx;
  if (tx.pending_acks.empty()) tx.last_send_ms = now_ms;  // else the others' resend timer runs on
  if (!Contains(tx.pending_acks, node)) {
    DSVM_CHECK(tx.pending_acks.size() < kMaxNodes);
    tx.pending_acks.push_back(node);
    MarkDirty(p);
  }
  tx.txn = p.rec.txn;
  telling_.insert(p.rec.page);
  ReplyLost(node, request_seq, p.rec, out);
}

void PageDirectory::ResendLossNotices(Page& p, uint64_t now_ms, Outbox* out) {
  p.rec.tx.last_send_ms = now_ms;
  for (NodeId n : p.rec.tx.pending_acks) ReplyLost(n, /*request_seq=*/0, p.rec, out);
  ++stats_.retransmits;
}

void PageDirectory::LossNoticeAcked(Page& p, NodeId node) {
  Erase(p.rec.tx.pending_acks, node);
  MarkDirty(p);
  if (p.rec.tx.pending_acks.empty()) telling_.erase(p.rec.page);
}

void PageDirectory::RemoveSharer(Page& p, NodeId n) {
  PageRecord& r = p.rec;
  r.sharers.erase(std::remove_if(r.sharers.begin(), r.sharers.end(),
                                 [n](const Sharer& s) { return s.node == n; }),
                  r.sharers.end());
  DSVM_CHECK_MSG(!r.sharers.empty(), "removed the last copy; callers must mark it lost");
  if (r.owner == n) r.owner = r.sharers.front().node;
  MarkDirty(p);
}

NodeId PageDirectory::PickTarget(const PageRecord& r, NodeId not_this) const {
  std::vector<NodeId> candidates;
  for (NodeId n : live_) {
    if (n != not_this) candidates.push_back(n);
  }
  if (candidates.empty()) return proto::kNoNode;
  return candidates[(r.page / options_.page_size + r.txn) % candidates.size()];
}

void PageDirectory::NodeDown(NodeId node, Outbox* out) {
  live_.erase(node);
  const uint64_t now_ms = 0;  // resends happen at once; Tick takes over after
  for (auto& [addr, p] : pages_) {
    std::erase_if(p.queue, [node](const Waiting& w) { return w.request.node == node; });
    PageRecord& r = p.rec;
    if (r.busy) {
      Transaction& tx = r.tx;
      if (tx.requester == node) {
        if (tx.fetch_next == PageState::kInvalid && tx.fetch_from != proto::kNoNode &&
            IsLive(tx.fetch_from)) {
          // Restore the former owner from the stash it kept for this move.
          const NodeId back = tx.fetch_from;
          const TxnId stash_of = tx.txn;
          Erase(tx.pending_acks, back);
          Erase(tx.pending_acks, node);
          tx.txn = ++r.txn;
          tx.requester = back;
          tx.request_seq = 0;
          tx.grant_state = PageState::kModified;
          tx.source = DataSource::kStash;
          tx.stash_txn = stash_of;
          tx.fetch_from = proto::kNoNode;
          tx.fetch_send_data = 0;
          tx.grant_sent = 0;
          // The stash holds the bytes of the version before the move's,
          // and the dead node may have sent its own under the move's to a
          // direct read: the restored bytes get a version of their own.
          ++r.version;
          r.state = PageState::kModified;
          r.owner = back;
          r.sharers = {Sharer{back, tx.txn}};
          MarkDirty(p);
          SendTxn(p, now_ms, /*resend=*/false, out);
        } else if (tx.grant_state == PageState::kShared && tx.fetch_next == PageState::kShared &&
                   tx.prev_state != PageState::kInvalid && !SupplierDied(tx)) {
          // An aborted read: the supplier kept (or still has) its copy. If it
          // was the writer, record it as writer again: the directory may
          // think a node writes that only reads, never the reverse.
          RemoveSharer(p, node);
          if (tx.prev_state == PageState::kModified) {
            r.state = PageState::kModified;
            r.owner = tx.fetch_from;
            r.sharers.resize(1);
          }
          r.busy = 0;
          r.tx = Transaction{};
          busy_.erase(addr);
          MarkDirty(p);
          Drain(p, now_ms, out);
        } else if (tx.source == DataSource::kZero && tx.prev_state == PageState::kInvalid) {
          // A first touch by the dead node: nobody saw its data. Back to
          // zero, under a new version: the dead node's writes went under
          // the old one, maybe to a direct read (PROTOCOL.md, "Direct reads").
          ++r.version;
          r.state = PageState::kInvalid;
          r.owner = proto::kNoNode;
          r.sharers.clear();
          r.busy = 0;
          r.tx = Transaction{};
          busy_.erase(addr);
          MarkDirty(p);
          Drain(p, now_ms, out);
        } else {
          MarkLost(p, now_ms, out);
          Drain(p, now_ms, out);
        }
        continue;
      }
      if (tx.fetch_from == node) {
        if (!tx.fetch_send_data) {
          // The supplier of an upgrade died; the requester has the data.
          tx.fetch_from = proto::kNoNode;
          Erase(tx.pending_acks, node);
          MarkDirty(p);
          MaybeGrant(p, out);
        } else if (tx.grant_state == PageState::kShared) {
          // A read whose supplier died: any other sharer can supply.
          NodeId other = proto::kNoNode;
          for (const Sharer& s : r.sharers) {
            if (s.node != node && s.node != tx.requester) other = s.node;
          }
          if (other == proto::kNoNode && tx.request_seq != 0) {
            // No other copy, but the read's Grant left with the Fetch and
            // the supplier may have sent the data before it died: the
            // requester then holds the only copy and says so with its Done
            // (Finish). Wait for it, the requester recorded as the supplier
            // and no one asked for data (SupplierDied). Its next request
            // settles it too (HandleAcquire): by its last txn, installed or
            // not (a resend: not). A give-up's move (request_seq 0) is not
            // waited for: its target asked for nothing and, without the
            // data, would never answer; it is lost below.
            RemoveSharer(p, node);
            r.owner = tx.requester;
            tx.fetch_from = proto::kNoNode;
            MarkDirty(p);
            continue;
          }
          if (other == proto::kNoNode) {
            MarkLost(p, now_ms, out);
            Drain(p, now_ms, out);
            continue;
          }
          RemoveSharer(p, node);
          r.owner = other;
          tx.fetch_from = other;
          SendTxn(p, now_ms, /*resend=*/false, out);
        } else if (tx.request_seq != 0) {
          // A write whose supplier died: as a read's above, the data may
          // have left before the death, and the requester (recorded as the
          // writer since the txn began) says with its Done or its next
          // request whether it came. Sharers still being invalidated go on
          // being invalidated: the Grant waits for their acks as before.
          tx.fetch_from = proto::kNoNode;
          Erase(tx.pending_acks, node);
          MarkDirty(p);
          MaybeGrant(p, out);
          continue;
        } else {
          MarkLost(p, now_ms, out);
          Drain(p, now_ms, out);
          continue;
        }
      } else if (Contains(tx.pending_acks, node)) {
        Erase(tx.pending_acks, node);
        MarkDirty(p);
        MaybeGrant(p, out);
      }
      if (r.busy && r.FindSharer(node) != nullptr && r.sharers.size() > 1) {
        RemoveSharer(p, node);
      }
      continue;
    }
    if (r.lost) {
      if (Contains(r.tx.pending_acks, node)) LossNoticeAcked(p, node);  // its copy died with it
      continue;
    }
    if (r.FindSharer(node) == nullptr) continue;
    const bool sole = r.state == PageState::kModified || r.sharers.size() == 1;
    if (sole) {
      MarkLost(p, now_ms, out);
    } else {
      RemoveSharer(p, node);
    }
  }
}

// ---------------------------------------------------------------------------
// Persistence and inspection

void PageDirectory::MarkDirty(Page& p) {
  if (!p.dirty) {
    p.dirty = true;
    dirty_.push_back(p.rec.page);
  }
}

void PageDirectory::TakeDirty(std::vector<PageRecord>* records) {
  for (PageAddr page : dirty_) {
    auto it = pages_.find(page);
    // Gone (DropRange), or gone and made again since and not changed.
    if (it == pages_.end() || !it->second.dirty) continue;
    it->second.dirty = false;
    records->push_back(it->second.rec);
  }
  dirty_.clear();
}

void PageDirectory::Restore(const PageRecord& record) {
  Page& p = GetPage(record.page);
  p.rec = record;
  if (p.rec.busy) {
    p.rec.tx.last_send_ms = 0;  // resend at the first Tick
    busy_.insert(record.page);
  } else if (p.rec.lost && !p.rec.tx.pending_acks.empty()) {
    p.rec.tx.last_send_ms = 0;  // loss notices not acknowledged: again at the first Tick
    telling_.insert(record.page);
  }
}

void PageDirectory::DropRange(PageAddr begin, PageAddr end) {
  for (auto it = pages_.begin(); it != pages_.end();) {
    if (it->first >= begin && it->first < end) {
      busy_.erase(it->first);  // its dirty_ entry is skipped by TakeDirty
      telling_.erase(it->first);
      it = pages_.erase(it);
    } else {
      ++it;
    }
  }
}

proto::RegionPagesReply PageDirectory::Summarize(PageAddr begin, PageAddr end) const {
  proto::RegionPagesReply r;
  std::map<NodeId, proto::NodePages> nodes;
  for (const auto& [addr, p] : pages_) {
    if (addr < begin || addr >= end) continue;
    ++r.touched;
    r.lost += p.rec.lost;
    r.in_flight += p.rec.busy;
    for (const Sharer& s : p.rec.sharers) {
      proto::NodePages& n = nodes[s.node];
      n.node = s.node;
      ++(p.rec.state == PageState::kModified ? n.modified : n.shared);
    }
  }
  for (auto& [id, n] : nodes) {
    if (r.nodes.size() == proto::kMaxListEntries) break;
    r.nodes.push_back(n);
  }
  return r;
}

proto::PageQueryReply PageDirectory::Query(PageAddr page) const {
  proto::PageQueryReply q;
  q.page = page;
  const PageRecord* r = Find(page);
  if (r == nullptr) return q;
  q.state = r->state;
  q.owner = r->owner;
  q.version = r->version;
  q.txn = r->txn;
  q.lost = r->lost;
  q.busy = r->busy;
  // A cluster may be larger than a reply lists (kMaxNodes against
  // kMaxSharersInReply): the first ones, in the record's order.
  for (const Sharer& s : r->sharers) {
    if (q.sharers.size() == proto::kMaxSharersInReply) break;
    q.sharers.push_back(s.node);
  }
  return q;
}

std::set<NodeId> PageDirectory::NodesNamed() const {
  std::set<NodeId> named;
  for (const auto& [addr, p] : pages_) {
    const PageRecord& r = p.rec;
    if (r.owner != proto::kNoNode) named.insert(r.owner);
    for (const Sharer& s : r.sharers) named.insert(s.node);
    if (r.lost) named.insert(r.tx.pending_acks.begin(), r.tx.pending_acks.end());
    if (!r.busy) continue;
    for (NodeId n : {r.tx.requester, r.tx.fetch_from}) {
      if (n != proto::kNoNode) named.insert(n);
    }
    named.insert(r.tx.pending_acks.begin(), r.tx.pending_acks.end());
  }
  return named;
}

Status PageDirectory::CheckInvariants() const {
  for (const auto& [addr, p] : pages_) {
    const PageRecord& r = p.rec;
    auto fail = [&](const std::string& what) {
      return Internal("page " + std::to_string(addr) + ": " + what);
    };
    for (size_t i = 0; i < r.sharers.size(); ++i) {
      if (!IsLive(r.sharers[i].node)) return fail("sharer is not live");
      for (size_t j = i + 1; j < r.sharers.size(); ++j) {
        if (r.sharers[i].node == r.sharers[j].node) return fail("sharer listed twice");
      }
    }
    switch (r.state) {
      case PageState::kInvalid:
        if (!r.sharers.empty() || r.owner != proto::kNoNode) return fail("Invalid with holders");
        break;
      case PageState::kShared:
        if (r.FindSharer(r.owner) == nullptr) return fail("Shared supplier not a sharer");
        break;
      case PageState::kModified:
        if (r.sharers.size() != 1 || r.sharers[0].node != r.owner) {
          return fail("Modified must have exactly its owner as holder");
        }
        break;
      case PageState::kReserved:
        return fail("reserved state");
    }
    if (r.lost && r.state != PageState::kInvalid) return fail("lost page with holders");
    if (r.lost != 0 && !r.tx.pending_acks.empty()) {
      if (telling_.count(addr) == 0) return fail("loss notices outstanding but not resent");
      if (r.tx.txn != r.txn) return fail("loss notices of another txn than the lost one");
      for (NodeId n : r.tx.pending_acks) {
        if (!IsLive(n)) return fail("loss notice owed to a dead node");
      }
    } else if (telling_.count(addr) != 0) {
      return fail("resending loss notices nobody is owed");
    }
    if (!r.busy && !r.lost && !r.tx.pending_acks.empty()) return fail("idle page with acks pending");
    if (static_cast<bool>(r.busy) != (busy_.count(addr) != 0)) return fail("busy index out of step");
    if (!r.busy && !p.queue.empty()) return fail("idle page with queued requests");
    if (p.queue.size() > kMaxNodes) return fail("queue over its bound");
    if (r.busy && Contains(r.tx.pending_acks, r.tx.requester)) return fail("requester acks itself");
  }
  for (PageAddr page : telling_) {
    if (pages_.count(page) == 0) return Internal("loss notices resent for a page with no record");
  }
  return Status::Ok();
}

}  // namespace dsvm::coordinator
