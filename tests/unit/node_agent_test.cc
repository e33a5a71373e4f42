// Unit tests for node::NodeAgent, the node side of the MSI protocol
// (proto/PROTOCOL.md: "Node state table", "Duplicates and staleness").
//
// The agent is driven one event at a time; each test compares the exact list
// of actions it asks for, as one-line descriptions naming every field that
// matters for the action kind. The last test wires a NodeAgent per node to a
// real PageDirectory to show what the kind recomputation on resend protects.
#include "node/coherence/node_agent.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "coordinator/directory/page_directory.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::node {
namespace {

using proto::DataSource;
using Strings = std::vector<std::string>;

constexpr NodeId kSelf = 1;
constexpr PageAddr kPage = 0x7000;  // omitted from descriptions
constexpr uint64_t kRetransmitMs = 200;
constexpr uint64_t kStart = 1000;

// ---------------------------------------------------------------------------
// Descriptions.

const char* KindName(AccessKind k) {
  switch (k) {
    case AccessKind::kRead: return "read";
    case AccessKind::kWrite: return "write";
    case AccessKind::kUpgrade: return "upgrade";
    case AccessKind::kEvict: return "evict";
    case AccessKind::kWriteback: return "writeback";
    case AccessKind::kInvalid: break;
  }
  return "invalid";
}

std::string At(PageAddr page) {
  if (page == kPage) return "";
  char buf[32];
  std::snprintf(buf, sizeof(buf), " @%llx", static_cast<unsigned long long>(page));
  return buf;
}

// A message to the directory, with " from=N" only when N is not the sender
// the caller names (every message must carry its sender's id).
std::string DescribeToDirectory(const proto::Message& message, NodeId self) {
  auto from = [&](NodeId n) { return n == self ? std::string() : " from=" + std::to_string(n); };
  return std::visit(
      [&](const auto& m) -> std::string {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, proto::Acquire>) {
          return "Acquire" + At(m.page) + " kind=" + KindName(m.kind) +
                 " seq=" + std::to_string(m.request_seq) + " last=" + std::to_string(m.last_txn) +
                 (m.target != proto::kNoNode ? " to=" + std::to_string(m.target) : "") +
                 from(m.node);
        } else if constexpr (std::is_same_v<T, proto::Done>) {
          return "Done" + At(m.page) + " txn=" + std::to_string(m.txn) + from(m.node);
        } else if constexpr (std::is_same_v<T, proto::InvalidateAck>) {
          return "InvalidateAck" + At(m.page) + " txn=" + std::to_string(m.txn) + from(m.node);
        } else {
          return std::string("unexpected ") + proto::TypeName(T::kType);
        }
      },
      message);
}

std::string Describe(const Action& a, NodeId self) {
  const std::string at = At(a.page);
  const std::string txn = " txn=" + std::to_string(a.txn);
  switch (a.kind) {
    case ActionKind::kSendToDirectory: {
      std::string s = DescribeToDirectory(a.message, self);
      // The action's page must be the message's page.
      return at.empty() ? s : s + " (action" + at + ")";
    }
    case ActionKind::kSendPage:
      return "SendPage>" + std::to_string(a.node) + at + txn + " v=" + std::to_string(a.version);
    case ActionKind::kSendStash:
      return "SendStash>" + std::to_string(a.node) + at + txn + " v=" + std::to_string(a.version);
    case ActionKind::kAskHolder: return "AskHolder" + at;
    case ActionKind::kMapRead: return "MapRead" + at;
    case ActionKind::kMapWrite: return "MapWrite" + at;
    case ActionKind::kUnmap: return "Unmap" + at;
    case ActionKind::kDiscard: return "Discard" + at;
    case ActionKind::kStash: return "Stash" + at + txn;
    case ActionKind::kInstallZero: return "InstallZero" + at;
    case ActionKind::kInstallData: return "InstallData" + at + " h=" + std::to_string(a.handle);
    case ActionKind::kInstallStash: return "InstallStash" + at + txn;
    case ActionKind::kDropStash: return "DropStash" + at + txn;
    case ActionKind::kDropData: return "DropData" + at + " h=" + std::to_string(a.handle);
    case ActionKind::kWake: {
      std::string s = "Wake" + at + " w=" + std::to_string(a.waiter);
      if (a.status != StatusCode::kOk) s += " " + std::string(StatusCodeName(a.status));
      return s;
    }
    case ActionKind::kProtocolError: return "ProtocolError" + at;
    case ActionKind::kInvalid: break;
  }
  return "invalid action";
}

Strings Describe(const Actions& actions, NodeId self = kSelf) {
  Strings s;
  for (const Action& a : actions) s.push_back(Describe(a, self));
  return s;
}

proto::Grant MakeGrant(TxnId txn, uint64_t seq, PageState state, DataSource source,
                       uint64_t version, TxnId stash_txn = 0) {
  proto::Grant g;
  g.page = kPage;
  g.txn = txn;
  g.request_seq = seq;
  g.state = state;
  g.source = source;
  g.version = version;
  g.stash_txn = stash_txn;
  return g;
}

// ---------------------------------------------------------------------------
// Fixture: one agent, node kSelf, page kPage.

class NodeAgentTest : public ::testing::Test {
 protected:
  Strings Fault(bool write, WaiterId waiter, FaultResult expect) {
    Actions out;
    EXPECT_EQ(agent_.Fault(kPage, write, waiter, now_, &out), expect) << "waiter " << waiter;
    return Describe(out);
  }
  // A read fault that may ask a holder (direct reads).
  Strings FaultAsking(bool write, WaiterId waiter, FaultResult expect) {
    Actions out;
    EXPECT_EQ(agent_.Fault(kPage, write, waiter, now_, &out, /*ask_holder=*/true), expect)
        << "waiter " << waiter;
    return Describe(out);
  }
  Strings ReadDirect(NodeId from, bool expect_served) {
    Actions out;
    EXPECT_EQ(agent_.HandleReadDirect(proto::ReadDirect{kPage, from, 1}, now_, &out),
              expect_served);
    return Describe(out);
  }
  Strings Grant(const proto::Grant& g) {
    Actions out;
    agent_.HandleGrant(g, now_, &out);
    return Describe(out);
  }
  Strings Data(TxnId txn, uint64_t version, DataHandle handle, NodeId sender = 2) {
    Actions out;
    agent_.HandlePageData(proto::PageData{kPage, txn, sender, version, {}}, handle, now_, &out);
    return Describe(out);
  }
  Strings Fetch(TxnId txn, NodeId requester, PageState next, uint8_t send_data) {
    Actions out;
    agent_.HandleFetch(proto::Fetch{kPage, txn, requester, next, send_data}, now_, &out);
    return Describe(out);
  }
  Strings Invalidate(TxnId txn) {
    Actions out;
    agent_.HandleInvalidate(proto::Invalidate{kPage, txn}, now_, &out);
    return Describe(out);
  }
  Strings Release(TxnId txn) {
    Actions out;
    agent_.HandleRelease(proto::Release{kPage, txn}, &out);
    return Describe(out);
  }
  Strings EvictReply(uint64_t seq, StatusCode code) {
    Actions out;
    agent_.HandleEvictReply(proto::EvictReply{kPage, seq, static_cast<uint16_t>(code), 0}, now_,
                            &out);
    return Describe(out);
  }
  Strings Evict(bool expect) {
    Actions out;
    EXPECT_EQ(agent_.Evict(kPage, now_, &out), expect);
    return Describe(out);
  }
  Strings TickAt(uint64_t now) {
    now_ = now;
    Actions out;
    agent_.Tick(now, &out);
    return Describe(out);
  }

