#include "node/coherence/node_agent.h"

#include <algorithm>

namespace dsvm::node {
namespace {

// A request's resend interval doubles up to 2^4 = 16 times the base.
constexpr uint32_t kMaxBackoffShift = 4;

bool Satisfies(PageState state, bool write) {
  return write ? state == PageState::kModified
               : (state == PageState::kShared || state == PageState::kModified);
}

bool IsGiveUp(AccessKind k) { return k == AccessKind::kEvict || k == AccessKind::kWriteback; }

Action Make(ActionKind kind, PageAddr page) {
  Action a;
  a.kind = kind;
  a.page = page;
  return a;
}

// Frees received bytes unused.
void DropData(PageAddr page, DataHandle handle, Actions* out) {
  Action a = Make(ActionKind::kDropData, page);
  a.handle = handle;
  out->push_back(std::move(a));
}

}  // namespace

const NodeAgent::PageTxn NodeAgent::kIdleTxn{};

NodeAgent::NodeAgent(NodeId self, NodeOptions options) : self_(self), options_(options) {
  DSVM_CHECK(self != proto::kNoNode);
}

void NodeAgent::Settle(LocalPage& lp) {
  const PageTxn* t = lp.active.get();
  // A refusal no newer than the last txn says nothing more than last_txn.
  if (t != nullptr && t->pending == AccessKind::kInvalid && !t->has_grant && !t->has_data &&
      !t->has_direct && t->waiters.empty() && t->stash_txn == 0 && t->refused_txn <= lp.last_txn) {
    lp.active.reset();
  }
}

bool NodeAgent::Disowns(const proto::Grant& m) const {
  auto it = pages_.find(m.page);
  if (m.status != static_cast<uint16_t>(StatusCode::kDataLoss) || it == pages_.end()) return false;
  const LocalPage& lp = it->second;
  return m.txn >= lp.last_txn && (lp.state != PageState::kInvalid || lp.retained);
}

PageState NodeAgent::StateOf(PageAddr page) const {
  auto it = pages_.find(page);
  return it == pages_.end() ? PageState::kInvalid : it->second.state;
}

std::vector<PageAddr> NodeAgent::AccessiblePages() const {
  std::vector<PageAddr> pages;
  for (const auto& [page, lp] : pages_) {
    if (lp.state != PageState::kInvalid) pages.push_back(page);
  }
  return pages;
}

uint64_t NodeAgent::VersionOf(PageAddr page) const {
  auto it = pages_.find(page);
  return it == pages_.end() ? 0 : it->second.version;
}

TxnId NodeAgent::LastTxnOf(PageAddr page) const {
  auto it = pages_.find(page);
  return it == pages_.end() ? 0 : it->second.last_txn;
}

bool NodeAgent::HasPending(PageAddr page) const { return pending_pages_.count(page) != 0; }

size_t NodeAgent::stash_count() const {
  size_t n = 0;
  for (const auto& [page, lp] : pages_) n += ActiveOrIdle(lp).stash_txn != 0;
  return n;
}

// ---------------------------------------------------------------------------
// Local events

FaultResult NodeAgent::Fault(PageAddr page, bool write, WaiterId waiter, uint64_t now_ms,
                             Actions* out, bool ask_holder) {
  LocalPage& lp = Get(page);
  if (Satisfies(lp.state, write)) {
    ++stats_.hits;
    return FaultResult::kHit;
  }
  ++stats_.faults;
  PageTxn& t = Active(lp);
  t.waiters.push_back(Waiter{waiter, write});
  if (t.pending == AccessKind::kInvalid) {
    Progress(page, lp, now_ms, out);
    // A read just asked for, of a page held nowhere here: a holder may
    // send its copy at once (PROTOCOL.md, "Direct reads").
    if (ask_holder && t.pending == AccessKind::kRead && lp.state == PageState::kInvalid &&
        !lp.retained) {
      out->push_back(Make(ActionKind::kAskHolder, page));
      ++stats_.direct_asks;
    }
  }
  Settle(lp);
  return FaultResult::kWait;
}

std::vector<WaiterId> NodeAgent::Forget() { return ForgetRange(0, ~PageAddr{0}); }

std::vector<WaiterId> NodeAgent::ForgetRange(PageAddr begin, PageAddr end) {
  std::vector<WaiterId> waiting;
  for (auto it = pages_.begin(); it != pages_.end();) {
    if (it->first < begin || it->first >= end) {
      ++it;
      continue;
    }
    for (const Waiter& w : ActiveOrIdle(it->second).waiters) waiting.push_back(w.id);
    pending_pages_.erase(it->first);
    recent_copies_.erase(it->first);
    awaiting_data_.erase(it->first);  // else Tick would look for a page that is gone
    unclaimed_data_.erase(it->first);
    it = pages_.erase(it);
  }
  return waiting;
}

bool NodeAgent::Evict(PageAddr page, uint64_t now_ms, Actions* out, NodeId target) {
  auto it = pages_.find(page);
  if (it == pages_.end()) return false;
  LocalPage& lp = it->second;
  if (ActiveOrIdle(lp).pending != AccessKind::kInvalid || lp.state == PageState::kInvalid) return false;
  lp.retained_from = lp.state;
  lp.retained = true;
  const AccessKind kind =
      lp.state == PageState::kModified ? AccessKind::kWriteback : AccessKind::kEvict;
  lp.state = PageState::kInvalid;
  Active(lp).give_up_target = target;
  out->push_back(Make(ActionKind::kUnmap, page));
  SendRequest(page, lp, kind, now_ms, out);
  return true;
}

void NodeAgent::SendRequest(PageAddr page, LocalPage& lp, AccessKind kind, uint64_t now_ms,
                            Actions* out) {
  PageTxn& t = Active(lp);
  DSVM_CHECK(t.pending == AccessKind::kInvalid);
  t.pending = kind;
  t.pending_seq = ++next_seq_;
  t.sent_ms = now_ms;
  t.resends = 0;
  pending_pages_.insert(page);
  ++stats_.requests;
  SendAcquire(page, lp, out);
}

void NodeAgent::SendAcquire(PageAddr page, const LocalPage& lp, Actions* out) {
  const PageTxn& t = ActiveOrIdle(lp);
  proto::Acquire m;
  m.page = page;
  m.node = self_;
  m.kind = t.pending;
  // The kind tells the directory what this node holds now, not when it first
  // asked: a copy may have come (a writeback pushed here) or gone since. The
  // directory takes "holds nothing" from a node that it records as a holder
  // as a lost copy, so this must be current on every resend.
  if (m.kind == AccessKind::kUpgrade || m.kind == AccessKind::kWrite) m.kind = WriteKind(lp.state);
  m.request_seq = t.pending_seq;
  m.last_txn = lp.last_txn;
  if (IsGiveUp(m.kind)) m.target = t.give_up_target;
  ToDirectory(page, m, out);
}

void NodeAgent::ClearPending(PageAddr page, LocalPage& lp) {
  if (lp.active) {
    lp.active->pending = AccessKind::kInvalid;
    lp.active->pending_seq = 0;
  }
  pending_pages_.erase(page);
}

void NodeAgent::Progress(PageAddr page, LocalPage& lp, uint64_t now_ms, Actions* out) {
  if (!lp.active) return;  // no request, no waiter
  PageTxn& t = *lp.active;
  const bool read_done = t.pending == AccessKind::kRead && Satisfies(lp.state, false);
  const bool write_done = (t.pending == AccessKind::kWrite || t.pending == AccessKind::kUpgrade) &&
                          Satisfies(lp.state, true);
  if (read_done || write_done) ClearPending(page, lp);

  bool want_write = false;
  auto keep = t.waiters.begin();
  for (const Waiter& w : t.waiters) {
    if (Satisfies(lp.state, w.write)) {
      Action a = Make(ActionKind::kWake, page);
      a.waiter = w.id;
      out->push_back(std::move(a));
    } else {
      want_write |= w.write;
      *keep++ = w;
    }
  }
  t.waiters.erase(keep, t.waiters.end());

  if (t.waiters.empty() || t.pending != AccessKind::kInvalid) return;
  AccessKind kind = AccessKind::kRead;
  if (want_write) kind = WriteKind(lp.state);
  SendRequest(page, lp, kind, now_ms, out);
}

// ---------------------------------------------------------------------------
// Directory messages

void NodeAgent::HandleGrant(const proto::Grant& m, uint64_t now_ms, Actions* out) {
  if (m.status != 0 && pages_.count(m.page) == 0) {
    // A refusal of a page this node never touched (or forgot with its
    // region): nothing waits or is held here, and no state is made for it.
    AckLossNotice(m, out);
    return;
  }
  LocalPage& lp = Get(m.page);
  if (m.status != 0) {
    // A refusal (the page is lost): it answers one request and changes no state.
    const PageTxn& held = ActiveOrIdle(lp);
    const bool answers = held.pending != AccessKind::kInvalid && !IsGiveUp(held.pending) &&
                         held.pending_seq == m.request_seq;
    if (answers || (held.has_grant && held.grant.txn <= m.txn)) {
      // A grant still waiting for its data is void (the refused request's,
      // or one no request waits for that Tick asked about): late bytes from
      // the dead source must not make this node a holder the directory
      // does not know.
      PageTxn& t = Active(lp);
      t.has_grant = false;
      t.refused_txn = std::max(t.refused_txn, m.txn);
      DropDataUpTo(m.page, lp, answers ? ~TxnId{0} : m.txn, out);
      DropDirect(m.page, lp, out);  // kept for the read, or the grant, just ended
    }
    if (answers) {
      ClearPending(m.page, lp);
      PageTxn& t = Active(lp);
      for (const Waiter& w : t.waiters) {
        Action a = Make(ActionKind::kWake, m.page);
        a.waiter = w.id;
        a.status = static_cast<StatusCode>(m.status);
        out->push_back(std::move(a));
      }
      t.waiters.clear();
    }
    if (Disowns(m)) {
      // The page was lost in txn m.txn, and this node holds a copy of it:
      // the very txn it installed (its Done came too late: a resend of the
      // request, sent before the data came, told the directory it never
      // would), or an older one the lost txn was to invalidate. No other
      // node may ever get the page now: drop the copy, so that local
      // accesses are told of the loss too rather than served bytes the
      // cluster has disowned (a write there would be seen by no one).
      out->push_back(Make(ActionKind::kDiscard, m.page));
      lp.state = PageState::kInvalid;
      lp.retained = false;
      if (IsGiveUp(ActiveOrIdle(lp).pending)) ClearPending(m.page, lp);
      ++stats_.disowned_copies;
      Progress(m.page, lp, now_ms, out);  // accesses that waited on a give-up ask now
    }
    AckLossNotice(m, out);  // no copy the loss disowns is left: dropped above, or none
    Settle(lp);
    return;
  }
  if (m.txn < lp.last_txn) return;  // stale
  if (m.txn == lp.last_txn) {
    // Installed already; our Done may have been lost.
    ToDirectory(m.page, proto::Done{m.page, m.txn, self_}, out);
    return;
  }
  PageTxn& t = Active(lp);
  t.has_grant = true;
  t.grant = m;
  TryInstall(m.page, lp, now_ms, out);
  if (t.has_grant && t.pending == AccessKind::kInvalid && m.request_seq != 0) {
    // A grant of a request this node no longer has pending (one the
    // directory had queued, satisfied meanwhile by a restore or a move
    // here) waits for its data with nothing to resend: Tick probes it.
    t.grant_ms = now_ms;
    t.grant_probes = 0;
    awaiting_data_.insert(m.page);
  }
  Settle(lp);
}

void NodeAgent::AckLossNotice(const proto::Grant& m, Actions* out) {
  if (m.status == static_cast<uint16_t>(StatusCode::kDataLoss)) {
    ToDirectory(m.page, proto::InvalidateAck{m.page, m.txn, self_}, out);
  }
}

void NodeAgent::TryInstall(PageAddr page, LocalPage& lp, uint64_t now_ms, Actions* out) {
  DSVM_CHECK(lp.active);  // it holds the grant
  PageTxn& t = *lp.active;
  const proto::Grant g = t.grant;
  const bool have_bytes = lp.state != PageState::kInvalid || lp.retained;
  switch (g.source) {
    case proto::DataSource::kOwner: {
      Action a = Make(ActionKind::kInstallData, page);
      if (t.has_data && t.data_txn == g.txn) {
        a.handle = t.data;
        t.has_data = false;
      } else if (t.has_direct && g.state == PageState::kShared && t.direct_version == g.version) {
        // A holder's copy at the version this read is granted: the very
        // bytes the grant's PageData would bring (PROTOCOL.md, "Direct reads").
        a.handle = t.direct;
        t.has_direct = false;
        ++stats_.direct_installs;
      } else {
        return;  // the data is still on its way
      }
      out->push_back(std::move(a));
      ++stats_.pages_received;
      break;
    }
    case proto::DataSource::kZero:
      out->push_back(Make(ActionKind::kInstallZero, page));
      break;
    case proto::DataSource::kSelf:
      if (!have_bytes) {
        t.has_grant = false;
        return ProtocolError(page, "grant from self, but this node holds no copy", out);
      }
      break;
    case proto::DataSource::kStash:
      if (t.stash_txn != 0 && t.stash_txn == g.stash_txn) {
        Action a = Make(ActionKind::kInstallStash, page);
        a.txn = t.stash_txn;
        out->push_back(std::move(a));
        t.stash_txn = 0;
      } else if (!have_bytes) {
        t.has_grant = false;
        return ProtocolError(page, "restore from a stash this node does not have", out);
      }
      break;
    case proto::DataSource::kReserved:
      t.has_grant = false;
      return ProtocolError(page, "grant with reserved data source", out);
  }
  t.has_grant = false;
  lp.retained = false;
  if (IsGiveUp(t.pending)) ClearPending(page, lp);  // a newer grant makes it moot
  lp.state = g.state;
  lp.version = g.version;
  lp.last_txn = g.txn;
  Map(page, g.state, out);
  DropStashBefore(page, lp, g.txn, out);
  DropDataUpTo(page, lp, g.txn, out);
  DropDirect(page, lp, out);
  ToDirectory(page, proto::Done{page, g.txn, self_}, out);
  Progress(page, lp, now_ms, out);
}

void NodeAgent::HandleFetch(const proto::Fetch& m, uint64_t now_ms, Actions* out) {
  LocalPage& lp = Get(m.page);
  if (m.txn < lp.last_txn) return;  // stale
  const bool have_bytes = lp.state != PageState::kInvalid || lp.retained;
  if (m.txn == lp.last_txn) {
    // A duplicate: our answer may have been lost.
    if (m.send_data) {
      Action a = Make(have_bytes ? ActionKind::kSendPage : ActionKind::kSendStash, m.page);
      a.node = m.requester;
      a.txn = m.txn;
      a.version = lp.version;
      if (have_bytes || ActiveOrIdle(lp).stash_txn == m.txn) out->push_back(std::move(a));
    } else {
      ToDirectory(m.page, proto::InvalidateAck{m.page, m.txn, self_}, out);
    }
    return;
  }
  if (!have_bytes) return ProtocolError(m.page, "fetch of a page this node does not hold", out);
  if (m.next_state != PageState::kShared && m.next_state != PageState::kInvalid) {
    return ProtocolError(m.page, "fetch with a next state other than Shared or Invalid", out);
  }
  lp.last_txn = m.txn;
  // Downgrade first, then read the bytes to send: local processes must not
  // be able to write while (or after) the copy is taken.
  if (m.next_state == PageState::kShared) {
    if (lp.retained_from == PageState::kModified) lp.retained_from = PageState::kShared;
    if (lp.state == PageState::kModified) {
      lp.state = PageState::kShared;
      Map(m.page, PageState::kShared, out);
      ++stats_.downgrades;
    }
    DropStashBefore(m.page, lp, m.txn, out);
    if (m.send_data && TakeRecentCopy(m.page, m.requester, lp.version, CopyFor::kAsk, now_ms)) {
      // The requester's ReadDirect took this very copy a moment ago: it
      // installs those bytes for this grant. Only this first Fetch of the
      // txn is skipped; a resend (the bytes were lost) is answered above.
      ++stats_.fetch_sends_skipped;
    } else if (m.send_data) {
      Action a = Make(ActionKind::kSendPage, m.page);
      a.node = m.requester;
      a.txn = m.txn;
      a.version = lp.version;
      out->push_back(std::move(a));
      ++stats_.pages_sent;
      NoteRecentCopy(m.page, m.requester, lp.version, CopyFor::kFetch, now_ms);
    }
  } else {
    recent_copies_.erase(m.page);
    DropStashBefore(m.page, lp, m.txn + 1, out);
    Action a = Make(ActionKind::kStash, m.page);
    a.txn = m.txn;
    out->push_back(std::move(a));
    Active(lp).stash_txn = m.txn;
    lp.state = PageState::kInvalid;
    lp.retained = false;
    ++stats_.invalidations;
    if (IsGiveUp(ActiveOrIdle(lp).pending)) ClearPending(m.page, lp);  // the move is the give-up
    if (m.send_data) {
      Action send = Make(ActionKind::kSendStash, m.page);  // the bytes as they were stashed
      send.node = m.requester;
      send.txn = m.txn;
      send.version = lp.version;
      out->push_back(std::move(send));
      ++stats_.pages_sent;
    } else {
      ToDirectory(m.page, proto::InvalidateAck{m.page, m.txn, self_}, out);
    }
  }
  Progress(m.page, lp, now_ms, out);
  Settle(lp);
}

void NodeAgent::HandleInvalidate(const proto::Invalidate& m, uint64_t now_ms, Actions* out) {
  LocalPage& lp = Get(m.page);
  if (m.txn < lp.last_txn) return;  // stale
  if (m.txn > lp.last_txn) {
    if (lp.state == PageState::kModified) {
      return ProtocolError(m.page, "invalidate of a Modified page (needs a fetch)", out);
    }
    lp.last_txn = m.txn;
    recent_copies_.erase(m.page);
    if (lp.state != PageState::kInvalid || lp.retained) out->push_back(Make(ActionKind::kDiscard, m.page));
    lp.state = PageState::kInvalid;
    lp.retained = false;
    if (IsGiveUp(ActiveOrIdle(lp).pending)) ClearPending(m.page, lp);
    DropStashBefore(m.page, lp, m.txn, out);
    ++stats_.invalidations;
  }
  ToDirectory(m.page, proto::InvalidateAck{m.page, m.txn, self_}, out);
  Progress(m.page, lp, now_ms, out);
  Settle(lp);
}

void NodeAgent::HandleRelease(const proto::Release& m, Actions* out) {
  auto it = pages_.find(m.page);
  if (it == pages_.end() || ActiveOrIdle(it->second).stash_txn != m.txn) return;
  DropStashBefore(m.page, it->second, m.txn + 1, out);
  Settle(it->second);
}

void NodeAgent::HandleEvictReply(const proto::EvictReply& m, uint64_t now_ms, Actions* out) {
  auto it = pages_.find(m.page);
  if (it == pages_.end()) return;
  LocalPage& lp = it->second;
  const PageTxn& t = ActiveOrIdle(lp);
  if (!IsGiveUp(t.pending) || t.pending_seq != m.request_seq) return;  // stale
  ClearPending(m.page, lp);
  // Every txn up to m.txn is complete: whatever of them is still on its way
  // here (a Fetch sent while this node was a sharer) is stale now.
  lp.last_txn = std::max(lp.last_txn, m.txn);
  if (lp.retained) {
    if (m.status == 0) {
      out->push_back(Make(ActionKind::kDiscard, m.page));
    } else {
      // Refused (no node can take the last copy): keep serving it.
      lp.state = lp.retained_from;
      Map(m.page, lp.state, out);
    }
    lp.retained = false;
  }
  Progress(m.page, lp, now_ms, out);
  Settle(lp);
}

void NodeAgent::HandlePageData(const proto::PageData& m, DataHandle handle, uint64_t now_ms,
                               Actions* out) {
  if (m.txn == 0) return HandleDirectData(m, handle, now_ms, out);
  LocalPage& lp = Get(m.page);
  const PageTxn& held = ActiveOrIdle(lp);
  if (m.txn <= lp.last_txn || m.txn <= held.refused_txn ||
      (held.has_data && held.data_txn >= m.txn)) {
    DropData(m.page, handle, out);  // stale, refused, or a duplicate
    return;
  }
  PageTxn& t = Active(lp);
  if (t.has_data) DropData(m.page, t.data, out);
  t.has_data = true;
  t.data_txn = m.txn;
  t.data = handle;
  t.data_ms = now_ms;
  if (!t.has_grant && t.pending == AccessKind::kInvalid) unclaimed_data_.insert(m.page);
  if (t.has_grant && t.grant.txn == m.txn) TryInstall(m.page, lp, now_ms, out);
  Settle(lp);
}

void NodeAgent::HandleDirectData(const proto::PageData& m, DataHandle handle, uint64_t now_ms,
                                 Actions* out) {
  auto it = pages_.find(m.page);
  PageTxn* t = it != pages_.end() ? it->second.active.get() : nullptr;
  // Kept only while this node holds no copy and waits for a read: for a
  // Shared grant of the bytes' version, whose own data it then need not
  // wait for. A version below the node's last copy's is one no grant can
  // name any more; of two, the newer is kept.
  const bool wanted = t != nullptr && it->second.state == PageState::kInvalid &&
                      !it->second.retained && m.version >= it->second.version &&
                      (t->pending == AccessKind::kRead ||
                       (t->has_grant && t->grant.state == PageState::kShared)) &&
                      (!t->has_direct || t->direct_version < m.version);
  if (!wanted) {
    DropData(m.page, handle, out);
    ++stats_.direct_unused;
    return;
  }
  LocalPage& lp = it->second;
  DropDirect(m.page, lp, out);
  t->has_direct = true;
  t->direct_version = m.version;
  t->direct = handle;
  if (t->has_grant) TryInstall(m.page, lp, now_ms, out);
  Settle(lp);
}

bool NodeAgent::HandleReadDirect(const proto::ReadDirect& m, uint64_t now_ms, Actions* out) {
  auto it = pages_.find(m.page);
  // Only a copy at rest: nothing asked, granted, received, stashed or
  // given up, so its bytes are those of its version and no txn is moving it.
  if (it == pages_.end() || m.node == self_ || it->second.active || it->second.retained ||
      it->second.state == PageState::kInvalid) {
    ++stats_.direct_ignored;
    return false;
  }
  LocalPage& lp = it->second;
  if (TakeRecentCopy(m.page, m.node, lp.version, CopyFor::kFetch, now_ms)) {
    // The directory's Fetch came first and sent the asker this copy: its
    // grant brings the same bytes. Also keeps a late ask from stopping a
    // writer for nothing.
    ++stats_.direct_repeats;
    return false;
  }
  if (lp.state == PageState::kModified) {
    // Stop writing before the copy is read: bytes labelled with a version
    // are final once they leave, and a write from here on is an upgrade,
    // which the directory grants with a new version. The directory still
    // records this node as the writer; that is allowed (never the reverse).
    lp.state = PageState::kShared;
    Map(m.page, PageState::kShared, out);
    ++stats_.downgrades;
  }
  Action a = Make(ActionKind::kSendPage, m.page);
  a.node = m.node;
  a.txn = 0;
  a.version = lp.version;
  out->push_back(std::move(a));
  ++stats_.pages_sent;
  ++stats_.direct_served;
  NoteRecentCopy(m.page, m.node, lp.version, CopyFor::kAsk, now_ms);
  return true;
}

bool NodeAgent::TakeRecentCopy(PageAddr page, NodeId to, uint64_t version, CopyFor why,
                               uint64_t now_ms) {
  auto it = recent_copies_.find(page);
  if (it == recent_copies_.end()) return false;
  std::vector<RecentCopy>& copies = it->second;
  auto c =
      std::find_if(copies.begin(), copies.end(), [&](const RecentCopy& r) { return r.to == to; });
  if (c == copies.end()) return false;
  const bool match =
      c->version == version && c->why == why && now_ms < c->sent_ms + options_.retransmit_after_ms;
  if (match) {
    copies.erase(c);
    if (copies.empty()) recent_copies_.erase(it);
  }
  return match;
}

void NodeAgent::NoteRecentCopy(PageAddr page, NodeId to, uint64_t version, CopyFor why,
                               uint64_t now_ms) {
  std::vector<RecentCopy>& copies = recent_copies_[page];
  const RecentCopy copy{to, version, now_ms, why};
  auto c =
      std::find_if(copies.begin(), copies.end(), [&](const RecentCopy& r) { return r.to == to; });
  if (c != copies.end()) {
    *c = copy;
  } else {
    copies.push_back(copy);
  }
}

void NodeAgent::ForgetRecentCopy(PageAddr page, NodeId to) {
  auto it = recent_copies_.find(page);
  if (it == recent_copies_.end()) return;
  std::erase_if(it->second, [&](const RecentCopy& r) { return r.to == to; });
  if (it->second.empty()) recent_copies_.erase(it);
}

bool NodeAgent::MayReceiveInPlace(const proto::PageData& m) const {
  auto it = pages_.find(m.page);
  if (it == pages_.end() || !it->second.active) return false;
  const LocalPage& lp = it->second;
  const PageTxn& t = *lp.active;
  return lp.state == PageState::kInvalid && !lp.retained && m.txn > lp.last_txn &&
         m.txn > t.refused_txn && !t.has_data;
}

// ---------------------------------------------------------------------------
// Timers

void NodeAgent::Tick(uint64_t now_ms, Actions* out) {
  for (PageAddr page : pending_pages_) {
    LocalPage& lp = pages_.at(page);
    DSVM_CHECK(lp.active);  // a request is pending
    PageTxn& t = *lp.active;
    const uint64_t wait = options_.retransmit_after_ms << std::min(t.resends, kMaxBackoffShift);
    if (t.sent_ms + wait <= now_ms) {
      t.sent_ms = now_ms;
      ++t.resends;
      ++stats_.retransmits;
      SendAcquire(page, lp, out);
    }
  }
  // A grant no request waits for, whose data has not come: ask the
  // directory about it as its requester, with the grant's request_seq and
  // what this node installed. It has the data sent again if its supplier
  // lives, or settles the txn if the supplier died (PROTOCOL.md, Crashes).
  for (auto it = awaiting_data_.begin(); it != awaiting_data_.end();) {
    LocalPage& lp = pages_.at(*it);
    if (!lp.active || !lp.active->has_grant || lp.active->pending != AccessKind::kInvalid) {
      it = awaiting_data_.erase(it);
      continue;
    }
    PageTxn& t = *lp.active;
    const uint64_t wait = options_.retransmit_after_ms << std::min(t.grant_probes, kMaxBackoffShift);
    if (t.grant_ms + wait <= now_ms) {
      t.grant_ms = now_ms;
      ++t.grant_probes;
      ++stats_.grant_probes;
      proto::Acquire m;
      m.page = *it;
      m.node = self_;
      m.kind = t.grant.state == PageState::kModified ? WriteKind(lp.state) : AccessKind::kRead;
      m.request_seq = t.grant.request_seq;
      m.last_txn = lp.last_txn;
      ToDirectory(*it, m, out);
    }
    ++it;
  }
  DropUnclaimedData(now_ms, out);
  for (auto it = recent_copies_.begin(); it != recent_copies_.end();) {
    std::erase_if(it->second, [&](const RecentCopy& r) {
      return r.sent_ms + options_.retransmit_after_ms <= now_ms;
    });
    it = it->second.empty() ? recent_copies_.erase(it) : std::next(it);
  }
}

void NodeAgent::DropUnclaimedData(uint64_t now_ms, Actions* out) {
  const uint64_t wait = options_.retransmit_after_ms << kMaxBackoffShift;
  for (auto it = unclaimed_data_.begin(); it != unclaimed_data_.end();) {
    auto page = pages_.find(*it);
    const PageTxn* t = page != pages_.end() ? page->second.active.get() : nullptr;
    if (t == nullptr || !t->has_data || t->has_grant || t->pending != AccessKind::kInvalid) {
      it = unclaimed_data_.erase(it);  // claimed, dropped, or a request now waits for it
      continue;
    }
    if (t->data_ms + wait <= now_ms) {
      DropDataUpTo(*it, page->second, ~TxnId{0}, out);
      Settle(page->second);
      it = unclaimed_data_.erase(it);
      continue;
    }
    ++it;
  }
}

void NodeAgent::ResendAll(uint64_t now_ms, Actions* out) {
  for (PageAddr page : pending_pages_) {
    LocalPage& lp = pages_.at(page);
    DSVM_CHECK(lp.active);  // a request is pending
    PageTxn& t = *lp.active;
    t.sent_ms = now_ms;
    t.resends = 0;  // a new connection: the base interval again
    ++stats_.retransmits;
    SendAcquire(page, lp, out);
  }
}

// ---------------------------------------------------------------------------
// Helpers

void NodeAgent::DropStashBefore(PageAddr page, LocalPage& lp, TxnId txn, Actions* out) {
  // Any txn newer than the stash's means its move completed.
  if (!lp.active || lp.active->stash_txn == 0 || lp.active->stash_txn >= txn) return;
  Action a = Make(ActionKind::kDropStash, page);
  a.txn = lp.active->stash_txn;
  out->push_back(std::move(a));
  lp.active->stash_txn = 0;
}

void NodeAgent::DropDataUpTo(PageAddr page, LocalPage& lp, TxnId txn, Actions* out) {
  if (!lp.active || !lp.active->has_data || lp.active->data_txn > txn) return;
  DropData(page, lp.active->data, out);
  lp.active->has_data = false;
}

void NodeAgent::DropDirect(PageAddr page, LocalPage& lp, Actions* out) {
  if (!lp.active || !lp.active->has_direct) return;
  DropData(page, lp.active->direct, out);
  lp.active->has_direct = false;
  ++stats_.direct_unused;
}

void NodeAgent::Map(PageAddr page, PageState state, Actions* out) {
  out->push_back(Make(state == PageState::kModified ? ActionKind::kMapWrite : ActionKind::kMapRead, page));
}

void NodeAgent::ToDirectory(PageAddr page, proto::Message m, Actions* out) {
  Action a = Make(ActionKind::kSendToDirectory, page);
  a.message = std::move(m);
  out->push_back(std::move(a));
}

void NodeAgent::ProtocolError(PageAddr page, std::string why, Actions* out) {
  ++stats_.protocol_errors;
  Action a = Make(ActionKind::kProtocolError, page);
  a.text = std::move(why);
  out->push_back(std::move(a));
}

}  // namespace dsvm::node
