// CoordinatorService membership on its own clock: frames and ticks carry
// the time, so who is declared dead when is exact. Real RocksDB store in a
// temporary directory.
#include "coordinator/service/coordinator_service.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "coordinator/directory/page_directory.h"
#include "coordinator/storage/store.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::coordinator {
namespace {

constexpr uint32_t kHeartbeatMs = 100;
constexpr uint32_t kDeadAfterMs = 600;
constexpr uint32_t kTickMs = 50;

class CoordinatorServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/dsvm-service-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto store = Store::Open(dir_, {});
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    ServiceOptions o;
    o.heartbeat_interval_ms = kHeartbeatMs;
    o.dead_after_ms = kDeadAfterMs;
    o.tick_ms = kTickMs;
    auto s = CoordinatorService::Create(std::move(*store), o, now_);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    service_ = std::move(*s);
  }
  void TearDown() override {
    service_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Delivers `m` from connection `conn` at the current time.
  void Deliver(ConnId conn, proto::Message m) {
    proto::Frame f;
    f.header.type = proto::TypeOf(m);
    f.header.request_id = ++request_;
    f.message = std::move(m);
    ASSERT_TRUE(service_->OnFrame(conn, f, now_).ok());
    std::vector<Send> sends;
    ASSERT_TRUE(service_->Flush(&sends).ok());
    for (Send& s : sends) {
      if (const auto* g = std::get_if<proto::Grant>(&s.message)) grant_ = *g;
      if (s.request_id != request_) continue;  // directory messages, other replies
      if (const auto* r = std::get_if<proto::JoinReply>(&s.message)) joined_ = r->node;
      if (const auto* r = std::get_if<proto::RegionReply>(&s.message)) region_ = *r;
      if (const auto* r = std::get_if<proto::StatusReply>(&s.message)) reply_ = proto::FromReply(*r);
    }
  }
  // A new service over the same store, as after a crash: what was not
  // flushed is gone.
  Status Restart(uint32_t heartbeat_ms = kHeartbeatMs, uint32_t dead_after_ms = kDeadAfterMs) {
    service_.reset();
    auto store = Store::Open(dir_, {});
    if (!store.ok()) return store.status();
    ServiceOptions o;
    o.heartbeat_interval_ms = heartbeat_ms;
    o.dead_after_ms = dead_after_ms;
    o.tick_ms = kTickMs;
    auto s = CoordinatorService::Create(std::move(*store), o, now_);
    if (!s.ok()) return s.status();
    service_ = std::move(*s);
    return Status::Ok();
  }
  // Makes this service shard 1 of 2, following shard 0's region table
  // (fed here by the OnRegion* calls a RegionFollower makes).
  Status StartFollower() {
    service_.reset();
    auto store = Store::Open(dir_, {});
    if (!store.ok()) return store.status();
    ServiceOptions o;
    o.shard = 1;
    o.shard_count = 2;
    o.heartbeat_interval_ms = kHeartbeatMs;
    o.dead_after_ms = kDeadAfterMs;
    o.tick_ms = kTickMs;
    o.region_authority = "127.0.0.1:1";  // never dialled here
    auto s = CoordinatorService::Create(std::move(*store), o, now_);
    if (!s.ok()) return s.status();
    service_ = std::move(*s);
    return Status::Ok();
  }
  // An Acquire of `node` on `conn` for `page` of region `region`; the
  // Grant answering it, or nullopt when none came (dropped).
  std::optional<proto::Grant> Ask(ConnId conn, proto::NodeId node, proto::RegionId region,
                                  proto::PageAddr page, proto::AccessKind kind) {
    grant_ = proto::Grant{};
    const uint64_t seq = ++acquire_seq_;
    Deliver(conn, proto::Acquire{.page = page, .node = node, .kind = kind, .request_seq = seq,
                                 .region = region});
    if (grant_.request_seq != seq) return std::nullopt;
    return grant_;
  }
  proto::NodeId Join(ConnId conn) {
    joined_ = proto::kNoNode;
    reply_ = Status::Ok();
    proto::JoinRequest j;
    j.address = "127.0.0.1:" + std::to_string(9000 + conn);
    Deliver(conn, j);
    EXPECT_NE(joined_, proto::kNoNode);
    return joined_;
  }
  // A JoinRequest for id `node` from `conn`: the id joined, or kNoNode
  // with the refusal in reply_.
  proto::NodeId JoinAs(ConnId conn, proto::NodeId node, bool resume) {
    joined_ = proto::kNoNode;
    reply_ = Status::Ok();
    proto::JoinRequest j;
    j.node = node;
    j.resume = resume ? 1 : 0;
    j.address = "127.0.0.1:" + std::to_string(9000 + conn);
    Deliver(conn, j);
    return joined_;
  }
  void Beat(ConnId conn, proto::NodeId node) { Deliver(conn, proto::Heartbeat{node, {}}); }
  // Whether a heartbeat of `node` on `conn` is accepted (the node is live
  // and bound to conn), as the next Flush answers it.
  bool BeatAccepted(ConnId conn, proto::NodeId node) {
    proto::Frame f;
    f.header.type = proto::MessageType::kHeartbeat;
    f.header.request_id = ++request_;
    f.message = proto::Heartbeat{node, {}};
    if (!service_->OnFrame(conn, f, now_).ok()) return false;  // not bound to conn
    std::vector<Send> sends;
    EXPECT_TRUE(service_->Flush(&sends).ok());
    for (const Send& s : sends) {
      const auto* r = std::get_if<proto::StatusReply>(&s.message);
      if (s.request_id == request_ && s.conn == conn && r != nullptr) return r->code == 0;
    }
    return false;
  }
  // Ticks every kTickMs until `until`, as the server does.
  void TickUntil(uint64_t until) {
    while (now_ + kTickMs <= until) {
      now_ += kTickMs;
      service_->OnTick(now_);
    }
  }
  uint64_t dead() const { return service_->stats().nodes_declared_dead; }

  std::string dir_;
  uint64_t now_ = 10'000;
  uint64_t request_ = 0;
  uint64_t acquire_seq_ = 0;
  proto::NodeId joined_ = proto::kNoNode;  // from the last JoinReply
  proto::RegionReply region_;              // the last RegionReply
  proto::Grant grant_;                     // the last Grant sent to anyone
  Status reply_;                           // the last StatusReply to a request
  std::unique_ptr<CoordinatorService> service_;
};

