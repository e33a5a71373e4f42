// Unit tests for coordinator::PageDirectory, the directory side of the MSI
// protocol (proto/PROTOCOL.md: "Directory state table", "Duplicates and
// staleness", "Crashes and persistence").
//
// The fixture drives one directory step by step. After every step it checks
// the record invariants (CheckInvariants) and persists the dirty records the
// way the service does (proto::EncodeFields into a map keyed by page), so any
// test can "kill -9" the directory and restart it from that map.
//
// Outboxes and records are compared as one-line descriptions that name every
// field of every message, so a missing, extra or altered message fails.
#include "coordinator/directory/page_directory.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <initializer_list>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "proto/messages.h"
#include "proto/status.h"
#include "proto/wire.h"

namespace dsvm::coordinator {
namespace {

constexpr PageAddr kPage = 0x7000;  // the page most tests use; omitted from descriptions
constexpr uint64_t kRetransmitMs = 200;
constexpr uint64_t kStart = 1000;

using Strings = std::vector<std::string>;

// ---------------------------------------------------------------------------
// Descriptions.

const char* StateName(PageState s) {
  switch (s) {
    case PageState::kInvalid: return "I";
    case PageState::kShared: return "S";
    case PageState::kModified: return "M";
    case PageState::kReserved: break;
  }
  return "reserved";
}

const char* SourceName(DataSource s) {
  switch (s) {
    case DataSource::kZero: return "zero";
    case DataSource::kSelf: return "self";
    case DataSource::kOwner: return "owner";
    case DataSource::kStash: return "stash";
    case DataSource::kReserved: break;
  }
  return "reserved";
}

std::string CodeName(uint16_t code) {
  return std::string(StatusCodeName(static_cast<StatusCode>(code)));
}

std::string At(PageAddr page) {
  if (page == kPage) return "";
  char buf[32];
  std::snprintf(buf, sizeof(buf), " @%llx", static_cast<unsigned long long>(page));
  return buf;
}

// "Grant>2 txn=2 seq=1 S src=owner OK v=1 stash=0": message type, then '>'
// and the destination node, then every field but the page (shown as @hex only
// when it is not kPage).
std::string Describe(const Outgoing& o) {
  const std::string to = ">" + std::to_string(o.to);
  return std::visit(
      [&](const auto& m) -> std::string {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, proto::Grant>) {
          return "Grant" + to + At(m.page) + " txn=" + std::to_string(m.txn) +
                 " seq=" + std::to_string(m.request_seq) + " " + StateName(m.state) +
                 " src=" + SourceName(m.source) + " " + CodeName(m.status) +
                 " v=" + std::to_string(m.version) + " stash=" + std::to_string(m.stash_txn);
        } else if constexpr (std::is_same_v<T, proto::Fetch>) {
          return "Fetch" + to + At(m.page) + " txn=" + std::to_string(m.txn) +
                 " req=" + std::to_string(m.requester) + " next=" + StateName(m.next_state) +
                 " data=" + std::to_string(m.send_data);
        } else if constexpr (std::is_same_v<T, proto::Invalidate>) {
          return "Invalidate" + to + At(m.page) + " txn=" + std::to_string(m.txn) +
                 " writer=" + std::to_string(m.writer);
        } else if constexpr (std::is_same_v<T, proto::Release>) {
          return "Release" + to + At(m.page) + " txn=" + std::to_string(m.txn);
        } else if constexpr (std::is_same_v<T, proto::EvictReply>) {
          return "EvictReply" + to + At(m.page) + " seq=" + std::to_string(m.request_seq) + " " +
                 CodeName(m.status);
        } else {
          return std::string("unexpected ") + proto::TypeName(T::kType) + to;
        }
      },
      o.message);
}

// In send order.
Strings Msgs(const Outbox& out) {
  Strings s;
  for (const Outgoing& o : out) s.push_back(Describe(o));
  return s;
}

// For messages whose relative order carries no meaning: sorted descriptions.
Strings AnyOrder(Strings s) {
  std::sort(s.begin(), s.end());
  return s;
}
Strings Unordered(const Outbox& out) { return AnyOrder(Msgs(out)); }

// "S owner=1 holders=1@1,2@2 v=1 txn=2 busy": node@since for each holder.
std::string Summary(const PageRecord* r) {
  if (r == nullptr) return "absent";
  std::string s = std::string(StateName(r->state)) + " owner=" + std::to_string(r->owner) +
                  " holders=";
  for (size_t i = 0; i < r->sharers.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(r->sharers[i].node) + "@" + std::to_string(r->sharers[i].since);
  }
  s += " v=" + std::to_string(r->version) + " txn=" + std::to_string(r->txn);
  if (r->busy) s += " busy";
  if (r->lost) s += " lost";
  return s;
}

// ---------------------------------------------------------------------------
// Fixture.

class PageDirectoryTest : public ::testing::Test {
 protected:
  static DirectoryOptions Options() {
    DirectoryOptions o;
    o.retransmit_after_ms = kRetransmitMs;
    o.page_size = 4096;
    return o;
  }

  PageDirectoryTest() : dir_(std::make_unique<PageDirectory>(Options())) {}

  void Up(std::initializer_list<NodeId> nodes) {
    for (NodeId n : nodes) {
      dir_->NodeUp(n);
      live_.insert(n);
    }
    Step("NodeUp");
  }

  Outbox Acquire(NodeId node, AccessKind kind, uint64_t seq, TxnId last_txn,
                 PageAddr page = kPage) {
    Outbox out;
    dir_->HandleAcquire(proto::Acquire{page, node, kind, seq, last_txn}, now_, &out);
    Step("Acquire from " + std::to_string(node));
    return out;
  }
  // A give-up that names the node to take the last copy.
  Outbox GiveUpTo(NodeId node, AccessKind kind, uint64_t seq, TxnId last_txn, NodeId target) {
    Outbox out;
    proto::Acquire m{kPage, node, kind, seq, last_txn};
    m.target = target;
    dir_->HandleAcquire(m, now_, &out);
    Step("Acquire from " + std::to_string(node) + " for " + std::to_string(target));
    return out;
  }
  Outbox Ack(NodeId node, TxnId txn, PageAddr page = kPage) {
    Outbox out;
    dir_->HandleInvalidateAck(proto::InvalidateAck{page, txn, node}, now_, &out);
    Step("InvalidateAck from " + std::to_string(node));
    return out;
  }
  Outbox Done(NodeId node, TxnId txn, PageAddr page = kPage) {
    Outbox out;
    dir_->HandleDone(proto::Done{page, txn, node}, now_, &out);
    Step("Done from " + std::to_string(node));
    return out;
  }
  Outbox Down(NodeId node) {
    Outbox out;
    live_.erase(node);
    dir_->NodeDown(node, &out);
    Step("NodeDown " + std::to_string(node));
    return out;
  }
  Outbox TickAt(uint64_t now) {
    now_ = now;
    Outbox out;
    dir_->Tick(now, &out);
    Step("Tick");
    return out;
  }
  void DropRange(PageAddr begin, PageAddr end) {
    dir_->DropRange(begin, end);
    store_.erase(store_.lower_bound(begin), store_.lower_bound(end));  // the caller's part
    Step("DropRange");
  }