  // Brings the page to `state` at `txn` through a fault and a zero-fill
  // grant; the fault's request_seq is 1 (the agent's first request).
  void Hold(PageState state, TxnId txn, uint64_t version) {
    const bool write = state == PageState::kModified;
    ASSERT_EQ(Fault(write, 900, FaultResult::kWait),
              Strings({std::string("Acquire kind=") + (write ? "write" : "read") +
                       " seq=1 last=0"}));
    ASSERT_EQ(Grant(MakeGrant(txn, 1, state, DataSource::kZero, version)),
              Strings({"InstallZero", write ? "MapWrite" : "MapRead",
                       "Done txn=" + std::to_string(txn), "Wake w=900"}));
    ASSERT_EQ(agent_.StateOf(kPage), state);
    ASSERT_FALSE(agent_.HasPending(kPage));
  }

  NodeAgent agent_{kSelf, NodeOptions{kRetransmitMs}};
  uint64_t now_ = kStart;
};

// ---------------------------------------------------------------------------
// Faults.

TEST_F(NodeAgentTest, FaultOnHeldPageIsHit) {
  Hold(PageState::kShared, 3, 0);
  EXPECT_EQ(Fault(false, 1, FaultResult::kHit), Strings{});
  EXPECT_EQ(agent_.stats().hits, 1u);
  // Shared does not satisfy a write: that needs an upgrade.
  EXPECT_EQ(Fault(true, 2, FaultResult::kWait), Strings({"Acquire kind=upgrade seq=2 last=3"}));
  EXPECT_EQ(agent_.stats().hits, 1u);
}

TEST_F(NodeAgentTest, WaitersOnMissingPageShareOneAcquireAndAllWake) {
  EXPECT_EQ(Fault(true, 1, FaultResult::kWait), Strings({"Acquire kind=write seq=1 last=0"}));
  EXPECT_EQ(Fault(false, 2, FaultResult::kWait), Strings{});
  EXPECT_EQ(Fault(false, 3, FaultResult::kWait), Strings{});
  EXPECT_EQ(Fault(true, 4, FaultResult::kWait), Strings{});
  EXPECT_TRUE(agent_.HasPending(kPage));
  EXPECT_EQ(agent_.stats().requests, 1u);

  EXPECT_EQ(Grant(MakeGrant(3, 1, PageState::kModified, DataSource::kZero, 1)),
            Strings({"InstallZero", "MapWrite", "Done txn=3", "Wake w=1", "Wake w=2", "Wake w=3",
                     "Wake w=4"}));
  EXPECT_FALSE(agent_.HasPending(kPage));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kModified);
  EXPECT_EQ(agent_.VersionOf(kPage), 1u);
}