// The baseline the next test departs from: a node that stops beating is
// declared dead once its deadline passes on regular ticks.
TEST_F(CoordinatorServiceTest, ASilentNodeIsDeclaredDeadAfterItsDeadline) {
  const proto::NodeId a = Join(1);
  service_->OnTick(now_);
  TickUntil(now_ + kDeadAfterMs - kTickMs);
  EXPECT_EQ(dead(), 0u);
  TickUntil(now_ + 2 * kTickMs);
  EXPECT_EQ(dead(), 1u) << "node " << a;
}

// The coordinator stands still for 5 s (SIGSTOP, a paused VM, a starved
// core) while its nodes go on beating into their sockets. The first tick
// after it must not declare them dead: their heartbeats are read next.
// A node that really went silent is still declared dead, a deadline
// later. Fails without: the late tick declared both nodes dead at once.
TEST_F(CoordinatorServiceTest, AStallOfTheCoordinatorCountsAgainstNoNode) {
  const proto::NodeId a = Join(1);
  const proto::NodeId b = Join(2);
  service_->OnTick(now_);
  TickUntil(now_ + 200);
  Beat(1, a);
  Beat(2, b);
  now_ += 5000;                // nothing runs here meanwhile
  service_->OnTick(now_);      // the first tick after the stall
  EXPECT_EQ(dead(), 0u);
  Beat(1, a);                  // read from its socket right after
  // Node b said nothing since before the stall: dead a heartbeat interval
  // after the stall's end. Node a beats on: alive.
  TickUntil(now_ + kHeartbeatMs + 2 * kTickMs);
  EXPECT_EQ(dead(), 1u) << "node " << b << " is silent";
  Beat(1, a);
  TickUntil(now_ + kDeadAfterMs / 2);
  EXPECT_EQ(dead(), 1u) << "node " << a << " beats: alive";
}