  // What an ideal network of nodes answers: Done for each Grant, an ack for
  // each Invalidate and no-data Fetch. For setting up a page's state.
  void Settle(const Outbox& first) {
    std::deque<Outgoing> q(first.begin(), first.end());
    while (!q.empty()) {
      const Outgoing o = q.front();
      q.pop_front();
      Outbox next;
      if (const auto* g = std::get_if<proto::Grant>(&o.message); g && g->status == 0) {
        next = Done(o.to, g->txn, g->page);
      } else if (const auto* i = std::get_if<proto::Invalidate>(&o.message)) {
        next = Ack(o.to, i->txn, i->page);
      } else if (const auto* f = std::get_if<proto::Fetch>(&o.message); f && !f->send_data) {
        next = Ack(o.to, f->txn, f->page);
      }
      q.insert(q.end(), next.begin(), next.end());
    }
  }
  // Completed write / read by a node that holds nothing.
  void Write(NodeId n, PageAddr page = kPage) {
    Settle(Acquire(n, AccessKind::kWrite, ++next_seq_, 0, page));
    const PageRecord* r = dir_->Find(page);
    ASSERT_NE(r, nullptr);
    ASSERT_FALSE(r->busy);
    ASSERT_EQ(r->state, PageState::kModified);
    ASSERT_EQ(r->owner, n);
  }
  // `reader` asks to read `page`, which `supplier` wrote, and the
  // supplier dies with the read's Grant gone: the directory waits for the
  // reader (DeathOfTheOnlyReadSupplier...). The read is the page's txn 2.
  // Node 1 writes the page, node 2 asks for it (kRead or kWrite), and node
  // 1, its only supplier, dies once the Grant has left: the directory waits
  // for node 2, whose Done ends the txn with the page there.
  void OnlySupplierDiesThenTheRequestersDoneEndsIt(AccessKind kind) {
    const bool write = kind == AccessKind::kWrite;
    const std::string held = std::string(write ? "M" : "S") + " owner=2 holders=2@2 v=" +
                             (write ? "2" : "1") + " txn=2";
    Up({1, 2});
    Write(1);
    ASSERT_EQ(Unordered(Acquire(2, kind, 3, 0)),
              AnyOrder({std::string("Fetch>1 txn=2 req=2 next=") + (write ? "I" : "S") + " data=1",
                        std::string("Grant>2 txn=2 seq=3 ") + (write ? "M" : "S") +
                            " src=owner OK v=" + (write ? "2" : "1") + " stash=0"}));
    EXPECT_EQ(Msgs(Down(1)), Strings{});
    EXPECT_EQ(Rec(), held + " busy");
    EXPECT_EQ(Msgs(Done(2, 2)), Strings{}) << "no Release: the supplier is gone";
    EXPECT_EQ(Rec(), held);
    EXPECT_EQ(dir_->stats().pages_lost, 0u);
    ASSERT_TRUE(dir_->CheckInvariants().ok());
  }
  // Nodes 1 and 2 share the page; node 3 writes it (seq 7, txn 3): data
  // from node 1, node 2 invalidated. Node 1 dies with node 2's ack owed:
  // the directory waits for the writer.
  void WriteFromSharedWhoseSupplierDies() {
    Up({1, 2, 3});
    Read(1);
    Read(2);
    ASSERT_EQ(Rec(), "S owner=1 holders=1@1,2@2 v=0 txn=2");
    ASSERT_EQ(Unordered(Acquire(3, AccessKind::kWrite, 7, 0)),
              AnyOrder({"Fetch>1 txn=3 req=3 next=I data=1", "Invalidate>2 txn=3 writer=3"}));
    ASSERT_EQ(Msgs(Down(1)), Strings{}) << "waits for the writer";
  }
  void ReadWhoseOnlySupplierDies(NodeId supplier, NodeId reader, uint64_t seq,
                                 PageAddr page = kPage) {
    Write(supplier, page);
    ASSERT_EQ(Acquire(reader, AccessKind::kRead, seq, 0, page).size(), 2u);
    EXPECT_EQ(Msgs(Down(supplier)), Strings{});
  }
  void Read(NodeId n, PageAddr page = kPage) {
    Settle(Acquire(n, AccessKind::kRead, ++next_seq_, 0, page));
    const PageRecord* r = dir_->Find(page);
    ASSERT_NE(r, nullptr);
    ASSERT_FALSE(r->busy);
    ASSERT_NE(r->FindSharer(n), nullptr);
  }

  std::string Rec(PageAddr page = kPage) const { return Summary(dir_->Find(page)); }

  // Checks the invariants and persists what changed, write-ahead, as the
  // service does after every burst.
  void Step(const std::string& what) {
    const Status s = dir_->CheckInvariants();
    EXPECT_TRUE(s.ok()) << "after " << what << ": " << s.ToString();
    last_dirty_.clear();
    dir_->TakeDirty(&last_dirty_);
    for (const PageRecord& r : last_dirty_) store_[r.page] = proto::EncodeFields(r);
  }

  // kill -9 and restart: a fresh directory loaded from the store only.
  void Restart() {
    dir_ = std::make_unique<PageDirectory>(Options());
    for (const auto& [page, bytes] : store_) {
      PageRecord r;
      const Status s = proto::DecodeFields(std::span<const uint8_t>(bytes), &r);
      ASSERT_TRUE(s.ok()) << s.ToString();
      ASSERT_EQ(r.page, page);
      dir_->Restore(r);
    }
    for (NodeId n : live_) dir_->NodeUp(n);
    Step("restart");
  }

  std::unique_ptr<PageDirectory> dir_;
  uint64_t now_ = kStart;
  uint64_t next_seq_ = 100;
  std::set<NodeId> live_;
  std::vector<PageRecord> last_dirty_;
  std::map<PageAddr, std::vector<uint8_t>> store_;
};

// ---------------------------------------------------------------------------
// Serving requests.

TEST_F(PageDirectoryTest, FirstTouchGrantsZeroFill) {
  Up({1, 2});
  EXPECT_EQ(Msgs(Acquire(1, AccessKind::kRead, 1, 0)),
            Strings({"Grant>1 txn=1 seq=1 S src=zero OK v=0 stash=0"}));
  EXPECT_EQ(Rec(), "S owner=1 holders=1@1 v=0 txn=1 busy");
  EXPECT_EQ(Msgs(Done(1, 1)), Strings{});
  EXPECT_EQ(Rec(), "S owner=1 holders=1@1 v=0 txn=1");

  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kWrite, 1, 0, kPage + 4096)),
            Strings({"Grant>2 @8000 txn=1 seq=1 M src=zero OK v=1 stash=0"}));
  EXPECT_EQ(Rec(kPage + 4096), "M owner=2 holders=2@1 v=1 txn=1 busy");
}

// A page read by more nodes than a PageQueryReply lists: the reply names
// the first kMaxSharersInReply and still encodes (it aborted the coordinator).
TEST_F(PageDirectoryTest, AQueryOfAPageWithMoreSharersThanAReplyListsIsCut) {
  const NodeId n = proto::kMaxSharersInReply + 5;
  for (NodeId node = 1; node <= n; ++node) {
    dir_->NodeUp(node);
    live_.insert(node);
  }
  for (NodeId node = 1; node <= n; ++node) {
    Outbox out;
    dir_->HandleAcquire(proto::Acquire{kPage, node, AccessKind::kRead, 1, 0}, now_, &out);
    dir_->HandleDone(proto::Done{kPage, node, node}, now_, &out);
  }
  Step("reads");
  ASSERT_EQ(dir_->Find(kPage)->sharers.size(), n);
  const proto::PageQueryReply q = dir_->Query(kPage);
  EXPECT_EQ(q.sharers.size(), proto::kMaxSharersInReply);
  EXPECT_EQ(q.sharers.front(), 1u);
  auto back = proto::Decode(proto::Encode(q, 1));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
}

