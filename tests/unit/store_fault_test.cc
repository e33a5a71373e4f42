// The coordinator's storage-error paths: a real RocksDB store in a temporary
// directory whose files fail on command (DiskFaults, injected under RocksDB
// at its file-system boundary), first on its own, then under a
// CoordinatorService driven frame by frame on its own clock. The rule under
// test: a disk error fails the request that needs the disk with a clear
// error, holds what may not leave before it is durable, loses nothing
// acknowledged, and the coordinator serves again once the disk works.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "coordinator/directory/page_directory.h"
#include "coordinator/service/coordinator_service.h"
#include "coordinator/storage/store.h"
#include "proto/messages.h"
#include "proto/status.h"

namespace dsvm::coordinator {
namespace {

// Contains(message, part): the failure shows the whole message.
::testing::AssertionResult Contains(const std::string& message, const std::string& part) {
  if (message.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << message << "\" lacks \"" << part << "\"";
}

std::string MakeTempDir() {
  char tmpl[] = "/tmp/dsvm-store-fault-XXXXXX";
  const char* dir = ::mkdtemp(tmpl);
  return dir == nullptr ? std::string() : std::string(dir);
}

NodeRecord MakeNode(uint32_t id) {
  NodeRecord n;
  n.id = id;
  n.address = "127.0.0.1:" + std::to_string(9000 + id);
  n.live = 1;
  return n;
}

PageRecord MakePage(uint64_t page, proto::NodeId owner) {
  PageRecord r;
  r.page = page;
  r.state = proto::PageState::kModified;
  r.owner = owner;
  r.sharers.push_back(Sharer{owner, 1});
  r.version = 1;
  r.txn = 1;
  return r;
}

std::vector<uint32_t> NodeIds(const Store& store) {
  auto nodes = store.LoadNodes();
  EXPECT_TRUE(nodes.ok()) << nodes.status().ToString();
  std::vector<uint32_t> ids;
  if (nodes.ok()) {
    for (const NodeRecord& n : *nodes) ids.push_back(n.id);
  }
  return ids;
}

std::vector<uint64_t> PageAddrs(const Store& store) {
  std::vector<uint64_t> pages;
  Status st = store.LoadDirectory([&](const PageRecord& r) {
    pages.push_back(r.page);
    return Status::Ok();
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  return pages;
}

class StoreFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    ASSERT_FALSE(dir_.empty());
    ASSERT_TRUE(Open().ok());
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  Status Open() {
    store_.reset();
    StoreOptions o;
    o.faults = &faults_;
    auto s = Store::Open(dir_, o);
    if (!s.ok()) return s.status();
    store_ = std::move(*s);
    return Status::Ok();
  }

  std::string dir_;
  DiskFaults faults_;
  std::unique_ptr<Store> store_;
};

// A write while the disk fails is refused with kIoError naming the call and
// the fault; what was written before stays. Once the disk works, writes
// succeed again on the same Store (RocksDB, which refuses every write after
// a failed WAL write and will not resume from it, is reopened underneath),
// and a reopen finds exactly the acknowledged writes. Fails without the
// recovery in Store: every write after the fault failed until a restart.
TEST_F(StoreFaultTest, AFailedWriteIsAnIoErrorAndTheStoreWritesAgainOnceTheDiskWorks) {
  ASSERT_TRUE(store_->PutNode(MakeNode(1)).ok());
  ASSERT_TRUE(store_->WriteDirectory({MakePage(0x1000, 1)}).ok());

  faults_.FailWrites(true);
  Status st = store_->PutNode(MakeNode(2));
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_TRUE(Contains(st.message(), "Store::PutNode(" + dir_ + ")"));
  EXPECT_TRUE(Contains(st.message(), "injected disk fault"));
  EXPECT_GT(faults_.injected(), 0u);
  EXPECT_EQ(NodeIds(*store_), std::vector<uint32_t>{1}) << "earlier records are intact";
  EXPECT_EQ(PageAddrs(*store_), std::vector<uint64_t>{0x1000});

  faults_.FailWrites(false);
  st = store_->PutNode(MakeNode(3));
  ASSERT_TRUE(st.ok()) << "the disk works again, the store does not: " << st.ToString();
  ASSERT_TRUE(store_->WriteDirectory({MakePage(0x2000, 3)}).ok());
  EXPECT_EQ(NodeIds(*store_), (std::vector<uint32_t>{1, 3}));

  ASSERT_TRUE(Open().ok());
  EXPECT_EQ(NodeIds(*store_), (std::vector<uint32_t>{1, 3}));
  EXPECT_EQ(PageAddrs(*store_), (std::vector<uint64_t>{0x1000, 0x2000}));
}

// While the disk keeps failing, every write fails with a clear error, also
// where the store cannot even reopen RocksDB (no file can be made); the
// first write after the disk works succeeds. Fails without the recovery in
// Store: RocksDB's background error refused the last write.
TEST_F(StoreFaultTest, WhileTheDiskFailsEveryWriteFailsClearlyAndTheFirstAfterSucceeds) {
  ASSERT_TRUE(store_->PutNode(MakeNode(1)).ok());
  faults_.FailWrites(true);
  EXPECT_EQ(store_->PutNode(MakeNode(2)).code(), StatusCode::kIoError);
  Status st = store_->WriteDirectory({MakePage(0x1000, 1)});
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_TRUE(Contains(st.message(), "Store::WriteDirectory(" + dir_ + ")"));
  // Writes work again but no file can be created: RocksDB cannot start
  // the new WAL a recovery needs.
  faults_.FailWrites(false);
  faults_.FailFileCreation(true);
  st = store_->PutNode(MakeNode(2));
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_TRUE(Contains(st.message(), "cannot recover until the disk works again"));
  faults_.Clear();
  st = store_->PutNode(MakeNode(4));
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(Open().ok());
  EXPECT_EQ(NodeIds(*store_), (std::vector<uint32_t>{1, 4}));
}

// A region and its pages' records go in one write: refused, both stay
// (after a reopen too); done, both are gone, and records outside the
// region stay. Before, the service deleted them in two writes, and a disk
// error between them left a refused delete half done: the region's record
// gone, so the region vanished at the next restart.
TEST_F(StoreFaultTest, ARegionAndItsPagesAreDeletedInOneWrite) {
  RegionRecord r;
  r.id = 5;
  r.name = "five";
  r.base = 0x200000;
  r.size = 0x4000;
  r.page_size = 4096;
  ASSERT_TRUE(store_->PutRegion(r).ok());
  ASSERT_TRUE(store_->WriteDirectory({MakePage(r.base, 1), MakePage(r.base + 0x3000, 1),
                                      MakePage(r.base + r.size, 1)})
                  .ok());
  auto region_ids = [&] {
    auto regions = store_->LoadRegions();
    EXPECT_TRUE(regions.ok()) << regions.status().ToString();
    std::vector<uint64_t> ids;
    if (regions.ok()) {
      for (const RegionRecord& g : *regions) ids.push_back(g.id);
    }
    return ids;
  };
  faults_.FailWrites(true);
  Status st = store_->DeleteRegionAndPages(r.id, r.base, r.size);
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  faults_.Clear();
  ASSERT_TRUE(Open().ok());
  EXPECT_EQ(region_ids(), std::vector<uint64_t>{5});
  EXPECT_EQ(PageAddrs(*store_), (std::vector<uint64_t>{r.base, r.base + 0x3000, r.base + r.size}));

  ASSERT_TRUE(store_->DeleteRegionAndPages(r.id, r.base, r.size).ok());
  ASSERT_TRUE(Open().ok());
  EXPECT_TRUE(region_ids().empty());
  EXPECT_EQ(PageAddrs(*store_), std::vector<uint64_t>{r.base + r.size}) << "only the neighbour's";
  EXPECT_EQ(store_->DeleteRegionAndPages(1, ~uint64_t{0} - 10, 4096).code(),
            StatusCode::kInvalidArgument);
}

// A failed fsync: the bytes may have reached the WAL, so the refused write
// may be found later (the store promises nothing about it), but every
// acknowledged one is kept, and the store writes again. Fails without the
// recovery in Store.
TEST_F(StoreFaultTest, AFailedSyncLosesNoAcknowledgedWrite) {
  ASSERT_TRUE(store_->PutNode(MakeNode(1)).ok());
  faults_.FailSyncs(true);
  Status st = store_->PutNode(MakeNode(2));
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_TRUE(Contains(st.message(), "sync"));
  faults_.Clear();
  ASSERT_TRUE(store_->PutNode(MakeNode(3)).ok());
  ASSERT_TRUE(Open().ok());
  std::vector<uint32_t> ids = NodeIds(*store_);
  std::erase(ids, 2u);  // undecided: refused, but its bytes were written
  EXPECT_EQ(ids, (std::vector<uint32_t>{1, 3}));
}

// ---------------------------------------------------------------------------
// CoordinatorService over a failing disk.

constexpr uint32_t kHeartbeatMs = 100;
constexpr uint32_t kDeadAfterMs = 600;
constexpr uint32_t kTickMs = 50;

class ServiceFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    ASSERT_FALSE(dir_.empty());
    ASSERT_TRUE(Restart().ok());
  }
  void TearDown() override {
    service_.reset();
    std::filesystem::remove_all(dir_);
  }

  // A new service over the same store, as after a crash: what was not
  // flushed is gone. The disk works for the restart. `region_authority`:
  // shard 1 of 2, following shard 0 there (fed by the OnRegion* calls).
  Status Restart(const std::string& region_authority = "") {
    service_.reset();
    faults_.Clear();
    StoreOptions so;
    so.faults = &faults_;
    auto store = Store::Open(dir_, so);
    if (!store.ok()) return store.status();
    ServiceOptions o;
    if (!region_authority.empty()) {
      o.shard = 1;
      o.shard_count = 2;
      o.region_authority = region_authority;
    }
    o.heartbeat_interval_ms = kHeartbeatMs;
    o.dead_after_ms = kDeadAfterMs;
    o.tick_ms = kTickMs;
    auto s = CoordinatorService::Create(std::move(*store), o, now_);
    if (!s.ok()) return s.status();
    service_ = std::move(*s);
    return Status::Ok();
  }
  // Hands out what may leave into sent_.
  Status Flush() { return service_->Flush(&sent_); }
  // Delivers `m` from `conn` at the current time, then flushes; returns the
  // request id. OnFrame must accept it: these are well-formed requests.
  uint64_t Deliver(ConnId conn, proto::Message m) {
    proto::Frame f;
    f.header.type = proto::TypeOf(m);
    f.header.request_id = ++request_;
    f.message = std::move(m);
    Status st = service_->OnFrame(conn, f, now_);
    EXPECT_TRUE(st.ok()) << st.ToString();
    flushed_ = Flush();
    return request_;
  }
  // The reply to request `rid` handed out so far, if any.
  const proto::Message* ReplyTo(uint64_t rid) const {
    for (const Send& s : sent_) {
      if (s.request_id == rid) return &s.message;
    }
    return nullptr;
  }
  // The StatusReply to `rid` as a Status; kInternal naming what came instead.
  Status StatusOf(uint64_t rid) const {
    const proto::Message* m = ReplyTo(rid);
    if (m == nullptr) return Internal("no reply");
    if (const auto* r = std::get_if<proto::StatusReply>(m)) return proto::FromReply(*r);
    return Internal(std::string("a ") + proto::TypeName(proto::TypeOf(*m)) + " came instead");
  }
  // The RegionReply to `rid`, copied (sent_ grows: no pointer into it
  // outlives the next Flush).
  std::optional<proto::RegionReply> RegionReplyTo(uint64_t rid) const {
    const proto::Message* m = ReplyTo(rid);
    const auto* r = m == nullptr ? nullptr : std::get_if<proto::RegionReply>(m);
    if (r == nullptr) return std::nullopt;
    return *r;
  }
  // Region `name` made, node 1 joined, and its write Acquire of the
  // region's first page delivered while writes fail (the disk fault stays
  // on): the page's record waits unwritten.
  struct HeldWrite {
    proto::RegionReply region;
    proto::NodeId node = proto::kNoNode;
  };
  HeldWrite AcquireWhileWritesFail(const std::string& name) {
    const uint64_t created = CreateRegion(name);
    const std::optional<proto::RegionReply> region = RegionReplyTo(created);
    EXPECT_TRUE(region.has_value()) << StatusOf(created).ToString();
    HeldWrite h{region.value_or(proto::RegionReply{}), Join(1)};
    faults_.FailWrites(true);
    Deliver(1, proto::Acquire{.page = h.region.base, .node = h.node,
                              .kind = proto::AccessKind::kWrite, .request_seq = 1,
                              .region = h.region.region});
    return h;
  }
  uint64_t CreateRegion(const std::string& name) {
    return Deliver(kTool, proto::RegionCreate{.name = name, .size = 4 * 4096, .page_size = 4096});
  }
  // Whether region `name` exists, as a tool asking the service sees it.
  bool RegionExists(const std::string& name) {
    const uint64_t rid = Deliver(kTool, proto::RegionOpen{.name = name});
    return ReplyTo(rid) != nullptr && std::holds_alternative<proto::RegionReply>(*ReplyTo(rid));
  }
  uint64_t JoinRequest(ConnId conn, proto::NodeId node = proto::kNoNode, uint8_t resume = 0) {
    proto::JoinRequest j;
    j.node = node;
    j.address = "127.0.0.1:" + std::to_string(9000 + conn);
    j.resume = resume;
    return Deliver(conn, j);
  }
  proto::NodeId Join(ConnId conn) {
    const uint64_t rid = JoinRequest(conn);
    const proto::Message* m = ReplyTo(rid);
    const auto* r = m == nullptr ? nullptr : std::get_if<proto::JoinReply>(m);
    EXPECT_NE(r, nullptr) << StatusOf(rid).ToString();
    return r == nullptr ? proto::kNoNode : r->node;
  }
  // The nodes the service lists, with whether each is live.
  std::vector<proto::NodeEntry> Nodes() {
    const uint64_t rid = Deliver(kTool, proto::NodeList{});
    const proto::Message* m = ReplyTo(rid);
    const auto* r = m == nullptr ? nullptr : std::get_if<proto::NodeListReply>(m);
    EXPECT_NE(r, nullptr);
    return r == nullptr ? std::vector<proto::NodeEntry>{} : r->nodes;
  }
  // Grants handed out to connection `conn` so far, retransmissions included.
  std::vector<proto::Grant> GrantsTo(ConnId conn) const {
    std::vector<proto::Grant> grants;
    for (const Send& s : sent_) {
      const auto* g = std::get_if<proto::Grant>(&s.message);
      if (g != nullptr && s.conn == conn) grants.push_back(*g);
    }
    return grants;
  }
  // Whether connection `conn` was told page `page` is lost (DATA_LOSS).
  bool ToldLost(ConnId conn, proto::PageAddr page) const {
    std::vector<proto::Grant> grants = GrantsTo(conn);
    return std::any_of(grants.begin(), grants.end(), [&](const proto::Grant& g) {
      return g.page == page && g.status == static_cast<uint16_t>(StatusCode::kDataLoss);
    });
  }
  // Ticks every kTickMs until `until`, as the server does, each tick
  // followed by a Flush (its Status in flushed_).
  void TickUntil(uint64_t until) {
    while (now_ + kTickMs <= until) {
      now_ += kTickMs;
      service_->OnTick(now_);
      flushed_ = Flush();
    }
  }

  static constexpr ConnId kTool = 50;
  std::string dir_;
  DiskFaults faults_;
  uint64_t now_ = 10'000;
  uint64_t request_ = 0;
  std::vector<Send> sent_;  // everything Flush handed out, in order
  Status flushed_;          // the last Flush's
  std::unique_ptr<CoordinatorService> service_;
};

// A node's Acquire while the disk fails: the directory change cannot be
// written, so its Grant is held (no Flush hands it out) for as long as the
// disk fails; the first Flush after hands it out, and a restart finds the
// record. Fails without the recovery in Store: Flush failed for ever.
TEST_F(ServiceFaultTest, AGrantWaitsUntilItsDirectoryRecordIsWritten) {
  const HeldWrite held = AcquireWhileWritesFail("r");
  const proto::PageAddr page = held.region.base;
  const proto::NodeId a = held.node;
  EXPECT_EQ(flushed_.code(), StatusCode::kIoError) << flushed_.ToString();
  EXPECT_TRUE(Contains(flushed_.message(), "WriteDirectory"));
  EXPECT_TRUE(service_->has_unflushed());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(Flush().code(), StatusCode::kIoError);
  }
  EXPECT_TRUE(GrantsTo(1).empty()) << "a Grant left before its record was durable";