// Heartbeats more often than the server ticks (20 ms against 50) are no
// stall: a node that stops beating is still declared dead. Fails with a
// stall rule that compared the gap between ticks with the heartbeat
// interval: every tick looked like a stall and renewed every deadline.
TEST_F(CoordinatorServiceTest, RegularTicksAreNoStallWhateverTheHeartbeat) {
  ASSERT_TRUE(Restart(/*heartbeat_ms=*/20, /*dead_after_ms=*/200).ok());
  const proto::NodeId a = Join(1);
  service_->OnTick(now_);
  TickUntil(now_ + 1000);
  EXPECT_EQ(dead(), 1u) << "node " << a << " never beat";
}

// The coordinator dies right after declaring a node dead: the node's
// record (live = 0) is durable, the directory's hand-over of its pages
// (NodeDown) was not flushed yet. The restarted coordinator must finish
// the hand-over, not refuse to start over records naming a dead node.
// Fails without: Create said the stored directory is inconsistent.
TEST_F(CoordinatorServiceTest, ACrashRightAfterADeathIsFinishedAtRestart) {
  proto::RegionCreate rc;
  rc.name = "r";
  rc.size = 4 * 4096;
  rc.page_size = 4096;
  Deliver(50, rc);
  ASSERT_NE(region_.base, 0u) << reply_.ToString();
  const proto::PageAddr page = region_.base;
  const proto::NodeId a = Join(1);
  const proto::NodeId b = Join(2);
  Deliver(1, proto::Acquire{.page = page, .node = a, .kind = proto::AccessKind::kWrite,
                            .request_seq = 1, .region = region_.region});
  ASSERT_EQ(grant_.page, page);
  Deliver(1, proto::Done{page, grant_.txn, a});
  const PageRecord* rec = service_->directory().Find(page);
  ASSERT_NE(rec, nullptr);
  ASSERT_EQ(rec->owner, a);
  // Node b beats; node a goes silent and is declared dead, and the process
  // dies before its next Flush.
  service_->OnTick(now_);
  TickUntil(now_ + kDeadAfterMs - kTickMs);
  Beat(2, b);  // (each Deliver flushes: nothing after the death below does)
  ASSERT_EQ(dead(), 0u);
  TickUntil(now_ + 2 * kTickMs);
  ASSERT_EQ(dead(), 1u);
  ASSERT_TRUE(Restart().ok()) << "the restarted coordinator refused to start";
  rec = service_->directory().Find(page);
  ASSERT_NE(rec, nullptr);
  EXPECT_TRUE(rec->lost) << "the page's only copy died with node " << a;
  EXPECT_TRUE(std::none_of(rec->sharers.begin(), rec->sharers.end(),
                           [&](const auto& sh) { return sh.node == a; }));
}

// The other order after a stall: a node's waiting heartbeat is read before
// the late tick. It has the deadline that heartbeat gave, no more: silent
// from then on, it is declared dead a deadline after the stall (the stall
// is not credited on top). Fails with a rule that moved deadlines by the
// stall: the node lived 5 s longer.
TEST_F(CoordinatorServiceTest, AStallCreditsNoMoreThanAFullDeadline) {
  const proto::NodeId a = Join(1);
  service_->OnTick(now_);
  TickUntil(now_ + 200);
  now_ += 5000;
  Beat(1, a);              // read first
  service_->OnTick(now_);  // then the late tick
  TickUntil(now_ + kDeadAfterMs - kTickMs);
  EXPECT_EQ(dead(), 0u);
  TickUntil(now_ + 2 * kTickMs);
  EXPECT_EQ(dead(), 1u) << "node " << a << " was credited the stall";
}

// The directory bounds its per-page queues and records by kMaxNodes live
// nodes: one join more is refused with a clear error (nothing else
// changes), and once a node is gone the next join gets in.
TEST_F(CoordinatorServiceTest, AJoinPastTheMostLiveNodesIsRefused) {
  for (ConnId c = 1; c <= kMaxNodes; ++c) {
    ASSERT_NE(Join(c), proto::kNoNode) << "join " << c << ": " << reply_.ToString();
  }
  const ConnId extra = kMaxNodes + 1;
  joined_ = proto::kNoNode;
  proto::JoinRequest j;
  j.address = "127.0.0.1:1";
  Deliver(extra, j);
  EXPECT_EQ(joined_, proto::kNoNode);
  EXPECT_EQ(reply_.code(), StatusCode::kResourceExhausted) << reply_.ToString();
  EXPECT_NE(reply_.message().find("4096 live nodes"), std::string::npos) << reply_.ToString();
  // Node 1 leaves: its place is free.
  Deliver(1, proto::LeaveRequest{1});
  EXPECT_EQ(service_->stats().nodes_declared_dead, 1u);
  EXPECT_NE(Join(extra), proto::kNoNode) << reply_.ToString();
}