TEST_F(PageDirectoryTest, AcquireFromNodeNotLiveIsIgnored) {
  Up({1});
  EXPECT_EQ(Msgs(Acquire(7, AccessKind::kRead, 1, 0)), Strings{});
  EXPECT_EQ(Rec(), "absent");
  EXPECT_EQ(dir_->stats().stale_ignored, 1u);
}

// One directory hop plus the data move: Fetch to the owner, Grant to the
// reader, nothing else.
TEST_F(PageDirectoryTest, ReadMissOnModifiedPageForwardsToOwner) {
  Up({1, 2});
  Write(1);
  ASSERT_EQ(Rec(), "M owner=1 holders=1@1 v=1 txn=1");

  Outbox out = Acquire(2, AccessKind::kRead, 5, 0);
  EXPECT_EQ(Unordered(out), AnyOrder({"Fetch>1 txn=2 req=2 next=S data=1",
                                     "Grant>2 txn=2 seq=5 S src=owner OK v=1 stash=0"}));
  // The old owner stays supplier; the reader joins as of txn 2.
  EXPECT_EQ(Rec(), "S owner=1 holders=1@1,2@2 v=1 txn=2 busy");

  // A read does not move a stash: no Release.
  EXPECT_EQ(Msgs(Done(2, 2)), Strings{});
  EXPECT_EQ(Rec(), "S owner=1 holders=1@1,2@2 v=1 txn=2");
}

TEST_F(PageDirectoryTest, WriteToPageSharedByThreeWaitsForEveryAck) {
  Up({1, 2, 3, 4});
  Write(1);
  Read(2);
  Read(3);
  ASSERT_EQ(Rec(), "S owner=1 holders=1@1,2@2,3@3 v=1 txn=3");

  EXPECT_EQ(Unordered(Acquire(4, AccessKind::kWrite, 9, 0)),
            AnyOrder({"Fetch>1 txn=4 req=4 next=I data=1", "Invalidate>2 txn=4 writer=4",
                      "Invalidate>3 txn=4 writer=4"}));
  EXPECT_EQ(Rec(), "M owner=4 holders=4@4 v=2 txn=4 busy");

  // Done before the Grant was sent cannot be genuine.
  EXPECT_EQ(Msgs(Done(4, 4)), Strings{});
  EXPECT_EQ(Msgs(Ack(2, 4)), Strings{});
  EXPECT_EQ(Msgs(Ack(2, 4)), Strings{});  // duplicate ack
  EXPECT_EQ(Msgs(Ack(1, 4)), Strings{});  // the supplier sends data, it is not asked to ack
  EXPECT_EQ(Msgs(Ack(3, 3)), Strings{});  // wrong txn
  EXPECT_TRUE(dir_->Find(kPage)->busy);

  EXPECT_EQ(Msgs(Ack(3, 4)), Strings({"Grant>4 txn=4 seq=9 M src=owner OK v=2 stash=0"}));
  EXPECT_EQ(Msgs(Done(4, 4)), Strings({"Release>1 txn=4"}));
  EXPECT_EQ(Rec(), "M owner=4 holders=4@4 v=2 txn=4");
}

TEST_F(PageDirectoryTest, BusyPageQueuesRequestsAndServesThemInArrivalOrder) {
  Up({1, 2, 3});
  EXPECT_EQ(Msgs(Acquire(1, AccessKind::kWrite, 1, 0)),
            Strings({"Grant>1 txn=1 seq=1 M src=zero OK v=1 stash=0"}));

  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kRead, 5, 0)), Strings{});
  EXPECT_EQ(Msgs(Acquire(3, AccessKind::kWrite, 7, 0)), Strings{});
  // Node 2's newer request replaces its queued read, keeping its place.
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kWrite, 6, 0)), Strings{});
  // An older request never replaces a newer one.
  EXPECT_EQ(Msgs(Acquire(3, AccessKind::kRead, 4, 0)), Strings{});
  EXPECT_EQ(dir_->stats().queued, 2u);
  EXPECT_EQ(Rec(), "M owner=1 holders=1@1 v=1 txn=1 busy");

  EXPECT_EQ(Unordered(Done(1, 1)), AnyOrder({"Fetch>1 txn=2 req=2 next=I data=1",
                                            "Grant>2 txn=2 seq=6 M src=owner OK v=2 stash=0"}));
  EXPECT_EQ(Rec(), "M owner=2 holders=2@2 v=2 txn=2 busy");

  // The move completes (Release first), then node 3's write runs.
  Outbox out = Done(2, 2);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(Describe(out[0]), "Release>1 txn=2");
  EXPECT_EQ(AnyOrder(Strings{Describe(out[1]), Describe(out[2])}),
            AnyOrder({"Fetch>2 txn=3 req=3 next=I data=1",
                      "Grant>3 txn=3 seq=7 M src=owner OK v=3 stash=0"}));
  EXPECT_EQ(Msgs(Done(3, 3)), Strings({"Release>2 txn=3"}));
  EXPECT_EQ(Rec(), "M owner=3 holders=3@3 v=3 txn=3");
  EXPECT_EQ(dir_->busy_count(), 0u);
}

TEST_F(PageDirectoryTest, DuplicateAcquireFromRequesterResendsWhatIsOutstanding) {
  Up({1, 2, 3, 4});
  Write(1);
  Read(2);
  Read(3);
  ASSERT_EQ(Unordered(Acquire(4, AccessKind::kWrite, 9, 0)),
            AnyOrder({"Fetch>1 txn=4 req=4 next=I data=1", "Invalidate>2 txn=4 writer=4",
                      "Invalidate>3 txn=4 writer=4"}));
  EXPECT_EQ(Msgs(Ack(2, 4)), Strings{});

  // Same request_seq: resend the Fetch and the Invalidate still unacked.
  EXPECT_EQ(Unordered(Acquire(4, AccessKind::kWrite, 9, 0)),
            AnyOrder({"Fetch>1 txn=4 req=4 next=I data=1", "Invalidate>3 txn=4 writer=4"}));
  EXPECT_EQ(dir_->stats().retransmits, 1u);

  EXPECT_EQ(Msgs(Ack(3, 4)), Strings({"Grant>4 txn=4 seq=9 M src=owner OK v=2 stash=0"}));
  // The Grant may have been lost: the next duplicate resends it too.
  EXPECT_EQ(Unordered(Acquire(4, AccessKind::kWrite, 9, 0)),
            AnyOrder({"Fetch>1 txn=4 req=4 next=I data=1",
                      "Grant>4 txn=4 seq=9 M src=owner OK v=2 stash=0"}));
  EXPECT_EQ(dir_->stats().retransmits, 2u);
  EXPECT_EQ(Rec(), "M owner=4 holders=4@4 v=2 txn=4 busy");
  EXPECT_EQ(Msgs(Done(4, 4)), Strings({"Release>1 txn=4"}));
}

TEST_F(PageDirectoryTest, TickResendsAfterRetransmitInterval) {
  Up({1, 2});
  Write(1);
  ASSERT_EQ(Acquire(2, AccessKind::kWrite, 3, 0).size(), 2u);
  EXPECT_EQ(Msgs(TickAt(kStart + kRetransmitMs - 1)), Strings{});
  EXPECT_EQ(Unordered(TickAt(kStart + kRetransmitMs)),
            AnyOrder({"Fetch>1 txn=2 req=2 next=I data=1",
                      "Grant>2 txn=2 seq=3 M src=owner OK v=2 stash=0"}));
  // The resend restarts the interval.
  EXPECT_EQ(Msgs(TickAt(kStart + 2 * kRetransmitMs - 1)), Strings{});
}