TEST_F(NodeAgentTest, SharedGrantWakesReadersThenAsksToUpgradeForWriters) {
  EXPECT_EQ(Fault(false, 1, FaultResult::kWait), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(Fault(true, 2, FaultResult::kWait), Strings{});
  EXPECT_EQ(Grant(MakeGrant(1, 1, PageState::kShared, DataSource::kZero, 0)),
            Strings({"InstallZero", "MapRead", "Done txn=1", "Wake w=1",
                     "Acquire kind=upgrade seq=2 last=1"}));
  // The upgrade's data is the node's own copy.
  EXPECT_EQ(Grant(MakeGrant(2, 2, PageState::kModified, DataSource::kSelf, 1)),
            Strings({"MapWrite", "Done txn=2", "Wake w=2"}));
  EXPECT_FALSE(agent_.HasPending(kPage));
}

TEST_F(NodeAgentTest, LostPageWakesWaitersWithDataLoss) {
  EXPECT_EQ(Fault(false, 1, FaultResult::kWait), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(Fault(false, 2, FaultResult::kWait), Strings{});
  proto::Grant g = MakeGrant(4, 1, PageState::kInvalid, DataSource::kZero, 1);
  g.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  // Every loss notice is acknowledged, one that answers a request too (the
  // directory tells a requester whose Grant had gone until it answers).
  EXPECT_EQ(Grant(g), Strings({"Wake w=1 DATA_LOSS", "Wake w=2 DATA_LOSS", "InvalidateAck txn=4"}));
  EXPECT_FALSE(agent_.HasPending(kPage));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(Grant(g), Strings({"InvalidateAck txn=4"}));  // a duplicate answers nothing outstanding
}

// ---------------------------------------------------------------------------
// Grants and data.

TEST_F(NodeAgentTest, GrantFromOwnerWaitsForPageDataGrantFirst) {
  EXPECT_EQ(Fault(false, 1, FaultResult::kWait), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(Grant(MakeGrant(5, 1, PageState::kShared, DataSource::kOwner, 3)), Strings{});
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_TRUE(agent_.HasPending(kPage));

  EXPECT_EQ(Data(5, 3, 77), Strings({"InstallData h=77", "MapRead", "Done txn=5", "Wake w=1"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kShared);
  EXPECT_EQ(agent_.VersionOf(kPage), 3u);
  EXPECT_EQ(agent_.stats().pages_received, 1u);

  // Duplicate and older data are freed unused.
  EXPECT_EQ(Data(5, 3, 78), Strings({"DropData h=78"}));
  EXPECT_EQ(Data(4, 2, 79), Strings({"DropData h=79"}));
  // A duplicate Grant is re-answered with Done, nothing reinstalled.
  EXPECT_EQ(Grant(MakeGrant(5, 1, PageState::kShared, DataSource::kOwner, 3)),
            Strings({"Done txn=5"}));
  EXPECT_EQ(Grant(MakeGrant(4, 1, PageState::kShared, DataSource::kOwner, 3)), Strings{});
}

TEST_F(NodeAgentTest, DataNoGrantClaimsIsDroppedAfterTheLongestResendInterval) {
  // A move's target gets its data before its grant; a restarted node, data
  // sent to its former process, which no grant will ever claim.
  EXPECT_EQ(Data(5, 1, 70), Strings{});
  EXPECT_EQ(TickAt(kStart + 16 * kRetransmitMs - 1), Strings{});
  EXPECT_EQ(TickAt(kStart + 16 * kRetransmitMs), Strings({"DropData h=70"}));
  // A grant that comes after all waits for the data the directory resends.
  EXPECT_EQ(Grant(MakeGrant(5, 0, PageState::kShared, DataSource::kOwner, 1)), Strings{});
  EXPECT_EQ(Data(5, 1, 71), Strings({"InstallData h=71", "MapRead", "Done txn=5"}));
}

TEST_F(NodeAgentTest, GrantFromOwnerWaitsForPageDataDataFirst) {
  EXPECT_EQ(Fault(true, 1, FaultResult::kWait), Strings({"Acquire kind=write seq=1 last=0"}));
  EXPECT_EQ(Data(5, 4, 77), Strings{});
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(Grant(MakeGrant(5, 1, PageState::kModified, DataSource::kOwner, 4)),
            Strings({"InstallData h=77", "MapWrite", "Done txn=5", "Wake w=1"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kModified);
  EXPECT_EQ(agent_.VersionOf(kPage), 4u);
}

TEST_F(NodeAgentTest, PageDataOfAnotherTxnIsNotInstalled) {
  EXPECT_EQ(Fault(false, 1, FaultResult::kWait), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(Grant(MakeGrant(6, 1, PageState::kShared, DataSource::kOwner, 2)), Strings{});
  EXPECT_EQ(Data(5, 1, 50), Strings{});  // not the grant's txn: kept, not installed
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(Data(6, 2, 60),
            Strings({"DropData h=50", "InstallData h=60", "MapRead", "Done txn=6", "Wake w=1"}));
  EXPECT_EQ(agent_.VersionOf(kPage), 2u);
}

TEST_F(NodeAgentTest, GrantDoesNotInstallEarlierPageDataOfAnotherTxn) {
  EXPECT_EQ(Fault(false, 1, FaultResult::kWait), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(Data(5, 1, 50), Strings{});
  EXPECT_EQ(Grant(MakeGrant(6, 1, PageState::kShared, DataSource::kOwner, 2)), Strings{});
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(Data(6, 2, 60),
            Strings({"DropData h=50", "InstallData h=60", "MapRead", "Done txn=6", "Wake w=1"}));
}

// PageDirectory sends this sequence when the data source of a move dies
// and the requester's resend says the data has not come: Grant(M, owner, t),
// then Grant(t, DATA_LOSS) for the same request (page_directory_test:
// DeathOfTheOnlyWriteSupplierLosesThePageWhenTheWriterAsksAgain).
TEST_F(NodeAgentTest, LateDataForRefusedGrantIsNotInstalled) {
  EXPECT_EQ(Fault(true, 1, FaultResult::kWait), Strings({"Acquire kind=write seq=1 last=0"}));
  EXPECT_EQ(Grant(MakeGrant(2, 1, PageState::kModified, DataSource::kOwner, 2)), Strings{});
  proto::Grant lost = MakeGrant(2, 1, PageState::kInvalid, DataSource::kZero, 2);
  lost.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  EXPECT_EQ(Grant(lost), Strings({"Wake w=1 DATA_LOSS", "InvalidateAck txn=2"}));
  EXPECT_EQ(Data(2, 2, 5), Strings({"DropData h=5"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
}

// The same loss when the data came after the resend had left: the node
// installed the txn the directory then held lost. Told so (the refusal of
// its resend, or the answer to its Done), it drops the copy: nobody else may
// ever have the page, and writes here would be seen by no one. Fails
// without: the node went on serving a page the cluster calls lost (the
// simulation's quiet-cluster check).
TEST_F(NodeAgentTest, ACopyOfTheTxnThePageWasLostInIsDropped) {
  EXPECT_EQ(Fault(true, 1, FaultResult::kWait), Strings({"Acquire kind=write seq=1 last=0"}));
  EXPECT_EQ(Grant(MakeGrant(2, 1, PageState::kModified, DataSource::kOwner, 2)), Strings{});
  EXPECT_EQ(Data(2, 2, 5), Strings({"InstallData h=5", "MapWrite", "Done txn=2", "Wake w=1"}));
  proto::Grant lost = MakeGrant(2, 1, PageState::kInvalid, DataSource::kZero, 2);
  lost.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  EXPECT_EQ(Grant(lost), Strings({"Discard", "InvalidateAck txn=2"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(agent_.stats().disowned_copies, 1u);
  EXPECT_EQ(Grant(lost), Strings({"InvalidateAck txn=2"})) << "nothing left to drop";
  // The next access asks the directory, which says the page is lost.
  EXPECT_EQ(Fault(false, 2, FaultResult::kWait), Strings({"Acquire kind=read seq=2 last=2"}));
}

// A copy older than the lost txn (a sharer the lost write had yet to
// invalidate) goes too; one newer than the refusal's txn stays: that refusal
// is of an older request.
TEST_F(NodeAgentTest, ALossOfANewerTxnDropsAnOlderCopyButNotTheReverse) {
  Hold(PageState::kShared, 3, 0);
  proto::Grant old_loss = MakeGrant(2, 0, PageState::kInvalid, DataSource::kZero, 0);
  old_loss.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  // Unsolicited notices (request_seq 0) are acknowledged, or the
  // directory tells the node again.
  EXPECT_EQ(Grant(old_loss), Strings({"InvalidateAck txn=2"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kShared);
  proto::Grant loss = MakeGrant(4, 0, PageState::kInvalid, DataSource::kZero, 1);
  loss.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  EXPECT_EQ(Grant(loss), Strings({"Discard", "InvalidateAck txn=4"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(Grant(loss), Strings({"InvalidateAck txn=4"})) << "a resent notice: acknowledged again";
}

// A refusal of a page this node never touched (the daemon passes it on
// even for a page of no open region): a loss notice is acknowledged, or
// the directory would tell the node again and again; nothing else happens.
TEST_F(NodeAgentTest, ARefusalOfAnUntouchedPageIsOnlyAnswered) {
  proto::Grant loss = MakeGrant(5, 0, PageState::kInvalid, DataSource::kZero, 1);
  loss.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  EXPECT_EQ(Grant(loss), Strings({"InvalidateAck txn=5"}));
  proto::Grant gone = loss;
  gone.status = static_cast<uint16_t>(StatusCode::kNotFound);
  EXPECT_EQ(Grant(gone), Strings{});
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_FALSE(agent_.HasPending(kPage));
}

// A refusal other than a loss (NOT_FOUND: the region is gone) is no
// loss: it takes no copy away.
TEST_F(NodeAgentTest, OnlyALossDisownsACopy) {
  Hold(PageState::kShared, 3, 0);
  proto::Grant gone = MakeGrant(3, 0, PageState::kInvalid, DataSource::kZero, 0);
  gone.status = static_cast<uint16_t>(StatusCode::kNotFound);
  EXPECT_FALSE(agent_.Disowns(gone));
  EXPECT_EQ(Grant(gone), Strings{});
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kShared);
}

// A loss that drops a copy while a give-up of it was pending: an access
// that arrived meanwhile waited on the give-up, which is moot now, so it
// asks the directory itself. Fails without: it waited for ever (review).
TEST_F(NodeAgentTest, AnAccessWaitingOnADisownedGiveUpAsksAgain) {
  Hold(PageState::kShared, 3, 0);
  ASSERT_EQ(Evict(true), Strings({"Unmap", "Acquire kind=evict seq=2 last=3"}));
  EXPECT_EQ(Fault(false, 5, FaultResult::kWait), Strings{});
  proto::Grant loss = MakeGrant(4, 0, PageState::kInvalid, DataSource::kZero, 1);
  loss.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  EXPECT_EQ(Grant(loss), Strings({"Discard", "Acquire kind=read seq=3 last=3", "InvalidateAck txn=4"}));
  loss.request_seq = 3;
  EXPECT_EQ(Grant(loss), Strings({"Wake w=5 DATA_LOSS", "InvalidateAck txn=4"}));
  EXPECT_FALSE(agent_.HasPending(kPage));
}

// A grant of a request the node no longer has pending (the directory had
// queued it; a restore satisfied it meanwhile) whose data does not come:
// after the retransmit interval the node asks about it with that grant's
// request_seq and its own last txn, and a loss in answer voids it, so late
// bytes are not installed. Fails without: nobody ever asked again, and the
// page stayed busy at the directory for ever (review, with the simulator).
TEST_F(NodeAgentTest, AGrantNoRequestWaitsForIsAskedAboutWhenItsDataDoesNotCome) {
  Hold(PageState::kModified, 3, 1);
  // A Fetch takes the page away (a write elsewhere), then a Grant for this
  // node's old request seq 1 comes: a write, its data from the new owner.
  ASSERT_EQ(Fetch(4, 2, PageState::kInvalid, 1), Strings({"Stash txn=4", "SendStash>2 txn=4 v=1"}));
  EXPECT_EQ(Grant(MakeGrant(6, 1, PageState::kModified, DataSource::kOwner, 3)), Strings{});
  EXPECT_FALSE(agent_.HasPending(kPage));
  EXPECT_EQ(TickAt(now_ + kRetransmitMs - 1), Strings{}) << "not before the interval";
  EXPECT_EQ(TickAt(now_ + 1), Strings({"Acquire kind=write seq=1 last=4"}));
  EXPECT_EQ(TickAt(now_ + kRetransmitMs), Strings{}) << "the wait doubles";
  EXPECT_EQ(TickAt(now_ + kRetransmitMs), Strings({"Acquire kind=write seq=1 last=4"}));
  EXPECT_EQ(agent_.stats().grant_probes, 2u);
  proto::Grant loss = MakeGrant(6, 1, PageState::kInvalid, DataSource::kZero, 3);
  loss.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  EXPECT_EQ(Grant(loss), Strings({"InvalidateAck txn=6"}));
  EXPECT_EQ(Data(6, 3, 9), Strings({"DropData h=9"})) << "late bytes of the lost txn";
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(TickAt(now_ + 10 * kRetransmitMs), Strings{}) << "nothing left to ask about";
}

// The same grant, its data still to come, when the page's region goes
// (ForgetRange): the timer forgets it too. Fails without: Tick looked the
// page up among the pages kept, found none and threw (std::out_of_range),
// which would end the daemon.
TEST_F(NodeAgentTest, AForgottenPageIsNotAskedAboutAfterwards) {
  Hold(PageState::kModified, 3, 1);
  ASSERT_EQ(Fetch(4, 2, PageState::kInvalid, 1), Strings({"Stash txn=4", "SendStash>2 txn=4 v=1"}));
  ASSERT_EQ(Grant(MakeGrant(6, 1, PageState::kModified, DataSource::kOwner, 3)), Strings{});
  EXPECT_TRUE(agent_.ForgetRange(kPage, kPage + 4096).empty());
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(TickAt(now_ + 10 * kRetransmitMs), Strings{});
  EXPECT_EQ(agent_.stats().grant_probes, 0u);
}

// ---------------------------------------------------------------------------
// Fetch, stash, Release.

TEST_F(NodeAgentTest, FetchToInvalidStashesThenSendsFromTheStash) {
  Hold(PageState::kModified, 1, 1);
  EXPECT_EQ(Fetch(2, 2, PageState::kInvalid, 1), Strings({"Stash txn=2", "SendStash>2 txn=2 v=1"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(agent_.stash_count(), 1u);

  // The data may have been lost: resend it from the stash.
  EXPECT_EQ(Fetch(2, 2, PageState::kInvalid, 1), Strings({"SendStash>2 txn=2 v=1"}));
  EXPECT_EQ(Fetch(1, 2, PageState::kInvalid, 1), Strings{});  // stale

  EXPECT_EQ(Release(1), Strings{});  // not this stash's txn
  EXPECT_EQ(Release(2), Strings({"DropStash txn=2"}));
  EXPECT_EQ(agent_.stash_count(), 0u);
  EXPECT_EQ(Release(2), Strings{});
  // With neither copy nor stash, a late duplicate Fetch cannot be answered.
  EXPECT_EQ(Fetch(2, 2, PageState::kInvalid, 1), Strings{});
}

TEST_F(NodeAgentTest, MessageOfNewerTxnFreesTheStash) {
  Hold(PageState::kModified, 1, 1);
  EXPECT_EQ(Fetch(2, 2, PageState::kInvalid, 1), Strings({"Stash txn=2", "SendStash>2 txn=2 v=1"}));
  // The Release was lost, but txn 3 exists, so the move of txn 2 completed.
  EXPECT_EQ(Invalidate(3), Strings({"DropStash txn=2", "InvalidateAck txn=3"}));
  EXPECT_EQ(agent_.stash_count(), 0u);
}

TEST_F(NodeAgentTest, FetchToSharedWriteProtectsThenSendsThePage) {
  Hold(PageState::kModified, 1, 1);
  EXPECT_EQ(Fetch(2, 3, PageState::kShared, 1), Strings({"MapRead", "SendPage>3 txn=2 v=1"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kShared);
  EXPECT_EQ(agent_.stash_count(), 0u);
  EXPECT_EQ(Fetch(2, 3, PageState::kShared, 1), Strings({"SendPage>3 txn=2 v=1"}));
}

TEST_F(NodeAgentTest, NoDataFetchStashesAndAcks) {
  Hold(PageState::kShared, 1, 0);
  EXPECT_EQ(Fetch(2, 3, PageState::kInvalid, 0), Strings({"Stash txn=2", "InvalidateAck txn=2"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(Fetch(2, 3, PageState::kInvalid, 0), Strings({"InvalidateAck txn=2"}));
}

TEST_F(NodeAgentTest, RestoreGrantInstallsFromStash) {
  Hold(PageState::kModified, 1, 1);
  EXPECT_EQ(Fetch(2, 2, PageState::kInvalid, 1), Strings({"Stash txn=2", "SendStash>2 txn=2 v=1"}));
  // The requester died; the directory gives the page back (PROTOCOL.md, Node).
  EXPECT_EQ(Grant(MakeGrant(3, 0, PageState::kModified, DataSource::kStash, 2, 2)),
            Strings({"InstallStash txn=2", "MapWrite", "Done txn=3"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kModified);
  EXPECT_EQ(agent_.stash_count(), 0u);
}

// ---------------------------------------------------------------------------
// Invalidate.

TEST_F(NodeAgentTest, StaleInvalidateIsIgnoredDuplicateIsReacked) {
  Hold(PageState::kShared, 3, 0);
  EXPECT_EQ(Invalidate(2), Strings{});
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kShared);

  EXPECT_EQ(Invalidate(4), Strings({"Discard", "InvalidateAck txn=4"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(Invalidate(4), Strings({"InvalidateAck txn=4"}));
  EXPECT_EQ(Invalidate(3), Strings{});
  EXPECT_EQ(agent_.stats().invalidations, 1u);
}

// ---------------------------------------------------------------------------
// Eviction.

TEST_F(NodeAgentTest, EvictOfSharedCopyDiscardsOnOk) {
  Hold(PageState::kShared, 1, 0);
  EXPECT_EQ(Evict(true), Strings({"Unmap", "Acquire kind=evict seq=2 last=1"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_TRUE(agent_.HasPending(kPage));
  EXPECT_EQ(Evict(false), Strings{});  // a request is outstanding

  EXPECT_EQ(EvictReply(1, StatusCode::kOk), Strings{});  // not this request
  EXPECT_EQ(EvictReply(2, StatusCode::kOk), Strings({"Discard"}));
  EXPECT_FALSE(agent_.HasPending(kPage));
  EXPECT_EQ(EvictReply(2, StatusCode::kOk), Strings{});
  EXPECT_EQ(Evict(false), Strings{});  // nothing held
}

// A give-up names the node the caller wants the last copy to go to (its
// preferred-node advice), on the first send and on every resend; other
// requests never name one.
TEST_F(NodeAgentTest, AccessiblePagesAreTheValidOnes) {
  EXPECT_TRUE(agent_.AccessiblePages().empty());
  Hold(PageState::kShared, 1, 0);
  Actions out;
  ASSERT_EQ(agent_.Fault(kPage + 4096, false, 1, now_, &out), FaultResult::kWait);
  EXPECT_EQ(agent_.AccessiblePages(), std::vector<PageAddr>{kPage})
      << "a page asked for is not valid yet";
  EXPECT_EQ(Evict(true), Strings({"Unmap", "Acquire kind=evict seq=3 last=1"}));
  EXPECT_TRUE(agent_.AccessiblePages().empty()) << "a page being given up is not accessible";
}

TEST_F(NodeAgentTest, AnEvictCarriesItsTargetOnEverySend) {
  Hold(PageState::kModified, 1, 0);
  Actions out;
  EXPECT_TRUE(agent_.Evict(kPage, now_, &out, 7));
  EXPECT_EQ(Describe(out), Strings({"Unmap", "Acquire kind=writeback seq=2 last=1 to=7"}));
  EXPECT_EQ(TickAt(now_ + kRetransmitMs), Strings({"Acquire kind=writeback seq=2 last=1 to=7"}));
  EXPECT_EQ(EvictReply(2, StatusCode::kOk), Strings({"Discard"}));
  EXPECT_EQ(Fault(false, 1, FaultResult::kWait), Strings({"Acquire kind=read seq=3 last=1"}));
}

// Regression (found by dsvm-sim seed 1303): a dead supplier's replacement
// Fetch, sent while this node was still a sharer, arrives after the node's
// eviction was answered. The EvictReply's txn makes that Fetch stale; before,
// the node took it for new and reported a protocol error.
TEST_F(NodeAgentTest, FetchOvertakenByEvictReplyIsStale) {
  Hold(PageState::kShared, 1, 0);
  EXPECT_EQ(Evict(true), Strings({"Unmap", "Acquire kind=evict seq=2 last=1"}));
  Actions out;
  agent_.HandleEvictReply(proto::EvictReply{kPage, 2, 0, /*txn=*/13}, now_, &out);
  EXPECT_EQ(Describe(out), Strings({"Discard"}));
  EXPECT_EQ(Fetch(13, 3, PageState::kShared, 1), Strings{});
  EXPECT_EQ(agent_.stats().protocol_errors, 0u);
}

TEST_F(NodeAgentTest, RefusedWritebackMapsThePageAgain) {
  Hold(PageState::kModified, 1, 1);
  EXPECT_EQ(Evict(true), Strings({"Unmap", "Acquire kind=writeback seq=2 last=1"}));
  // A local access meanwhile waits; no second request goes out.
  EXPECT_EQ(Fault(true, 5, FaultResult::kWait), Strings{});
  EXPECT_EQ(EvictReply(2, StatusCode::kFailedPrecondition), Strings({"MapWrite", "Wake w=5"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kModified);
  EXPECT_FALSE(agent_.HasPending(kPage));
  EXPECT_EQ(Fault(true, 6, FaultResult::kHit), Strings{});
}

TEST_F(NodeAgentTest, WritebackCompletedByFetchStashesAndClearsRequest) {
  Hold(PageState::kModified, 1, 1);
  EXPECT_EQ(Evict(true), Strings({"Unmap", "Acquire kind=writeback seq=2 last=1"}));
  // The directory moves the copy to node 3 instead of answering EvictReply.
  EXPECT_EQ(Fetch(2, 3, PageState::kInvalid, 1), Strings({"Stash txn=2", "SendStash>3 txn=2 v=1"}));
  EXPECT_FALSE(agent_.HasPending(kPage));
  EXPECT_EQ(TickAt(kStart + 10 * kRetransmitMs), Strings{});
}

// ---------------------------------------------------------------------------
// Resends: the kind names what the node holds now.

TEST_F(NodeAgentTest, TickResendsAfterRetransmitInterval) {
  EXPECT_EQ(Fault(false, 1, FaultResult::kWait), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(TickAt(kStart + kRetransmitMs - 1), Strings{});
  EXPECT_EQ(TickAt(kStart + kRetransmitMs), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(TickAt(kStart + 2 * kRetransmitMs - 1), Strings{});
  Actions out;
  agent_.ResendAll(now_, &out);
  EXPECT_EQ(Describe(out), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(agent_.stats().retransmits, 2u);
}

// Each resend of one request doubles the wait for the next, up to 16 times
// the interval; a new request, or a reconnect, starts again at once.
TEST_F(NodeAgentTest, ResendsOfOneRequestBackOff) {
  EXPECT_EQ(Fault(false, 1, FaultResult::kWait), Strings({"Acquire kind=read seq=1 last=0"}));
  uint64_t at = kStart;
  for (uint64_t factor : {1, 2, 4, 8, 16, 16, 16}) {
    at += factor * kRetransmitMs;
    EXPECT_EQ(TickAt(at - 1), Strings{}) << "factor " << factor;
    EXPECT_EQ(TickAt(at), Strings({"Acquire kind=read seq=1 last=0"})) << "factor " << factor;
  }
  Actions out;
  agent_.ResendAll(at + 1, &out);
  EXPECT_EQ(Describe(out), Strings({"Acquire kind=read seq=1 last=0"}));
  EXPECT_EQ(TickAt(at + 1 + kRetransmitMs), Strings({"Acquire kind=read seq=1 last=0"}))
      << "after a reconnect the interval is the base one again";
}

// Regression: a node that asked to write holding nothing, then got a Shared
// copy pushed to it (another node's writeback), resent kWrite. The directory
// reads kWrite from a holder that has seen its role as "lost my copy" and, as
// the copy was the only one, marked the page lost.
TEST_F(NodeAgentTest, WriteResendAfterPushedSharedCopyIsUpgrade) {
  EXPECT_EQ(Fault(true, 1, FaultResult::kWait), Strings({"Acquire kind=write seq=1 last=0"}));
  // Unsolicited (request_seq 0) grant of a writeback target.
  EXPECT_EQ(Grant(MakeGrant(2, 0, PageState::kShared, DataSource::kOwner, 1)), Strings{});
  EXPECT_EQ(Data(2, 1, 9), Strings({"InstallData h=9", "MapRead", "Done txn=2"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kShared);
  EXPECT_TRUE(agent_.HasPending(kPage));  // the write is still wanted

  EXPECT_EQ(TickAt(kStart + kRetransmitMs), Strings({"Acquire kind=upgrade seq=1 last=2"}));
  Actions out;
  agent_.ResendAll(now_, &out);
  EXPECT_EQ(Describe(out), Strings({"Acquire kind=upgrade seq=1 last=2"}));
}

TEST_F(NodeAgentTest, UpgradeResendAfterInvalidationIsWrite) {
  Hold(PageState::kShared, 1, 0);
  EXPECT_EQ(Fault(true, 2, FaultResult::kWait), Strings({"Acquire kind=upgrade seq=2 last=1"}));
  EXPECT_EQ(Invalidate(2), Strings({"Discard", "InvalidateAck txn=2"}));
  EXPECT_TRUE(agent_.HasPending(kPage));
  EXPECT_EQ(TickAt(kStart + kRetransmitMs), Strings({"Acquire kind=write seq=2 last=2"}));
}

// ---------------------------------------------------------------------------
// Direct reads (PROTOCOL.md, "Direct reads"): the requester's side.

TEST_F(NodeAgentTest, OnlyAReadOfAPageHeldNowhereHereAsksAHolder) {
  EXPECT_EQ(FaultAsking(false, 1, FaultResult::kWait),
            Strings({"Acquire kind=read seq=1 last=0", "AskHolder"}));
  EXPECT_EQ(FaultAsking(false, 2, FaultResult::kWait), Strings{});  // the request is out already
  EXPECT_EQ(agent_.stats().direct_asks, 1u);

  NodeAgent writer{kSelf, NodeOptions{kRetransmitMs}};
  Actions out;
  writer.Fault(kPage, /*write=*/true, 3, now_, &out, /*ask_holder=*/true);
  EXPECT_EQ(Describe(out), Strings({"Acquire kind=write seq=1 last=0"}));
}

TEST_F(NodeAgentTest, DirectBytesOfTheGrantedVersionAreInstalledWithoutTheGrantsData) {
  ASSERT_EQ(FaultAsking(false, 1, FaultResult::kWait),
            Strings({"Acquire kind=read seq=1 last=0", "AskHolder"}));
  EXPECT_EQ(Data(0, 3, 70), Strings{});  // kept for the grant
  EXPECT_EQ(Grant(MakeGrant(5, 1, PageState::kShared, DataSource::kOwner, 3)),
            Strings({"InstallData h=70", "MapRead", "Done txn=5", "Wake w=1"}));
  EXPECT_EQ(agent_.VersionOf(kPage), 3u);
  EXPECT_EQ(agent_.stats().direct_installs, 1u);
  // The grant's own data comes later, and is stale.
  EXPECT_EQ(Data(5, 3, 71), Strings({"DropData h=71"}));
}

TEST_F(NodeAgentTest, DirectBytesAfterTheGrantAreInstalledAtOnce) {
  ASSERT_EQ(FaultAsking(false, 1, FaultResult::kWait).size(), 2u);
  EXPECT_EQ(Grant(MakeGrant(5, 1, PageState::kShared, DataSource::kOwner, 3)), Strings{});
  EXPECT_EQ(Data(0, 3, 70), Strings({"InstallData h=70", "MapRead", "Done txn=5", "Wake w=1"}));
}

TEST_F(NodeAgentTest, DirectBytesOfAnotherVersionWaitForTheGrantsData) {
  ASSERT_EQ(FaultAsking(false, 1, FaultResult::kWait).size(), 2u);
  // Version 2's bytes, from a node that had not seen the write of version 3.
  EXPECT_EQ(Data(0, 2, 70), Strings{});
  EXPECT_EQ(Grant(MakeGrant(5, 1, PageState::kShared, DataSource::kOwner, 3)), Strings{});
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
  EXPECT_EQ(Data(5, 3, 71),
            Strings({"InstallData h=71", "MapRead", "DropData h=70", "Done txn=5", "Wake w=1"}));
  EXPECT_EQ(agent_.stats().direct_installs, 0u);
  EXPECT_EQ(agent_.stats().direct_unused, 1u);
}

TEST_F(NodeAgentTest, DirectBytesNeverAnswerAWriteGrant) {
  // A write grant's version is new: no node had bytes of it. Direct bytes
  // wait only for a read, so those of a write request are dropped.
  ASSERT_EQ(FaultAsking(true, 1, FaultResult::kWait), Strings({"Acquire kind=write seq=1 last=0"}));
  EXPECT_EQ(Data(0, 4, 70), Strings({"DropData h=70"}));
  EXPECT_EQ(Grant(MakeGrant(5, 1, PageState::kModified, DataSource::kOwner, 4)), Strings{});
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
}

TEST_F(NodeAgentTest, DirectBytesNoReadWaitsForAreDropped) {
  EXPECT_EQ(Data(0, 1, 70), Strings({"DropData h=70"}));  // nothing asked
  Hold(PageState::kShared, 3, 2);
  EXPECT_EQ(Data(0, 2, 71), Strings({"DropData h=71"}));  // a copy is here already
  EXPECT_EQ(Invalidate(4), Strings({"Discard", "InvalidateAck txn=4"}));
  ASSERT_EQ(FaultAsking(false, 1, FaultResult::kWait).size(), 2u);
  EXPECT_EQ(Data(0, 1, 72), Strings({"DropData h=72"}));  // older than the copy this node had
  EXPECT_EQ(agent_.stats().direct_unused, 3u);
}

TEST_F(NodeAgentTest, ARefusedReadDropsItsDirectBytes) {
  ASSERT_EQ(FaultAsking(false, 1, FaultResult::kWait).size(), 2u);
  EXPECT_EQ(Data(0, 3, 70), Strings{});
  proto::Grant g = MakeGrant(4, 1, PageState::kInvalid, DataSource::kZero, 3);
  g.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  EXPECT_EQ(Grant(g), Strings({"DropData h=70", "Wake w=1 DATA_LOSS", "InvalidateAck txn=4"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kInvalid);
}

TEST_F(NodeAgentTest, ALossEndingAGrantNoReadWaitsForDropsItsDirectBytes) {
  // A move's target: an unsolicited Shared grant waits for its data, and
  // direct bytes (of another version here) wait with it.
  EXPECT_EQ(Grant(MakeGrant(5, 0, PageState::kShared, DataSource::kOwner, 3)), Strings{});
  EXPECT_EQ(Data(0, 2, 70), Strings{});
  proto::Grant g = MakeGrant(5, 0, PageState::kInvalid, DataSource::kZero, 3);
  g.status = static_cast<uint16_t>(StatusCode::kDataLoss);
  EXPECT_EQ(Grant(g), Strings({"DropData h=70", "InvalidateAck txn=5"}));
}

// The holder's side.

TEST_F(NodeAgentTest, ASharedHolderServesAReadDirectFromItsCopy) {
  Hold(PageState::kShared, 3, 2);
  EXPECT_EQ(ReadDirect(2, true), Strings({"SendPage>2 txn=0 v=2"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kShared);
  EXPECT_EQ(agent_.stats().direct_served, 1u);
}

TEST_F(NodeAgentTest, AWriterStopsWritingBeforeItServesAndWritesAgainOnlyByAnUpgrade) {
  Hold(PageState::kModified, 3, 1);
  EXPECT_EQ(ReadDirect(2, true), Strings({"MapRead", "SendPage>2 txn=0 v=1"}));
  EXPECT_EQ(agent_.StateOf(kPage), PageState::kShared);
  EXPECT_EQ(agent_.stats().downgrades, 1u);
  // Version 1's bytes have left as final: the next write is a new version.
  EXPECT_EQ(Fault(true, 2, FaultResult::kWait), Strings({"Acquire kind=upgrade seq=2 last=3"}));
}

TEST_F(NodeAgentTest, AReadDirectIsIgnoredWithoutACopyAtRest) {
  EXPECT_EQ(ReadDirect(2, false), Strings{});  // no copy
  Hold(PageState::kShared, 3, 2);
  EXPECT_EQ(ReadDirect(kSelf, false), Strings{});  // from itself
  ASSERT_EQ(Fault(true, 2, FaultResult::kWait), Strings({"Acquire kind=upgrade seq=2 last=3"}));
  EXPECT_EQ(ReadDirect(2, false), Strings{});  // a request under way
  EXPECT_EQ(Grant(MakeGrant(4, 2, PageState::kModified, DataSource::kSelf, 3)),
            Strings({"MapWrite", "Done txn=4", "Wake w=2"}));
  EXPECT_EQ(Evict(true), Strings({"Unmap", "Acquire kind=writeback seq=3 last=4"}));
  EXPECT_EQ(ReadDirect(2, false), Strings{});  // given up
  EXPECT_EQ(agent_.stats().direct_ignored, 4u);
}

// A read asks the holder and the directory: the holder sends one copy, not
// two, whichever of the ReadDirect and the directory's Fetch comes first.
TEST_F(NodeAgentTest, AFetchRightAfterAReadDirectOfTheSameCopySendsNothing) {
  Hold(PageState::kModified, 3, 2);
  ASSERT_EQ(ReadDirect(2, true), Strings({"MapRead", "SendPage>2 txn=0 v=2"}));
  EXPECT_EQ(Fetch(4, 2, PageState::kShared, 1), Strings{});
  EXPECT_EQ(agent_.stats().fetch_sends_skipped, 1u);
  EXPECT_EQ(agent_.stats().pages_sent, 1u);
  EXPECT_EQ(agent_.stats().downgrades, 1u);  // once, by the ReadDirect
  // The directory resends the Fetch when the requester never got the bytes:
  // that resend is answered.
  EXPECT_EQ(Fetch(4, 2, PageState::kShared, 1), Strings({"SendPage>2 txn=4 v=2"}));
}

// Two readers ask before either's Fetch comes (a page every node polls):
// the holder remembers each copy, and neither Fetch sends another. A
// copy that did not leave answers no Fetch.
TEST_F(NodeAgentTest, EachReadersAskAnswersItsOwnFetch) {
  Hold(PageState::kModified, 3, 2);
  ASSERT_EQ(ReadDirect(2, true), Strings({"MapRead", "SendPage>2 txn=0 v=2"}));
  ASSERT_EQ(ReadDirect(5, true), Strings({"SendPage>5 txn=0 v=2"}));
  ASSERT_EQ(ReadDirect(6, true), Strings({"SendPage>6 txn=0 v=2"}));
  agent_.ForgetRecentCopy(kPage, 6);  // the daemon could not send node 6's
  EXPECT_EQ(Fetch(4, 2, PageState::kShared, 1), Strings{});
  EXPECT_EQ(Fetch(5, 5, PageState::kShared, 1), Strings{});
  EXPECT_EQ(Fetch(6, 6, PageState::kShared, 1), Strings({"SendPage>6 txn=6 v=2"}));
  EXPECT_EQ(agent_.stats().fetch_sends_skipped, 2u);
}

TEST_F(NodeAgentTest, AReadDirectRightAfterAFetchOfTheSameCopyIsIgnored) {
  Hold(PageState::kModified, 3, 2);
  ASSERT_EQ(Fetch(4, 2, PageState::kShared, 1), Strings({"MapRead", "SendPage>2 txn=4 v=2"}));
  EXPECT_EQ(ReadDirect(2, false), Strings{});
  EXPECT_EQ(agent_.stats().direct_repeats, 1u);
  // Consumed: another ask is served (the asker dropped what it had).
  EXPECT_EQ(ReadDirect(2, true), Strings({"SendPage>2 txn=0 v=2"}));
}

// The holder wrote again between the ask and the Fetch: the ask's copy is
// of an older version than the Fetch's grant names, so the Fetch sends.
// And an ask's record never makes the holder ignore another ask.
TEST_F(NodeAgentTest, AnAsksCopyOfAnOlderVersionAnswersNoFetch) {
  Hold(PageState::kModified, 3, 2);
  ASSERT_EQ(ReadDirect(2, true), Strings({"MapRead", "SendPage>2 txn=0 v=2"}));
  EXPECT_EQ(ReadDirect(2, true), Strings({"SendPage>2 txn=0 v=2"}));
  ASSERT_EQ(Fault(true, 2, FaultResult::kWait), Strings({"Acquire kind=upgrade seq=2 last=3"}));
  ASSERT_EQ(Grant(MakeGrant(4, 2, PageState::kModified, DataSource::kSelf, 3)),
            Strings({"MapWrite", "Done txn=4", "Wake w=2"}));
  EXPECT_EQ(Fetch(5, 2, PageState::kShared, 1), Strings({"MapRead", "SendPage>2 txn=5 v=3"}));
  EXPECT_EQ(agent_.stats().fetch_sends_skipped, 0u);
}

TEST_F(NodeAgentTest, OnlyTheSameReaderAndVersionSoonAfterSkipAFetchsCopy) {
  Hold(PageState::kShared, 3, 2);
  ASSERT_EQ(ReadDirect(2, true).size(), 1u);
  EXPECT_EQ(Fetch(4, 5, PageState::kShared, 1),
            Strings({"SendPage>5 txn=4 v=2"}));  // another reader
  ASSERT_EQ(ReadDirect(2, true).size(), 1u);
  EXPECT_EQ(TickAt(now_ + kRetransmitMs), Strings{});  // forgotten: too old to be this read's
  EXPECT_EQ(Fetch(5, 2, PageState::kShared, 1), Strings({"SendPage>2 txn=5 v=2"}));
  ASSERT_EQ(ReadDirect(5, true).size(), 1u);
  EXPECT_EQ(Fetch(6, 5, PageState::kInvalid, 1),
            Strings({"Stash txn=6", "SendStash>5 txn=6 v=2"}));  // a move
  EXPECT_EQ(agent_.stats().fetch_sends_skipped, 0u);
}

// ---------------------------------------------------------------------------
// Agents and a real directory: the regression above, end to end.

class Cluster {
 public:
  explicit Cluster(std::vector<NodeId> nodes) {
    for (NodeId n : nodes) {
      dir_.NodeUp(n);
      agents_.emplace(n, NodeAgent(n, NodeOptions{kRetransmitMs}));
    }
  }

  NodeAgent& agent(NodeId n) { return agents_.at(n); }
  coordinator::PageDirectory& dir() { return dir_; }
  const Strings& log() const { return log_; }
  uint64_t now = kStart;

  // Carries out the network part of `actions` (emitted by node `from`) and of
  // everything they cause, in FIFO order, with no loss. Logs every action.
  void Deliver(NodeId from, const Actions& actions) {
    for (const Action& a : actions) queue_.push_back({from, a});
    while (!queue_.empty()) {
      const auto [node, a] = queue_.front();
      queue_.pop_front();
      log_.push_back(std::to_string(node) + ": " + Describe(a, node));
      if (a.kind == ActionKind::kSendToDirectory) {
        ToDirectory(a.message);
      } else if (a.kind == ActionKind::kSendPage || a.kind == ActionKind::kSendStash) {
        Actions out;
        agent(a.node).HandlePageData(proto::PageData{a.page, a.txn, node, a.version, {}},
                                     next_handle_++, now, &out);
        Enqueue(a.node, out);
      }
    }
  }

 private:
  void Enqueue(NodeId n, const Actions& out) {
    for (const Action& a : out) queue_.push_back({n, a});
  }
  void ToDirectory(const proto::Message& m) {
    coordinator::Outbox box;
    if (const auto* acq = std::get_if<proto::Acquire>(&m)) dir_.HandleAcquire(*acq, now, &box);
    if (const auto* ack = std::get_if<proto::InvalidateAck>(&m)) {
      dir_.HandleInvalidateAck(*ack, now, &box);
    }
    if (const auto* done = std::get_if<proto::Done>(&m)) dir_.HandleDone(*done, now, &box);
    const Status s = dir_.CheckInvariants();
    EXPECT_TRUE(s.ok()) << s.ToString();
    for (const coordinator::Outgoing& o : box) {
      Actions out;
      NodeAgent& a = agent(o.to);
      if (const auto* g = std::get_if<proto::Grant>(&o.message)) a.HandleGrant(*g, now, &out);
      if (const auto* f = std::get_if<proto::Fetch>(&o.message)) a.HandleFetch(*f, now, &out);
      if (const auto* i = std::get_if<proto::Invalidate>(&o.message)) {
        a.HandleInvalidate(*i, now, &out);
      }
      if (const auto* r = std::get_if<proto::Release>(&o.message)) a.HandleRelease(*r, &out);
      if (const auto* e = std::get_if<proto::EvictReply>(&o.message)) {
        a.HandleEvictReply(*e, now, &out);
      }
      Enqueue(o.to, out);
    }
  }

  coordinator::PageDirectory dir_;
  std::map<NodeId, NodeAgent> agents_;
  std::deque<std::pair<NodeId, Action>> queue_;
  DataHandle next_handle_ = 1;
  Strings log_;
};

bool Contains(const Strings& log, const std::string& entry) {
  return std::find(log.begin(), log.end(), entry) != log.end();
}

TEST(NodeAgentWithDirectoryTest, WriteRequestResentAfterPushedCopyKeepsThePage) {
  Cluster c({1, 2});
  Actions out;
  ASSERT_EQ(c.agent(2).Fault(kPage, /*write=*/true, 20, c.now, &out), FaultResult::kWait);
  c.Deliver(2, out);
  ASSERT_EQ(c.agent(2).StateOf(kPage), PageState::kModified);

  // Node 1 asks to write; its first Acquire is lost.
  out.clear();
  ASSERT_EQ(c.agent(1).Fault(kPage, /*write=*/true, 10, c.now, &out), FaultResult::kWait);
  ASSERT_EQ(Describe(out, 1), Strings({"Acquire kind=write seq=1 last=0"}));

  // Node 2 writes its only copy back; node 1 is the only other live node.
  out.clear();
  ASSERT_TRUE(c.agent(2).Evict(kPage, c.now, &out));
  c.Deliver(2, out);
  ASSERT_EQ(c.agent(1).StateOf(kPage), PageState::kShared);
  ASSERT_EQ(c.agent(2).StateOf(kPage), PageState::kInvalid);
  ASSERT_EQ(c.agent(2).stash_count(), 0u);  // released
  ASSERT_TRUE(c.agent(1).HasPending(kPage));

  // Node 1 resends; the directory must serve an upgrade, not lose the page.
  c.now += kRetransmitMs;
  out.clear();
  c.agent(1).Tick(c.now, &out);
  EXPECT_EQ(Describe(out, 1), Strings({"Acquire kind=upgrade seq=1 last=2"}));
  c.Deliver(1, out);

  const coordinator::PageRecord* r = c.dir().Find(kPage);
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->lost, 0);
  EXPECT_EQ(r->state, PageState::kModified);
  EXPECT_EQ(r->owner, 1u);
  EXPECT_EQ(r->busy, 0);
  EXPECT_EQ(c.agent(1).StateOf(kPage), PageState::kModified);
  EXPECT_TRUE(Contains(c.log(), "1: Wake w=10")) << ::testing::PrintToString(c.log());
  EXPECT_FALSE(c.agent(1).HasPending(kPage));
}

}  // namespace
}  // namespace dsvm::node