// Node a joined on connection 1 and beats there. A join for its id from
// connection 2, as a resume or as a new daemon (a second daemon started
// with the same --rejoin-as, or anyone holding the secret), is refused
// with UNAVAILABLE while connection 1 beats: a stays live and bound to
// connection 1, not declared dead. Once connection 1 has been quiet for
// more than two heartbeat intervals (a half-open connection), the resume
// from connection 2 takes the id over. Fails without: the resume rebound
// a to connection 2, and the new daemon's join declared a dead.
TEST_F(CoordinatorServiceTest, AJoinForANodeLiveOnAnotherConnectionIsRefused) {
  const proto::NodeId a = Join(1);
  service_->OnTick(now_);
  for (bool resume : {true, false}) {
    for (int i = 0; i < 3; ++i) {  // retries: refused alike
      Beat(1, a);
      TickUntil(now_ + 2 * kHeartbeatMs);  // two intervals, no more, since the beat
      EXPECT_EQ(JoinAs(2, a, resume), proto::kNoNode) << "resume " << resume;
      EXPECT_EQ(reply_.code(), StatusCode::kUnavailable) << reply_.ToString();
      EXPECT_NE(reply_.message().find("node " + std::to_string(a) +
                                      " is live on another connection (last heartbeat 200 ms ago)"),
                std::string::npos)
          << reply_.ToString();
      EXPECT_EQ(dead(), 0u) << "resume " << resume;
      EXPECT_TRUE(BeatAccepted(1, a)) << "node " << a << " was taken from connection 1";
    }
  }
  EXPECT_EQ(JoinAs(1, a, /*resume=*/true), a)
      << "a rejoin on its own connection: " << reply_.ToString();
  // Connection 1 goes quiet (half-open: still open here).
  TickUntil(now_ + 2 * kHeartbeatMs);
  EXPECT_EQ(JoinAs(2, a, /*resume=*/true), proto::kNoNode) << "quiet for two intervals only";
  EXPECT_EQ(reply_.code(), StatusCode::kUnavailable) << reply_.ToString();
  TickUntil(now_ + kTickMs);
  EXPECT_EQ(JoinAs(2, a, /*resume=*/true), a) << reply_.ToString();
  EXPECT_EQ(dead(), 0u) << "a resume takes the node over alive";
  EXPECT_TRUE(BeatAccepted(2, a));
  EXPECT_FALSE(BeatAccepted(1, a)) << "the quiet connection still speaks for node " << a;
}

// A new daemon's join (no resume) would declare the node dead: however
// quiet the old connection, it is refused until the node is declared dead
// for its missed heartbeats, so a live daemon whose loop stood still for
// a while is not killed by a second daemon with its id.
TEST_F(CoordinatorServiceTest, ANewDaemonTakesAnIdOverOnlyOnceTheNodeIsDeclaredDead) {
  const proto::NodeId a = Join(1);
  service_->OnTick(now_);
  Beat(1, a);
  TickUntil(now_ + kHeartbeatMs);
  EXPECT_EQ(JoinAs(2, a, /*resume=*/false), proto::kNoNode);
  EXPECT_EQ(reply_.code(), StatusCode::kUnavailable) << reply_.ToString();
  EXPECT_EQ(dead(), 0u);
  TickUntil(now_ + 3 * kHeartbeatMs);
  EXPECT_EQ(JoinAs(2, a, /*resume=*/false), proto::kNoNode) << "quiet, but not dead yet";
  EXPECT_NE(reply_.message().find("declared dead"), std::string::npos) << reply_.ToString();
  EXPECT_EQ(dead(), 0u);
  TickUntil(now_ + kDeadAfterMs);
  EXPECT_EQ(dead(), 1u) << "declared dead for its missed heartbeats";
  EXPECT_EQ(JoinAs(2, a, /*resume=*/false), a) << reply_.ToString();
  EXPECT_TRUE(BeatAccepted(2, a));
}