TEST_F(PageDirectoryTest, StaleDuplicateFromSatisfiedHolderIsIgnored) {
  Up({1, 2});
  Read(1);
  ASSERT_EQ(Unordered(Acquire(2, AccessKind::kRead, 3, 0)),
            AnyOrder({"Fetch>1 txn=2 req=2 next=S data=1",
                      "Grant>2 txn=2 seq=3 S src=owner OK v=0 stash=0"}));
  ASSERT_EQ(Msgs(Done(2, 2)), Strings{});

  // The same request, delayed: sent before node 2 learned of its role (txn 2).
  const uint64_t ignored = dir_->stats().stale_ignored;
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kRead, 3, 0)), Strings{});
  EXPECT_EQ(dir_->stats().stale_ignored, ignored + 1);
  EXPECT_EQ(Rec(), "S owner=1 holders=1@1,2@2 v=0 txn=2");
  EXPECT_TRUE(last_dirty_.empty()) << "an ignored request changes no record";

  // The supplier upgrades (the other sharer keeps a stash until the upgrade
  // completes), then a delayed copy of that upgrade arrives after the node
  // became the writer.
  EXPECT_EQ(Msgs(Acquire(1, AccessKind::kUpgrade, 4, 2)),
            Strings({"Fetch>2 txn=3 req=1 next=I data=0"}));
  EXPECT_EQ(Msgs(Ack(2, 3)), Strings({"Grant>1 txn=3 seq=4 M src=self OK v=1 stash=0"}));
  EXPECT_EQ(Msgs(Done(1, 3)), Strings({"Release>2 txn=3"}));
  ASSERT_EQ(Rec(), "M owner=1 holders=1@3 v=1 txn=3");
  EXPECT_EQ(Msgs(Acquire(1, AccessKind::kUpgrade, 4, 2)), Strings{});
  EXPECT_EQ(dir_->stats().stale_ignored, ignored + 2);
  EXPECT_EQ(Rec(), "M owner=1 holders=1@3 v=1 txn=3");
}

// A holder that has seen its role and asks as if it held nothing lost its
// copy (a restarted daemon); the only copy is then lost.
TEST_F(PageDirectoryTest, SoleHolderSayingItHoldsNothingLosesThePage) {
  Up({1, 2});
  Write(1);
  EXPECT_EQ(Msgs(Acquire(1, AccessKind::kWrite, 5, 1)),
            Strings({"Grant>1 txn=1 seq=5 I src=zero DATA_LOSS v=1 stash=0"}));
  EXPECT_EQ(Rec(), "I owner=0 holders= v=1 txn=1 lost");
}

// The same from a non-sole sharer only drops it from the set; it is served
// as a node holding nothing.
TEST_F(PageDirectoryTest, NonSoleHolderSayingItHoldsNothingIsServedAfresh) {
  Up({1, 2});
  Write(1);
  Read(2);
  ASSERT_EQ(Rec(), "S owner=1 holders=1@1,2@2 v=1 txn=2");
  EXPECT_EQ(Unordered(Acquire(1, AccessKind::kWrite, 5, 2)),
            AnyOrder({"Fetch>2 txn=3 req=1 next=I data=1",
                      "Grant>1 txn=3 seq=5 M src=owner OK v=2 stash=0"}));
  EXPECT_EQ(Rec(), "M owner=1 holders=1@3 v=2 txn=3 busy");
}

TEST_F(PageDirectoryTest, UpgradeFromSharerGetsSelfAndSupplierAcksNoDataFetch) {
  Up({1, 2, 3});
  Write(1);
  Read(2);
  Read(3);
  ASSERT_EQ(Rec(), "S owner=1 holders=1@1,2@2,3@3 v=1 txn=3");

  EXPECT_EQ(Unordered(Acquire(2, AccessKind::kUpgrade, 5, 2)),
            AnyOrder({"Fetch>1 txn=4 req=2 next=I data=0", "Invalidate>3 txn=4 writer=2"}));
  EXPECT_EQ(Rec(), "M owner=2 holders=2@4 v=2 txn=4 busy");
  EXPECT_EQ(Msgs(Ack(3, 4)), Strings{});  // the supplier's ack is still missing

  // Only what is unacked is resent.
  EXPECT_EQ(Msgs(TickAt(kStart + kRetransmitMs)), Strings({"Fetch>1 txn=4 req=2 next=I data=0"}));

  EXPECT_EQ(Msgs(Ack(1, 4)), Strings({"Grant>2 txn=4 seq=5 M src=self OK v=2 stash=0"}));
  EXPECT_EQ(Msgs(Done(2, 4)), Strings({"Release>1 txn=4"}));
  EXPECT_EQ(Rec(), "M owner=2 holders=2@4 v=2 txn=4");
}

// ---------------------------------------------------------------------------
// Giving copies up.

TEST_F(PageDirectoryTest, EvictOfNonSoleSharedCopyRemovesTheNode) {
  Up({1, 2});
  Read(1);
  Read(2);
  ASSERT_EQ(Rec(), "S owner=1 holders=1@1,2@2 v=0 txn=2");
  EXPECT_EQ(Msgs(Acquire(1, AccessKind::kEvict, 9, 2)), Strings({"EvictReply>1 seq=9 OK"}));
  // No transaction; another sharer becomes supplier.
  EXPECT_EQ(Rec(), "S owner=2 holders=2@2 v=0 txn=2");
  ASSERT_EQ(last_dirty_.size(), 1u);
  EXPECT_EQ(Summary(&last_dirty_[0]), Rec());
  // Evicting what the node does not hold is already done.
  EXPECT_EQ(Msgs(Acquire(1, AccessKind::kEvict, 10, 2)), Strings({"EvictReply>1 seq=10 OK"}));
}

TEST_F(PageDirectoryTest, WritebackOfLastCopyMovesItToAnotherLiveNode) {
  Up({1, 2});
  Write(1);
  EXPECT_EQ(Unordered(Acquire(1, AccessKind::kWriteback, 9, 1)),
            AnyOrder({"Fetch>1 txn=2 req=2 next=I data=1",
                      "Grant>2 txn=2 seq=0 S src=owner OK v=1 stash=0"}));
  EXPECT_EQ(Rec(), "S owner=2 holders=2@2 v=1 txn=2 busy");
  EXPECT_EQ(Msgs(Done(2, 2)), Strings({"Release>1 txn=2"}));
  EXPECT_EQ(Rec(), "S owner=2 holders=2@2 v=1 txn=2");

  // A sole Shared copy moves the same way.
  EXPECT_EQ(Unordered(Acquire(2, AccessKind::kEvict, 4, 2)),
            AnyOrder({"Fetch>2 txn=3 req=1 next=I data=1",
                      "Grant>1 txn=3 seq=0 S src=owner OK v=1 stash=0"}));
  EXPECT_EQ(Rec(), "S owner=1 holders=1@3 v=1 txn=3 busy");
}