  faults_.FailWrites(false);
  Status st = Flush();
  ASSERT_TRUE(st.ok()) << "the disk works again, the coordinator does not: " << st.ToString();
  ASSERT_EQ(GrantsTo(1).size(), 1u);
  EXPECT_EQ(GrantsTo(1)[0].page, page);
  EXPECT_FALSE(service_->has_unflushed());

  ASSERT_TRUE(Restart().ok());
  const PageRecord* rec = service_->directory().Find(page);
  ASSERT_NE(rec, nullptr) << "the flushed record was lost";
  EXPECT_TRUE(rec->busy);
  EXPECT_EQ(rec->tx.requester, a);
}

// While the disk fails, the node resends its Acquire and the directory
// retransmits its Grant every period; what waits keeps one copy of it, so
// it grows with the messages outstanding, not the outage's length, and one
// Grant leaves when the disk works again. Fails without: a copy per resend
// and per retransmission period waited, and all of them left.
TEST_F(ServiceFaultTest, RetransmissionsDoNotPileUpWhileTheDiskFails) {
  const HeldWrite held = AcquireWhileWritesFail("r");
  for (int i = 0; i < 20; ++i) {
    Deliver(1, proto::Heartbeat{held.node, {}});
    Deliver(1, proto::Acquire{.page = held.region.base, .node = held.node,
                              .kind = proto::AccessKind::kWrite, .request_seq = 1,
                              .region = held.region.region});
    TickUntil(now_ + 100);
    EXPECT_EQ(flushed_.code(), StatusCode::kIoError);
  }
  EXPECT_TRUE(GrantsTo(1).empty());
  faults_.FailWrites(false);
  ASSERT_TRUE(Flush().ok());
  const std::vector<proto::Grant> grants = GrantsTo(1);
  ASSERT_EQ(grants.size(), 1u);
  EXPECT_EQ(grants[0].page, held.region.base);
  EXPECT_EQ(grants[0].status, static_cast<uint16_t>(StatusCode::kOk));
}

// While the disk fails and a grant waits for its record, the node's
// heartbeats are still answered: their answer depends on nothing unwritten,
// and held it would let the node's lease lapse (it would fence, and every
// node with it) for as long as the disk fails. Fails without: no answer.
TEST_F(ServiceFaultTest, HeartbeatsAreAnsweredWhileTheDiskFails) {
  const proto::NodeId a = AcquireWhileWritesFail("r").node;
  ASSERT_EQ(flushed_.code(), StatusCode::kIoError) << flushed_.ToString();
  const uint64_t beat = Deliver(1, proto::Heartbeat{a, {}});
  EXPECT_EQ(flushed_.code(), StatusCode::kIoError);
  EXPECT_TRUE(StatusOf(beat).ok()) << StatusOf(beat).ToString();
  EXPECT_TRUE(GrantsTo(1).empty()) << "the grant left before its record was written";
  faults_.FailWrites(false);
  ASSERT_TRUE(Flush().ok());
  EXPECT_EQ(GrantsTo(1).size(), 1u);
}

// A follower shard that cannot store a region shard 0 made leaves it out
// and says it is not synced: a node asking for the region's pages waits
// (its Acquire dropped), never served from a table that lacks it. The
// next snapshot, with the disk working, brings the region, and a restart
// keeps it.
TEST_F(ServiceFaultTest, AFollowerThatCannotStoreARegionWaitsForTheNextSnapshot) {
  ASSERT_TRUE(Restart("127.0.0.1:1").ok());
  ASSERT_TRUE(service_->OnRegionSnapshot({}, 1).ok());
  ASSERT_TRUE(service_->region_table_synced());
  const proto::PageAddr base = WindowOptions{}.base;
  const proto::RegionCreated r{1, base, 4u << 20, 4096, "r"};
  proto::JoinRequest j;
  j.node = 7;  // the id shard 0 gave
  j.address = "127.0.0.1:1";
  Deliver(1, j);
  const proto::Acquire ask{.page = base + proto::kShardGranule, .node = 7,
                           .kind = proto::AccessKind::kWrite, .request_seq = 1, .region = 1};

  faults_.FailWrites(true);
  Status st = service_->OnRegionCreated(r);
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_FALSE(service_->region_table_synced());
  faults_.FailWrites(false);
  Deliver(1, ask);
  EXPECT_TRUE(GrantsTo(1).empty()) << "served a page of a region this shard could not store";

  ASSERT_TRUE(service_->OnRegionSnapshot({r}, 2).ok());  // the resync
  EXPECT_TRUE(service_->region_table_synced());
  Deliver(1, ask);
  ASSERT_EQ(GrantsTo(1).size(), 1u);
  EXPECT_EQ(GrantsTo(1)[0].status, 0);
  ASSERT_TRUE(Restart("127.0.0.1:1").ok());
  ASSERT_TRUE(service_->OnRegionSnapshot({r}, 2).ok());
  EXPECT_NE(service_->directory().Find(base + proto::kShardGranule), nullptr)
      << "the region's directory record was dropped at the restart";
}

// A directory change waits unwritten (the disk failed at its Flush) when
// the disk works again and its region is deleted before the next Flush.
// That Flush must not write the deleted page's record back: a region made
// at the same addresses would load it as its own at the next restart.
// Fails without dropping the waiting records with the region: after the
// restart the new region's page had the old one's owner.
TEST_F(ServiceFaultTest, ARecordWaitingForTheDiskGoesWithItsRegion) {
  const proto::PageAddr page = AcquireWhileWritesFail("old").region.base;
  ASSERT_EQ(flushed_.code(), StatusCode::kIoError) << flushed_.ToString();
  faults_.FailWrites(false);
  // The delete is written at once, and the Flush after it succeeds.
  const uint64_t deleted = Deliver(kTool, proto::RegionDelete{.name = "old"});
  ASSERT_TRUE(StatusOf(deleted).ok()) << StatusOf(deleted).ToString();
  ASSERT_TRUE(flushed_.ok()) << flushed_.ToString();
  const uint64_t again = CreateRegion("new");
  const std::optional<proto::RegionReply> successor = RegionReplyTo(again);
  ASSERT_TRUE(successor.has_value()) << StatusOf(again).ToString();
  ASSERT_EQ(successor->base, page) << "the test needs the same addresses";
  ASSERT_TRUE(Restart().ok());
  EXPECT_EQ(service_->directory().Find(page), nullptr)
      << "the new region's page has the deleted region's record";
}

// A RegionCreate that cannot be stored is answered with the store's error,
// and no region exists: not in memory, not after a restart. Once the disk
// works, the same request succeeds, without a restart, and the region
// survives one. Fails without the recovery in Store: the retry failed too.
TEST_F(ServiceFaultTest, ARegionCreateThatCannotBeStoredIsRefusedAndLeavesNoRegion) {
  faults_.FailWrites(true);
  Status st = StatusOf(CreateRegion("r"));
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_TRUE(Contains(st.message(), "injected disk fault"));
  EXPECT_FALSE(RegionExists("r"));
  faults_.FailWrites(false);
  ASSERT_TRUE(Restart().ok());
  EXPECT_FALSE(RegionExists("r")) << "a refused region came back at the restart";

  faults_.FailWrites(true);
  EXPECT_EQ(StatusOf(CreateRegion("r")).code(), StatusCode::kIoError);
  faults_.FailWrites(false);
  const uint64_t rid = CreateRegion("r");
  ASSERT_NE(std::get_if<proto::RegionReply>(ReplyTo(rid)), nullptr)
      << "refused once the disk works: " << StatusOf(rid).ToString();
  EXPECT_TRUE(RegionExists("r"));
  ASSERT_TRUE(Restart().ok());
  EXPECT_TRUE(RegionExists("r")) << "an acknowledged region was lost";
}

// The same for a JoinRequest: refused with the store's error, no member
// afterwards, in memory or after a restart; accepted once the disk works.
// Fails without the recovery in Store.
TEST_F(ServiceFaultTest, AJoinThatCannotBeStoredIsRefusedAndLeavesNoNode) {
  faults_.FailWrites(true);
  Status st = StatusOf(JoinRequest(1));
  EXPECT_EQ(st.code(), StatusCode::kIoError) << st.ToString();
  EXPECT_TRUE(Nodes().empty());
  ASSERT_TRUE(Restart().ok());
  EXPECT_TRUE(Nodes().empty()) << "a refused node came back at the restart";

  faults_.FailWrites(true);
  EXPECT_EQ(StatusOf(JoinRequest(1)).code(), StatusCode::kIoError);
  faults_.FailWrites(false);
  const proto::NodeId a = Join(1);
  ASSERT_NE(a, proto::kNoNode);
  ASSERT_TRUE(Restart().ok());
  std::vector<proto::NodeEntry> nodes = Nodes();
  ASSERT_EQ(nodes.size(), 1u);
  EXPECT_EQ(nodes[0].node, a);
  EXPECT_EQ(nodes[0].live, 1);
}

// Node a owns a page that node b asks for, and goes silent. It is declared
// dead in a moment when its record cannot be written; the disk works again
// right after. Its record must be stored dead before the hand-over of its
// pages is written or leaves: otherwise a restart finds a live in the store
// while the directory no longer names it, and a, resuming with its stale
// copy, is taken back as live. Fails without holding the hand-over for the
// record: after the restart, a's resume was accepted.
TEST_F(ServiceFaultTest, ANodeIsStoredDeadBeforeItsPagesAreHandedOn) {
  const uint64_t created = CreateRegion("r");
  const std::optional<proto::RegionReply> region = RegionReplyTo(created);
  ASSERT_TRUE(region.has_value()) << StatusOf(created).ToString();
  const proto::PageAddr page = region->base;
  const proto::RegionId rid = region->region;
  const proto::NodeId a = Join(1);
  const proto::NodeId b = Join(2);
  Deliver(1, proto::Acquire{.page = page, .node = a, .kind = proto::AccessKind::kWrite,
                            .request_seq = 1, .region = rid});
  ASSERT_EQ(GrantsTo(1).size(), 1u);
  Deliver(1, proto::Done{page, GrantsTo(1)[0].txn, a});
  // Node b is granted a read, to fetch from a; it has not yet.
  Deliver(2, proto::Acquire{.page = page, .node = b, .kind = proto::AccessKind::kRead,
                            .request_seq = 1, .region = rid});
  ASSERT_EQ(GrantsTo(2).size(), 1u);
  ASSERT_EQ(GrantsTo(2)[0].source, proto::DataSource::kOwner);
  ASSERT_FALSE(ToldLost(2, page));

  // Node b beats; node a is silent and dies while writes fail.
  service_->OnTick(now_);
  TickUntil(now_ + kDeadAfterMs - kTickMs);
  Deliver(2, proto::Heartbeat{b, {}});
  ASSERT_EQ(service_->stats().nodes_declared_dead, 0u);
  faults_.FailWrites(true);
  TickUntil(now_ + 2 * kTickMs);
  ASSERT_EQ(service_->stats().nodes_declared_dead, 1u);
  EXPECT_EQ(flushed_.code(), StatusCode::kIoError) << flushed_.ToString();
  EXPECT_FALSE(ToldLost(2, page)) << "a's page was handed on before its death was stored";

  // b asks again meanwhile: the data never came (its last txn is not the
  // read's). The answer is part of the hand-over, and waits too.
  const proto::Acquire again{.page = page, .node = b, .kind = proto::AccessKind::kRead,
                             .request_seq = 1, .region = rid};
  Deliver(2, again);
  EXPECT_FALSE(ToldLost(2, page)) << "a's page was handed on before its death was stored";

  // The hand-over: b, asking again, is told the page's only copy died with
  // a (the directory waits for that, or for b's Done had the data come).
  faults_.FailWrites(false);
  Status st = Flush();
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(ToldLost(2, page)) << "the hand-over is still held once the disk works";

  ASSERT_TRUE(Restart().ok());
  std::vector<proto::NodeEntry> nodes = Nodes();
  auto stored_a = std::find_if(nodes.begin(), nodes.end(),
                               [&](const proto::NodeEntry& n) { return n.node == a; });
  ASSERT_NE(stored_a, nodes.end());
  EXPECT_EQ(stored_a->live, 0) << "node " << a << " is stored live with its pages handed on";
  st = StatusOf(JoinRequest(1, a, /*resume=*/1));
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition)
      << "node " << a << " resumed with a stale copy of page " << page << ": " << st.ToString();
}

}  // namespace
}  // namespace dsvm::coordinator