// A node's connection closes (the daemon restarted, or reconnects): a join
// for its id from another connection is accepted at once, however recent
// its last heartbeat.
TEST_F(CoordinatorServiceTest, AJoinForANodeWhoseConnectionClosedIsAcceptedAtOnce) {
  const proto::NodeId a = Join(1);
  const proto::NodeId b = Join(3);
  Beat(1, a);
  Beat(3, b);
  service_->OnDisconnect(1);
  EXPECT_EQ(JoinAs(2, a, /*resume=*/true), a) << reply_.ToString();
  EXPECT_EQ(dead(), 0u);
  service_->OnDisconnect(3);
  EXPECT_EQ(JoinAs(4, b, /*resume=*/false), b) << reply_.ToString();
  EXPECT_EQ(dead(), 1u) << "node " << b << " restarted";
}

// After a stall of the coordinator, a node's heartbeats may wait unread:
// its connection is not quiet, and a join for its id from another
// connection is refused for two intervals after the stall, as it would be
// after a beat. Fails without: the stall counted as the node's silence.
TEST_F(CoordinatorServiceTest, AStallDoesNotMakeANodesConnectionQuiet) {
  const proto::NodeId a = Join(1);
  service_->OnTick(now_);
  Beat(1, a);
  now_ += 5000;
  service_->OnTick(now_);
  EXPECT_EQ(JoinAs(2, a, /*resume=*/true), proto::kNoNode);
  EXPECT_EQ(reply_.code(), StatusCode::kUnavailable) << reply_.ToString();
  Beat(1, a);  // read right after the stall
  EXPECT_TRUE(BeatAccepted(1, a));
}

// A follower shard applies the same rule to the ids shard 0 gave.
TEST_F(CoordinatorServiceTest, AFollowerRefusesAJoinForANodeLiveOnAnotherConnection) {
  ASSERT_TRUE(StartFollower().ok());
  const proto::NodeId a = 7;  // given by shard 0
  ASSERT_EQ(JoinAs(1, a, /*resume=*/false), a) << reply_.ToString();
  service_->OnTick(now_);
  Beat(1, a);
  for (bool resume : {true, false}) {
    EXPECT_EQ(JoinAs(2, a, resume), proto::kNoNode) << "resume " << resume;
    EXPECT_EQ(reply_.code(), StatusCode::kUnavailable) << reply_.ToString();
  }
  EXPECT_EQ(dead(), 0u);
  EXPECT_TRUE(BeatAccepted(1, a));
  service_->OnDisconnect(1);
  EXPECT_EQ(JoinAs(2, a, /*resume=*/true), a) << reply_.ToString();
}

// A node cut off when region r1 was deleted still maps it, and a new region
// r2 now holds r1's addresses. The node's Acquire names r1: it must fail
// (NOT_FOUND, SIGBUS in the process), not be served r2's page, which
// another owner's rules protect. Fails without: the grant gave r2's page.
TEST_F(CoordinatorServiceTest, AnAcquireOfADeletedRegionIsNotServedItsSuccessorsPage) {
  const ConnId tool = 50;
  Deliver(tool, proto::RegionCreate{.name = "r1", .size = 4 * 4096, .page_size = 4096});
  const proto::RegionReply r1 = region_;
  ASSERT_NE(r1.region, 0u) << reply_.ToString();
  const proto::NodeId a = Join(1);
  const proto::NodeId b = Join(2);
  auto g = Ask(1, a, r1.region, r1.base, proto::AccessKind::kWrite);
  ASSERT_TRUE(g.has_value());
  Deliver(1, proto::Done{r1.base, g->txn, a});
  Deliver(tool, proto::RegionDelete{.name = "r1"});
  ASSERT_TRUE(reply_.ok()) << reply_.ToString();
  Deliver(tool, proto::RegionCreate{.name = "r2", .size = 4 * 4096, .page_size = 4096});
  const proto::RegionReply r2 = region_;
  ASSERT_EQ(r2.base, r1.base) << "the test needs the same addresses";
  g = Ask(1, a, r2.region, r2.base, proto::AccessKind::kWrite);  // r2's page 0, written by a
  ASSERT_TRUE(g.has_value());
  ASSERT_EQ(g->status, 0);
  Deliver(1, proto::Done{r2.base, g->txn, a});

  g = Ask(2, b, r1.region, r1.base, proto::AccessKind::kRead);
  ASSERT_TRUE(g.has_value()) << "answered, not dropped: shard 0 knows every region";
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kNotFound))
      << "node b was granted r2's page for its mapping of deleted r1";
  g = Ask(2, b, r2.region, r2.base, proto::AccessKind::kRead);
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->status, 0);
  EXPECT_EQ(g->source, proto::DataSource::kOwner);
}