// Preferred-node advice: the last copy goes to the node the giver names,
// unless it is the giver itself or not a live member.
TEST_F(PageDirectoryTest, AGiveUpGoesToTheNodeItNames) {
  Up({1, 2, 3, 4});
  Write(1);
  EXPECT_EQ(Unordered(GiveUpTo(1, AccessKind::kWriteback, 9, 1, 3)),
            AnyOrder({"Fetch>1 txn=2 req=3 next=I data=1",
                      "Grant>3 txn=2 seq=0 S src=owner OK v=1 stash=0"}));
  EXPECT_EQ(Msgs(Done(3, 2)), Strings({"Release>1 txn=2"}));
  EXPECT_EQ(Rec(), "S owner=3 holders=3@2 v=1 txn=2");
  // Named a dead node, or itself: the directory picks, never the giver.
  Down(4);
  EXPECT_EQ(Unordered(GiveUpTo(3, AccessKind::kEvict, 4, 2, 4)).size(), 2u);
  std::string rec = Rec();
  EXPECT_TRUE(rec.rfind("S owner=1 ", 0) == 0 || rec.rfind("S owner=2 ", 0) == 0) << rec;
  const NodeId next = rec[8] - '0';
  EXPECT_EQ(Msgs(Done(next, 3)), Strings({"Release>3 txn=3"}));
  EXPECT_EQ(Unordered(GiveUpTo(next, AccessKind::kEvict, 5, 3, next)).size(), 2u);
  rec = Rec();
  EXPECT_EQ(rec.find("owner=" + std::to_string(next) + " "), std::string::npos) << rec;
}

TEST_F(PageDirectoryTest, WritebackWithNoOtherLiveNodeFails) {
  Up({1, 2});
  Write(1);
  Down(2);
  EXPECT_EQ(Msgs(Acquire(1, AccessKind::kWriteback, 9, 1)),
            Strings({"EvictReply>1 seq=9 FAILED_PRECONDITION"}));
  EXPECT_EQ(Rec(), "M owner=1 holders=1@1 v=1 txn=1");
  EXPECT_TRUE(last_dirty_.empty());
}

// ---------------------------------------------------------------------------
// Node death.

TEST_F(PageDirectoryTest, DeathOfSoleModifiedHolderLosesThePage) {
  Up({1, 2});
  Write(1);
  EXPECT_EQ(Msgs(Down(1)), Strings{});
  EXPECT_EQ(Rec(), "I owner=0 holders= v=1 txn=1 lost");
  EXPECT_EQ(dir_->stats().pages_lost, 1u);

  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kRead, 3, 0)),
            Strings({"Grant>2 txn=1 seq=3 I src=zero DATA_LOSS v=1 stash=0"}));
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kWrite, 4, 0)),
            Strings({"Grant>2 txn=1 seq=4 I src=zero DATA_LOSS v=1 stash=0"}));
  EXPECT_EQ(Rec(), "I owner=0 holders= v=1 txn=1 lost");
  EXPECT_EQ(dir_->Query(kPage).lost, 1);
}

TEST_F(PageDirectoryTest, DeathOfSharerRemovesItAndKeepsThePage) {
  Up({1, 2, 3});
  Write(1);
  Read(2);
  Read(3);
  EXPECT_EQ(Msgs(Down(1)), Strings{});
  EXPECT_EQ(Rec(), "S owner=2 holders=2@2,3@3 v=1 txn=3");
}

TEST_F(PageDirectoryTest, DeathOfRequesterMidMoveRestoresFormerOwnerFromStash) {
  Up({1, 2});
  Write(1);
  ASSERT_EQ(Unordered(Acquire(2, AccessKind::kWrite, 3, 0)),
            AnyOrder({"Fetch>1 txn=2 req=2 next=I data=1",
                      "Grant>2 txn=2 seq=3 M src=owner OK v=2 stash=0"}));

  // The stash holds version 1's bytes; node 2 may have sent its own, as
  // version 2, to a direct read before it died: the restore is version 3.
  EXPECT_EQ(Msgs(Down(2)), Strings({"Grant>1 txn=3 seq=0 M src=stash OK v=3 stash=2"}));
  EXPECT_EQ(Rec(), "M owner=1 holders=1@3 v=3 txn=3 busy");
  // The aborted move's requester can no longer finish anything.
  EXPECT_EQ(Msgs(Done(2, 2)), Strings{});
  // The restore moves no stash elsewhere: no Release.
  EXPECT_EQ(Msgs(Done(1, 3)), Strings{});
  EXPECT_EQ(Rec(), "M owner=1 holders=1@3 v=3 txn=3");
}

TEST_F(PageDirectoryTest, DeathOfAFirstWriterMidTxnBringsThePageBackToZeroUnderANewVersion) {
  Up({1, 2});
  ASSERT_EQ(Msgs(Acquire(1, AccessKind::kWrite, 1, 0)),
            Strings({"Grant>1 txn=1 seq=1 M src=zero OK v=1 stash=0"}));
  // Node 1 may have written, and sent its bytes as version 1 to a direct
  // read, before it died: the zeros it never handed on are version 2.
  EXPECT_EQ(Msgs(Down(1)), Strings{});
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kRead, 1, 0)),
            Strings({"Grant>2 txn=2 seq=1 S src=zero OK v=2 stash=0"}));
}

TEST_F(PageDirectoryTest, DeathOfSharerOwingAnAckReleasesTheGrant) {
  Up({1, 2, 3, 4});
  Write(1);
  Read(2);
  Read(3);
  ASSERT_EQ(Acquire(4, AccessKind::kWrite, 9, 0).size(), 3u);
  EXPECT_EQ(Msgs(Ack(2, 4)), Strings{});
  EXPECT_EQ(Msgs(Down(3)), Strings({"Grant>4 txn=4 seq=9 M src=owner OK v=2 stash=0"}));
  EXPECT_EQ(Rec(), "M owner=4 holders=4@4 v=2 txn=4 busy");
}

// A write whose only supplier dies after the write's Grant left waits for
// the writer as a read does: the data may have reached it, and its Done
// makes it the page's writer. Fails without: the page was lost at once,
// while the writer went on writing a copy nobody would see (found by the
// simulation's check that every copy a quiet cluster holds is one its
// directory knows of).
TEST_F(PageDirectoryTest, DeathOfTheOnlyWriteSupplierWaitsForTheWritersDone) {
  OnlySupplierDiesThenTheRequestersDoneEndsIt(AccessKind::kWrite);
}

// ...and its resend says the data never came: lost, and the writer told.
// Should the data come after all, its Done is answered with the loss again,
// so that it drops the copy (the node's side: NodeAgentTest).
TEST_F(PageDirectoryTest, DeathOfTheOnlyWriteSupplierLosesThePageWhenTheWriterAsksAgain) {
  Up({1, 2});
  Write(1);
  ASSERT_EQ(Acquire(2, AccessKind::kWrite, 3, 0).size(), 2u);
  ASSERT_EQ(Msgs(Down(1)), Strings{});
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kWrite, 3, 0)),
            Strings({"Grant>2 txn=2 seq=3 I src=zero DATA_LOSS v=2 stash=0"}));
  EXPECT_EQ(Rec(), "I owner=0 holders= v=2 txn=2 lost");
  EXPECT_EQ(dir_->busy_count(), 0u);
  EXPECT_EQ(Msgs(Done(2, 2)), Strings({"Grant>2 txn=2 seq=0 I src=zero DATA_LOSS v=2 stash=0"}));
  EXPECT_EQ(Msgs(Done(2, 1)), Strings{}) << "a Done of an older txn is only stale";
  ASSERT_TRUE(dir_->CheckInvariants().ok());
}

// A write from Shared whose supplier dies while a sharer's ack is still
// owed: the Grant has not left, so the writer cannot have installed
// anything, and its resend is only a resend (the Invalidate goes again),
// not word that the data never came. Once the ack is in, the Grant leaves
// and the writer's Done ends it. Fails without: the resend lost the page
// (review).
TEST_F(PageDirectoryTest, AWritersResendBeforeItsGrantLeftDoesNotSettleItsDeadSupplier) {
  WriteFromSharedWhoseSupplierDies();
  EXPECT_EQ(Msgs(Acquire(3, AccessKind::kWrite, 7, 0)), Strings({"Invalidate>2 txn=3 writer=3"}));
  EXPECT_EQ(dir_->Query(kPage).lost, 0);
  EXPECT_EQ(Msgs(Ack(2, 3)), Strings({"Grant>3 txn=3 seq=7 M src=owner OK v=1 stash=0"}));
  EXPECT_EQ(Msgs(Done(3, 3)), Strings{});
  EXPECT_EQ(Rec(), "M owner=3 holders=3@3 v=1 txn=3");
  ASSERT_TRUE(dir_->CheckInvariants().ok());
}

// A page lost while its txn was still invalidating sharers: they may hold
// copies of it (the directory cannot tell whether an ack owed is on its way,
// the copy dropped, or not), and are told the page is gone, so that none
// goes on serving it.
TEST_F(PageDirectoryTest, SharersAWriteHadYetToInvalidateAreToldOfItsLoss) {
  WriteFromSharedWhoseSupplierDies();
  // The writer dies too: its request is undone, and with the supplier gone
  // the page is lost; node 2 has not acked its Invalidate.
  EXPECT_EQ(Msgs(Down(3)), Strings({"Grant>2 txn=3 seq=0 I src=zero DATA_LOSS v=1 stash=0"}));
  EXPECT_EQ(dir_->Query(kPage).lost, 1);
  ASSERT_TRUE(dir_->CheckInvariants().ok());
}

// The notice is resent until the sharer acknowledges it (InvalidateAck of
// the txn the page was lost in), also by a directory restarted from its
// store meanwhile. Fails without: it was sent once, and a sharer that
// missed it went on reading a copy the cluster had disowned.
TEST_F(PageDirectoryTest, ALossNoticeIsResentUntilAcknowledged) {
  WriteFromSharedWhoseSupplierDies();
  const std::string notice = "Grant>2 txn=3 seq=0 I src=zero DATA_LOSS v=1 stash=0";
  ASSERT_EQ(Msgs(Down(3)), Strings({notice}));
  // A death is handled without a clock (NodeDown): its messages go again at
  // the next Tick, and from then on at every retransmit interval.
  EXPECT_EQ(Msgs(TickAt(now_ + 1)), Strings({notice}));
  EXPECT_EQ(Msgs(TickAt(now_ + kRetransmitMs - 1)), Strings{});
  EXPECT_EQ(Msgs(TickAt(now_ + 1)), Strings({notice})) << "dropped on the way: again";
  ASSERT_TRUE(dir_->CheckInvariants().ok());
  Restart();
  EXPECT_EQ(Msgs(TickAt(now_ + 1)), Strings({notice})) << "after a restart too";
  EXPECT_EQ(Msgs(Ack(2, 2)), Strings{}) << "an ack of another txn settles nothing";
  EXPECT_EQ(Msgs(TickAt(now_ + kRetransmitMs)), Strings({notice}));
  EXPECT_EQ(Msgs(Ack(2, 3)), Strings{});
  EXPECT_EQ(Msgs(TickAt(now_ + 10 * kRetransmitMs)), Strings{}) << "acknowledged: told for good";
  EXPECT_EQ(Rec(), "I owner=0 holders= v=1 txn=3 lost");
  ASSERT_TRUE(dir_->CheckInvariants().ok());
  Restart();
  EXPECT_EQ(Msgs(TickAt(now_ + 1)), Strings{});
}

// A node owed a loss notice that dies is owed nothing: its copy died with it.
TEST_F(PageDirectoryTest, ALossNoticeOwedToANodeThatDiesIsDropped) {
  WriteFromSharedWhoseSupplierDies();
  ASSERT_EQ(Msgs(Down(3)).size(), 1u);
  EXPECT_EQ(Msgs(Down(2)), Strings{});
  EXPECT_EQ(Msgs(TickAt(now_ + 10 * kRetransmitMs)), Strings{});
  ASSERT_TRUE(dir_->CheckInvariants().ok());
}

// The writer whose Done of the lost txn came after all is told too, until
// it acknowledges.
TEST_F(PageDirectoryTest, ALateDoneOfTheLostTxnIsToldUntilAcknowledged) {
  Up({1, 2});
  Write(1);
  ASSERT_EQ(Acquire(2, AccessKind::kWrite, 3, 0).size(), 2u);
  ASSERT_EQ(Msgs(Down(1)), Strings{});
  ASSERT_EQ(Msgs(Acquire(2, AccessKind::kWrite, 3, 0)).size(), 1u);  // lost: the data never came
  const std::string notice = "Grant>2 txn=2 seq=0 I src=zero DATA_LOSS v=2 stash=0";
  EXPECT_EQ(Msgs(Done(2, 2)), Strings({notice}));
  EXPECT_EQ(Msgs(Done(2, 2)), Strings({notice})) << "a duplicate Done: told again, listed once";
  EXPECT_EQ(dir_->NodesNamed(), std::set<NodeId>({2})) << "a node owed a notice is named";
  EXPECT_EQ(Msgs(TickAt(now_ + kRetransmitMs)), Strings({notice}));
  EXPECT_EQ(Msgs(Ack(2, 2)), Strings{});
  EXPECT_EQ(Msgs(TickAt(now_ + 10 * kRetransmitMs)), Strings{});
  ASSERT_TRUE(dir_->CheckInvariants().ok());
}

// A deleted region's lost pages owe no notices any more.
TEST_F(PageDirectoryTest, DroppingALostPageEndsItsNotices) {
  WriteFromSharedWhoseSupplierDies();
  ASSERT_EQ(Msgs(Down(3)).size(), 1u);
  ASSERT_EQ(dir_->telling_count(), 1u);
  dir_->DropRange(kPage, kPage + 4096);
  EXPECT_EQ(dir_->telling_count(), 0u);
  EXPECT_EQ(Msgs(TickAt(now_ + 10 * kRetransmitMs)), Strings{});
  ASSERT_TRUE(dir_->CheckInvariants().ok());
}

TEST_F(PageDirectoryTest, DeathOfReadSupplierFallsBackToAnotherSharer) {
  Up({1, 2, 3});
  Read(1);
  Read(2);
  ASSERT_EQ(Unordered(Acquire(3, AccessKind::kRead, 4, 0)),
            AnyOrder({"Fetch>1 txn=3 req=3 next=S data=1",
                      "Grant>3 txn=3 seq=4 S src=owner OK v=0 stash=0"}));
  // The Grant already sent stays good (it names no supplier): only the new
  // supplier is asked for the data of the same txn.
  EXPECT_EQ(Msgs(Down(1)), Strings({"Fetch>2 txn=3 req=3 next=S data=1"}));
  EXPECT_EQ(Rec(), "S owner=2 holders=2@2,3@3 v=0 txn=3 busy");
}

// The only supplier of a read dies after the read's Grant left: the data
// may have reached the reader before, and then the reader holds the only
// copy. The directory waits for its Done, which says so, and the page
// lives on there. Fails without: the page was lost at once, while the
// reader went on reading its copy (a CI run, stop 15).
TEST_F(PageDirectoryTest, DeathOfTheOnlyReadSupplierWaitsForTheReadersDone) {
  OnlySupplierDiesThenTheRequestersDoneEndsIt(AccessKind::kRead);
}