// A follower shard serves an Acquire only for the region it names. One it
// has not heard of waits (dropped; the node resends), even when an older
// region still holds the addresses here; one it knows was deleted fails,
// even when a newer region holds them. Fails without: the follower served
// r2's request with r1's records (owner a), and r1's with r2's.
TEST_F(CoordinatorServiceTest, AFollowerServesAnAcquireOnlyForTheRegionItNames) {
  ASSERT_TRUE(StartFollower().ok());
  const proto::PageAddr base = WindowOptions{}.base;
  const proto::PageAddr page = base + proto::kShardGranule;  // shard 1's granule
  const uint64_t size = 4u << 20;
  const proto::RegionCreated r1{1, base, size, 4096, "r1"};
  const proto::RegionCreated r2{2, base, size, 4096, "r2"};
  ASSERT_TRUE(service_->OnRegionSnapshot({r1}, 2).ok());
  proto::NodeId a = 7, b = 8;  // ids shard 0 gave
  for (auto [conn, id] : {std::pair<ConnId, proto::NodeId>{1, a}, {2, b}}) {
    proto::JoinRequest j;
    j.node = id;
    j.address = "127.0.0.1:1";
    Deliver(conn, j);
    ASSERT_EQ(joined_, id) << reply_.ToString();
  }
  auto g = Ask(1, a, r1.region, page, proto::AccessKind::kWrite);
  ASSERT_TRUE(g.has_value());
  ASSERT_EQ(g->status, 0);
  Deliver(1, proto::Done{page, g->txn, a});

  // Shard 0 deletes r1 and makes r2 at its addresses; node b opened r2
  // there and asks before this shard has heard of either change.
  EXPECT_FALSE(Ask(2, b, r2.region, page, proto::AccessKind::kRead).has_value())
      << "served r2's request with r1's page";
  ASSERT_TRUE(service_->OnRegionDeleted(proto::RegionDeleted{r1.region, base, size}).ok());
  EXPECT_FALSE(Ask(2, b, r2.region, page, proto::AccessKind::kRead).has_value());
  g = Ask(2, b, r1.region, page, proto::AccessKind::kRead);
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kNotFound));
  ASSERT_TRUE(service_->OnRegionCreated(r2).ok());
  g = Ask(2, b, r1.region, page, proto::AccessKind::kRead);
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kNotFound))
      << "served deleted r1's request with r2's page";
  g = Ask(2, b, r2.region, page, proto::AccessKind::kRead);
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->status, 0);
  EXPECT_EQ(g->source, proto::DataSource::kZero) << "r2's page is new: r1's records are gone";

  // Cut off from shard 0, the follower cannot tell an unheard region from
  // a deleted one, but for those it saw deleted.
  service_->OnRegionAuthorityLost();
  const proto::PageAddr elsewhere = base + (64u << 20) + proto::kShardGranule;
  EXPECT_FALSE(Ask(2, b, 5, elsewhere, proto::AccessKind::kRead).has_value());
  g = Ask(2, b, r1.region, page, proto::AccessKind::kRead);
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kNotFound));
  // A snapshot says shard 0 has given ids up to 9: region 5, not in it, was
  // made and deleted meanwhile; region 10 may still come.
  ASSERT_TRUE(service_->OnRegionSnapshot({r2}, 10).ok());
  g = Ask(2, b, 5, elsewhere, proto::AccessKind::kRead);
  ASSERT_TRUE(g.has_value()) << "a region deleted before the snapshot waits for ever";
  EXPECT_EQ(g->status, static_cast<uint16_t>(StatusCode::kNotFound));
  EXPECT_FALSE(Ask(2, b, 10, elsewhere, proto::AccessKind::kRead).has_value());
}

}  // namespace
}  // namespace dsvm::coordinator