// ...and a resend of the reader's request says the data never came: the
// page is lost then, and the reader told so.
TEST_F(PageDirectoryTest, DeathOfTheOnlyReadSupplierLosesThePageWhenTheReaderAsksAgain) {
  Up({1, 2});
  ReadWhoseOnlySupplierDies(1, 2, 3);
  // A retransmission sends the Grant again, and asks no one for data.
  EXPECT_EQ(Msgs(TickAt(now_ + 1000)),
            Strings({"Grant>2 txn=2 seq=3 S src=owner OK v=1 stash=0"}));
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kRead, 3, 0)),
            Strings({"Grant>2 txn=2 seq=3 I src=zero DATA_LOSS v=1 stash=0"}));
  EXPECT_EQ(Rec(), "I owner=0 holders= v=1 txn=2 lost");
  EXPECT_EQ(dir_->busy_count(), 0u);
  // The reader dying instead loses it too: no copy is known anywhere.
  const PageAddr other = kPage + 0x1000;
  Up({3});
  ReadWhoseOnlySupplierDies(3, 2, 5, other);
  EXPECT_EQ(Msgs(Down(2)), Strings{});
  EXPECT_EQ(dir_->Query(other).lost, 1);
  ASSERT_TRUE(dir_->CheckInvariants().ok());
}

// ...and a new request of the reader says, by its last txn, that it
// installed the read (its Done was lost): an upgrade ends the read and is
// served. Found by the simulation: waiting for a Done that a node which
// had moved on to another request never sent, the page hung.
TEST_F(PageDirectoryTest, DeathOfTheOnlyReadSupplierIsSettledByTheReadersNextRequest) {
  Up({1, 2});
  ReadWhoseOnlySupplierDies(1, 2, 3);
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kUpgrade, 4, /*last_txn=*/2)),
            Strings({"Grant>2 txn=3 seq=4 M src=self OK v=2 stash=0"}));
  EXPECT_EQ(Rec(), "M owner=2 holders=2@3 v=2 txn=3 busy");
  EXPECT_EQ(dir_->stats().pages_lost, 0u);
  ASSERT_TRUE(dir_->CheckInvariants().ok());
}

// A give-up's move is not waited for when its giver dies: the target asked
// for nothing, and without the data it would never answer. Lost at once,
// as before (review: the page stayed busy, every other request queued).
TEST_F(PageDirectoryTest, DeathOfAGiverMidMoveLosesThePageAtOnce) {
  Up({1, 2, 3});
  Write(1);
  ASSERT_EQ(Unordered(GiveUpTo(1, AccessKind::kWriteback, 9, 1, 3)).size(), 2u);
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kRead, 4, 0)), Strings{}) << "queued behind the move";
  // The target is told too, until it acknowledges: the data may have come
  // before the death. The queued read is answered.
  EXPECT_EQ(Msgs(Down(1)), Strings({"Grant>3 txn=2 seq=0 I src=zero DATA_LOSS v=1 stash=0",
                                    "Grant>2 txn=2 seq=4 I src=zero DATA_LOSS v=1 stash=0"}));
  EXPECT_EQ(Rec(), "I owner=0 holders= v=1 txn=2 lost");
  EXPECT_EQ(dir_->busy_count(), 0u);
  EXPECT_EQ(dir_->telling_count(), 1u);
  EXPECT_EQ(Msgs(Ack(3, 2)), Strings{});
  EXPECT_EQ(dir_->telling_count(), 0u);
}

// PROTOCOL.md, Crashes: only pages a dead node held alone become lost. When
// the upgrading node is itself the supplier, another sharer keeps a stash
// (a no-data Fetch) so the upgrade can be undone if the requester dies.
TEST_F(PageDirectoryTest, DeathOfSupplierMidOwnUpgradeKeepsThePage) {
  Up({1, 2});
  Read(1);
  Read(2);
  ASSERT_EQ(Rec(), "S owner=1 holders=1@1,2@2 v=0 txn=2");
  ASSERT_EQ(Msgs(Acquire(1, AccessKind::kUpgrade, 5, 2)),
            Strings({"Fetch>2 txn=3 req=1 next=I data=0"}));
  const std::vector<std::string> restore = Msgs(Down(1));
  ASSERT_EQ(restore.size(), 1u);
  EXPECT_EQ(restore[0].rfind("Grant>2 txn=4", 0), 0u) << restore[0];
  EXPECT_NE(restore[0].find("src=stash"), std::string::npos) << restore[0];
  const PageRecord* r = dir_->Find(kPage);
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->lost, 0) << Rec();
  EXPECT_EQ(r->owner, 2u) << Rec();
}

// ---------------------------------------------------------------------------
// Persistence.

TEST_F(PageDirectoryTest, TakeDirtyReturnsEachChangedRecordOnce) {
  Up({1});
  Outbox out;
  dir_->HandleAcquire(proto::Acquire{kPage, 1, AccessKind::kWrite, 1, 0}, now_, &out);
  dir_->HandleAcquire(proto::Acquire{kPage + 4096, 1, AccessKind::kRead, 2, 0}, now_, &out);
  dir_->HandleDone(proto::Done{kPage, 1, 1}, now_, &out);
  std::vector<PageRecord> dirty;
  dir_->TakeDirty(&dirty);
  ASSERT_EQ(dirty.size(), 2u);
  std::sort(dirty.begin(), dirty.end(),
            [](const PageRecord& a, const PageRecord& b) { return a.page < b.page; });
  EXPECT_EQ(Summary(&dirty[0]), "M owner=1 holders=1@1 v=1 txn=1");  // the latest state
  EXPECT_EQ(Summary(&dirty[1]), "S owner=1 holders=1@1 v=0 txn=1 busy");
  dirty.clear();
  dir_->TakeDirty(&dirty);
  EXPECT_TRUE(dirty.empty());
}

// A page changed, dropped with its range and made again before the records
// are taken: one record, its newest; made again but not changed: none.
TEST_F(PageDirectoryTest, TakeDirtyAfterADropHasOnlyWhatChangedSince) {
  Up({1, 2});
  Outbox out;
  dir_->HandleAcquire(proto::Acquire{kPage, 1, AccessKind::kWrite, 1, 0}, now_, &out);
  dir_->HandleAcquire(proto::Acquire{kPage + 4096, 1, AccessKind::kWrite, 2, 0}, now_, &out);
  dir_->DropRange(kPage, kPage + 8192);  // both were changed, neither taken
  dir_->HandleAcquire(proto::Acquire{kPage, 2, AccessKind::kRead, 1, 0}, now_, &out);
  std::vector<PageRecord> dirty;
  dir_->TakeDirty(&dirty);
  ASSERT_EQ(dirty.size(), 1u);
  EXPECT_EQ(dirty[0].page, kPage);
  EXPECT_EQ(dirty[0].tx.requester, 2u) << "the record of before the drop was written";
  // Changed, dropped, then made again without a change (Restore, as at a
  // start): nothing to write.
  dir_->HandleAcquire(proto::Acquire{kPage + 4096, 1, AccessKind::kWrite, 3, 0}, now_, &out);
  dir_->DropRange(kPage + 4096, kPage + 8192);
  PageRecord again;
  again.page = kPage + 4096;
  dir_->Restore(again);
  dirty.clear();
  dir_->TakeDirty(&dirty);
  EXPECT_TRUE(dirty.empty());
}

// kill -9 at each point of a write that needs an invalidation: the restarted
// directory, loaded from the store alone, resends exactly what is still owed.
TEST_F(PageDirectoryTest, RestartFromStoreResendsTransactionInFlight) {
  Up({1, 2, 3});
  Write(1);
  Read(2);
  ASSERT_EQ(Unordered(Acquire(3, AccessKind::kWrite, 7, 0)),
            AnyOrder({"Fetch>1 txn=3 req=3 next=I data=1", "Invalidate>2 txn=3 writer=3"}));
  const std::string in_flight = "M owner=3 holders=3@3 v=2 txn=3 busy";

  Restart();
  EXPECT_EQ(Rec(), in_flight);
  EXPECT_EQ(Unordered(TickAt(now_ + 1)),
            AnyOrder({"Fetch>1 txn=3 req=3 next=I data=1", "Invalidate>2 txn=3 writer=3"}));
  EXPECT_EQ(Msgs(Ack(2, 3)), Strings({"Grant>3 txn=3 seq=7 M src=owner OK v=2 stash=0"}));

  Restart();
  EXPECT_EQ(Rec(), in_flight);
  EXPECT_EQ(Unordered(TickAt(now_ + 1)),
            AnyOrder({"Fetch>1 txn=3 req=3 next=I data=1",
                      "Grant>3 txn=3 seq=7 M src=owner OK v=2 stash=0"}));
  // The node's resend of its request is recognised after the restart too.
  EXPECT_EQ(Unordered(Acquire(3, AccessKind::kWrite, 7, 0)),
            AnyOrder({"Fetch>1 txn=3 req=3 next=I data=1",
                      "Grant>3 txn=3 seq=7 M src=owner OK v=2 stash=0"}));
  EXPECT_EQ(Msgs(Done(3, 3)), Strings({"Release>1 txn=3"}));

  Restart();
  EXPECT_EQ(Rec(), "M owner=3 holders=3@3 v=2 txn=3");
  EXPECT_EQ(Msgs(TickAt(now_ + 10 * kRetransmitMs)), Strings{});
  // Txn numbers continue from the store.
  EXPECT_EQ(Unordered(Acquire(1, AccessKind::kRead, 8, 3)),
            AnyOrder({"Fetch>3 txn=4 req=1 next=S data=1",
                      "Grant>1 txn=4 seq=8 S src=owner OK v=2 stash=0"}));
}

TEST_F(PageDirectoryTest, RestartAfterNodeDeathKeepsPageLost) {
  Up({1, 2});
  Write(1);
  Down(1);
  Restart();
  EXPECT_EQ(Rec(), "I owner=0 holders= v=1 txn=1 lost");
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kRead, 3, 0)),
            Strings({"Grant>2 txn=1 seq=3 I src=zero DATA_LOSS v=1 stash=0"}));
}

TEST_F(PageDirectoryTest, DropRangeForgetsPagesAndTheirTransactions) {
  Up({1, 2});
  const PageAddr a = 0x10000, b = 0x11000, c = 0x12000;
  Write(1, a);
  ASSERT_EQ(Acquire(1, AccessKind::kWrite, 1, 0, b).size(), 1u);  // left in flight
  Write(1, c);
  ASSERT_EQ(dir_->page_count(), 3u);
  ASSERT_EQ(dir_->busy_count(), 1u);

  DropRange(a, c);
  EXPECT_EQ(dir_->Find(a), nullptr);
  EXPECT_EQ(dir_->Find(b), nullptr);
  EXPECT_EQ(Rec(c), "M owner=1 holders=1@1 v=1 txn=1");
  EXPECT_EQ(dir_->page_count(), 1u);
  EXPECT_EQ(dir_->busy_count(), 0u);
  EXPECT_TRUE(last_dirty_.empty());

  // Late messages about a dropped page are ignored; nothing is resent.
  EXPECT_EQ(Msgs(Done(1, 1, b)), Strings{});
  EXPECT_EQ(Msgs(TickAt(now_ + 10 * kRetransmitMs)), Strings{});
  // A new region at the same address starts never written.
  EXPECT_EQ(Msgs(Acquire(2, AccessKind::kRead, 5, 0, a)),
            Strings({"Grant>2 @10000 txn=1 seq=5 S src=zero OK v=0 stash=0"}));

  Restart();  // the store lost the range too
  EXPECT_EQ(dir_->Find(b), nullptr);
  EXPECT_EQ(dir_->page_count(), 2u);
}

// ---------------------------------------------------------------------------
// Inspection.

TEST_F(PageDirectoryTest, QueryReflectsTheRecord) {
  Up({1, 2, 3});
  proto::PageQueryReply q = dir_->Query(kPage);
  EXPECT_EQ(q.page, kPage);
  EXPECT_EQ(q.state, PageState::kInvalid);
  EXPECT_EQ(q.owner, proto::kNoNode);
  EXPECT_EQ(q.version, 0u);
  EXPECT_EQ(q.txn, 0u);
  EXPECT_EQ(q.lost, 0);
  EXPECT_EQ(q.busy, 0);
  EXPECT_TRUE(q.sharers.empty());

  Write(1);
  Read(2);
  q = dir_->Query(kPage);
  EXPECT_EQ(q.state, PageState::kShared);
  EXPECT_EQ(q.owner, 1u);
  EXPECT_EQ(q.version, 1u);
  EXPECT_EQ(q.txn, 2u);
  EXPECT_EQ(q.busy, 0);
  EXPECT_EQ(q.sharers, std::vector<NodeId>({1, 2}));

  ASSERT_EQ(Acquire(3, AccessKind::kWrite, 1, 0).size(), 2u);
  q = dir_->Query(kPage);
  EXPECT_EQ(q.state, PageState::kModified);
  EXPECT_EQ(q.owner, 3u);
  EXPECT_EQ(q.version, 2u);
  EXPECT_EQ(q.txn, 3u);
  EXPECT_EQ(q.busy, 1);
  EXPECT_EQ(q.lost, 0);
  EXPECT_EQ(q.sharers, std::vector<NodeId>({3}));
}

TEST_F(PageDirectoryTest, CheckInvariantsCatchesMalformedRecords) {
  Up({1, 2});
  PageRecord ok;
  ok.page = kPage;
  ok.state = PageState::kModified;
  ok.owner = 1;
  ok.sharers = {Sharer{1, 1}};
  ok.txn = 1;
  ok.version = 1;
  dir_->Restore(ok);
  EXPECT_TRUE(dir_->CheckInvariants().ok());

  auto expect_bad = [&](PageRecord r, const char* why) {
    PageDirectory d(Options());
    d.NodeUp(1);
    d.NodeUp(2);
    d.Restore(r);
    const Status s = d.CheckInvariants();
    EXPECT_EQ(s.code(), StatusCode::kInternal) << why;
  };
  PageRecord r = ok;
  r.sharers = {Sharer{1, 1}, Sharer{2, 1}};
  expect_bad(r, "Modified with two holders");
  r = ok;
  r.sharers = {Sharer{3, 1}};
  r.owner = 3;
  expect_bad(r, "holder not live");
  r = ok;
  r.state = PageState::kShared;
  r.owner = 2;
  expect_bad(r, "supplier not a sharer");
  r = ok;
  r.lost = 1;
  expect_bad(r, "lost page with a holder");
  r = ok;
  r.state = PageState::kInvalid;
  expect_bad(r, "Invalid with a holder");
}

}  // namespace
}  // namespace dsvm::coordinator
