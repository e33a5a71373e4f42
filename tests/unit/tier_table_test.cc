// Tests of node::TierTable (GPU-tier placement): exact step sequences for
// residency, NFU-aging eviction, pins, write-backs, invalidation and the
// host budget.
#include "node/memory/tier_table.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <ostream>
#include <vector>

#include "proto/status.h"

namespace dsvm::node {

// Readable failures: "WriteBack(0x10001000 gpu 0)".
void PrintTo(const TierStep& s, std::ostream* os) {
  static const char* const kNames[] = {"Invalid",   "AllocateSlot", "CopyToDevice",
                                       "WriteBack", "FreeSlot",     "LeaveNode"};
  *os << kNames[static_cast<int>(s.kind)] << "(0x" << std::hex << s.page << std::dec;
  if (s.gpu != kNoGpu) *os << " gpu " << s.gpu;
  *os << ")";
}

namespace {

constexpr PageAddr kBase = 0x10000000;
constexpr uint32_t kPage = 4096;
constexpr uint64_t kRegionPages = 64;

PageAddr P(uint64_t i) { return kBase + i * kPage; }

TierStep Alloc(uint64_t i, uint32_t gpu = 0) { return {TierStepKind::kAllocateSlot, P(i), gpu}; }
TierStep Copy(uint64_t i, uint32_t gpu = 0) { return {TierStepKind::kCopyToDevice, P(i), gpu}; }
TierStep WriteBack(uint64_t i, uint32_t gpu = 0) { return {TierStepKind::kWriteBack, P(i), gpu}; }
TierStep Free(uint64_t i, uint32_t gpu = 0) { return {TierStepKind::kFreeSlot, P(i), gpu}; }
TierStep Leave(uint64_t i) { return {TierStepKind::kLeaveNode, P(i), kNoGpu}; }

// Two GPUs with 4 slots of 4 KiB each; one region of 64 pages.
class TierTableTest : public testing::Test {
 protected:
  void SetUp() override { Make(/*host_budget_pages=*/0, /*aging_period=*/1000); }

  void Make(uint64_t host_budget_pages, uint64_t aging_period) {
    TierTableOptions o;
    o.host_budget_bytes = host_budget_pages * kPage;
    o.aging_period = aging_period;
    auto t = TierTable::Create(o);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    table_ = std::move(t).value();
    ASSERT_TRUE(table_->AddRegion(kBase, kRegionPages * kPage, kPage).ok());
    for (uint32_t gpu : {0u, 1u}) ASSERT_TRUE(table_->AddPool(gpu, kBase, 4).ok());
    tick_ = 0;
  }

  // MakeResident of pages P(i) on `gpu` at the next tick; returns its steps.
  TierSteps Resident(std::vector<uint64_t> idx, uint32_t gpu = 0, bool write = false,
                     bool pin = false) {
    std::vector<PageAddr> pages;
    for (uint64_t i : idx) pages.push_back(P(i));
    TierSteps out;
    Status s = table_->MakeResident(pages, gpu, write, pin, ++tick_, &out);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out;
  }
  Status TryResident(std::vector<uint64_t> idx, uint32_t gpu = 0, bool pin = false) {
    std::vector<PageAddr> pages;
    for (uint64_t i : idx) pages.push_back(P(i));
    TierSteps out;
    Status s = table_->MakeResident(pages, gpu, false, pin, ++tick_, &out);
    EXPECT_TRUE(out.empty()) << "a refused call left steps";
    return s;
  }
  // Accesses page i once more, at the next tick.
  void Touch(uint64_t i) { ASSERT_TRUE(table_->Touch(P(i), ++tick_).ok()); }
  TierSteps AddHost(uint64_t i) {
    TierSteps out;
    Status s = table_->AddHostPage(P(i), ++tick_, &out);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out;
  }

  std::unique_ptr<TierTable> table_;
  uint64_t tick_ = 0;
};

using Steps = TierSteps;

TEST_F(TierTableTest, FirstResidencyAllocatesAndCopies) {
  EXPECT_EQ(Resident({0, 1}), (Steps{Alloc(0), Copy(0), Alloc(1), Copy(1)}));
  EXPECT_EQ(table_->GpuOf(P(0)), 0u);
  EXPECT_EQ(table_->GpuOf(P(1)), 0u);
  EXPECT_FALSE(table_->IsDirty(P(0)));
  EXPECT_EQ(table_->used_slots(table_->PoolIndex(0, kBase)), 2u);
  EXPECT_EQ(table_->page_count(), 2u);
  EXPECT_EQ(table_->host_bytes(), 2u * kPage);  // host is inclusive
  EXPECT_EQ(table_->stats().misses, 2u);
  EXPECT_EQ(table_->stats().copies_to_device, 2u);
}

// A page whose slot the caller keeps (a lost gpu map's) leaves the table
// without a kFreeSlot, and its slot stays counted until released: the pool
// makes room elsewhere meanwhile.
TEST_F(TierTableTest, AHeldSlotStaysUsedUntilReleased) {
  Resident({1, 2}, 0, /*write=*/true, /*pin=*/true);
  TierSteps out;
  EXPECT_EQ(table_->DropHoldingSlot(P(5), &out).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(table_->DropHoldingSlot(P(1), &out).ok());
  EXPECT_TRUE(out.empty()) << "no free, no write-back";
  EXPECT_FALSE(table_->Holds(P(1)));
  const int pool = table_->PoolIndex(0, kBase);
  EXPECT_EQ(table_->used_slots(pool), 2u);
  EXPECT_EQ(table_->held_slots(pool), 1u);
  // Four slots: one held, one pinned (page 2): two pages fit, the third
  // evicts the coldest of them, never the held slot.
  Resident({10, 11});
  EXPECT_EQ(Resident({12}), (TierSteps{Free(10), Alloc(12), Copy(12)}));
  EXPECT_EQ(TryResident({20, 21, 22}, 0, /*pin=*/true).code(), StatusCode::kResourceExhausted);
  ASSERT_TRUE(table_->ReleaseHeldSlot(pool).ok());
  EXPECT_EQ(table_->held_slots(pool), 0u);
  EXPECT_EQ(table_->used_slots(pool), 3u);
  EXPECT_EQ(Resident({13}), (TierSteps{Alloc(13), Copy(13)}));  // the released slot
  EXPECT_EQ(table_->ReleaseHeldSlot(pool).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(table_->ReleaseHeldSlot(7).code(), StatusCode::kInvalidArgument);
}

TEST_F(TierTableTest, AResidentPageCostsNothing) {
  Resident({0, 1});
  EXPECT_EQ(Resident({1, 0}), Steps{});
  // Writing to a resident page only marks it dirty.
  EXPECT_EQ(Resident({0}, 0, /*write=*/true), Steps{});
  EXPECT_TRUE(table_->IsDirty(P(0)));
  EXPECT_EQ(table_->stats().hits, 3u);
  EXPECT_EQ(table_->AccessCount(P(0)), 3u);
}

// NFU: the page with the fewest accesses goes, even when it is the most
// recent one; a stream of pages touched once does not flush hot pages.
TEST_F(TierTableTest, EvictsTheLeastFrequentlyUsed) {
  Resident({0, 1, 2, 3});  // one access each
  Touch(0);
  Touch(0);  // P0: 3
  Touch(2);  // P2: 2
  Touch(3);  // P3: 2, more recent than P2

  // P1 had 1 access.
  EXPECT_EQ(Resident({4}), (Steps{Free(1), Alloc(4), Copy(4)}));
  // P4 has 1 access now: it goes before P2 and P3, though it is the newest.
  EXPECT_EQ(Resident({5}), (Steps{Free(4), Alloc(5), Copy(5)}));
  Touch(5);  // P5: 2, like P2 and P3; P2 is the least recent of them
  EXPECT_EQ(Resident({6}), (Steps{Free(2), Alloc(6), Copy(6)}));
  EXPECT_EQ(table_->GpuOf(P(0)), 0u);  // the hot page stayed throughout
  EXPECT_EQ(table_->stats().evictions, 3u);
  EXPECT_EQ(table_->stats().clean_evictions, 3u);
}

TEST_F(TierTableTest, EqualCountsEvictTheLeastRecentlyUsed) {
  Resident({0});
  Resident({1});
  Resident({2});
  Resident({3});
  EXPECT_EQ(Resident({4}), (Steps{Free(0), Alloc(4), Copy(4)}));
  Touch(1);  // P1: 2
  EXPECT_EQ(Resident({5}), (Steps{Free(2), Alloc(5), Copy(5)}));
  // Pages of one call share a tick: the lower address goes first.
  Make(0, 1000);
  Resident({3, 2, 1, 0});
  EXPECT_EQ(Resident({4}), (Steps{Free(0), Alloc(4), Copy(4)}));
}

// Every aging period halves the counters: a page hot long ago cools down and
// loses to pages that are warm now.
TEST_F(TierTableTest, AgingLetsFormerlyHotPagesCoolDown) {
  Make(0, /*aging_period=*/10);
  Resident({0, 1, 2, 3});                // ticks 1: counts 1
  for (int k = 0; k < 3; ++k) Touch(0);  // ticks 2-4: P0 4
  Touch(1), Touch(2), Touch(3);          // ticks 5-7: P1..P3 2
  EXPECT_EQ(table_->AccessCount(P(0)), 4u);
  tick_ = 20;                                // two periods later
  Touch(1), Touch(2), Touch(3);              // ticks 21-23
  EXPECT_EQ(table_->AccessCount(P(0)), 1u);  // 4 >> 2
  EXPECT_EQ(table_->AccessCount(P(1)), 1u);  // (2 >> 2) + 1
  // Without aging P0 (4) would stay and P1 (3) would go.
  EXPECT_EQ(Resident({4}), (Steps{Free(0), Alloc(4), Copy(4)}));
}

TEST_F(TierTableTest, CleanVictimsAreDroppedDirtyOnesWrittenBackFirst) {
  Resident({0}, 0, /*write=*/true);
  Resident({1, 2, 3});
  EXPECT_TRUE(table_->IsDirty(P(0)));
  EXPECT_EQ(Resident({4}), (Steps{WriteBack(0), Free(0), Alloc(4), Copy(4)}));
  EXPECT_FALSE(table_->GpuOf(P(0)).has_value());
  EXPECT_FALSE(table_->IsDirty(P(0)));
  EXPECT_TRUE(table_->Holds(P(0)));  // still on the node, in host DRAM
  EXPECT_EQ(Resident({5}), (Steps{Free(1), Alloc(5), Copy(5)}));
  EXPECT_EQ(table_->stats().evictions, 2u);
  EXPECT_EQ(table_->stats().clean_evictions, 1u);
  EXPECT_EQ(table_->stats().writebacks, 1u);
  // Back on the GPU, the evicted page is copied again from host.
  EXPECT_EQ(Resident({0}), (Steps{Free(2), Alloc(0), Copy(0)}));
}

TEST_F(TierTableTest, PinnedPagesAreNeverChosen) {
  Resident({0}, 0, false, /*pin=*/true);  // the coldest page, but pinned
  Resident({1, 2, 3});
  Touch(2), Touch(3);
  EXPECT_EQ(table_->PinsOf(P(0)), 1u);
  EXPECT_EQ(Resident({4}), (Steps{Free(1), Alloc(4), Copy(4)}));
  EXPECT_EQ(Resident({5}), (Steps{Free(4), Alloc(5), Copy(5)}));
  ASSERT_TRUE(table_->Unpin(P(0)).ok());
  EXPECT_EQ(table_->PinsOf(P(0)), 0u);
  EXPECT_EQ(Resident({6}), (Steps{Free(0), Alloc(6), Copy(6)}));
  EXPECT_EQ(table_->Unpin(P(0)).code(), StatusCode::kFailedPrecondition);
}

TEST_F(TierTableTest, PinsCountEachMap) {
  Resident({0}, 0, false, true);
  Resident({0}, 0, false, true);
  EXPECT_EQ(table_->PinsOf(P(0)), 2u);
  Resident({1, 2, 3});
  ASSERT_TRUE(table_->Unpin(P(0)).ok());
  EXPECT_EQ(Resident({4}), (Steps{Free(1), Alloc(4), Copy(4)}));  // P0 still pinned once
  ASSERT_TRUE(table_->Unpin(P(0)).ok());
  Touch(2), Touch(3), Touch(4);  // P0 (2 accesses) is now the coldest
  EXPECT_EQ(Resident({5}), (Steps{Free(0), Alloc(5), Copy(5)}));
}

TEST_F(TierTableTest, EverythingPinnedIsExhaustedAndChangesNothing) {
  Resident({0, 1, 2, 3}, 0, false, /*pin=*/true);
  const TierTableStats before = table_->stats();
  Status s = TryResident({4});
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  EXPECT_NE(s.message().find("pinned"), std::string::npos) << s.message();
  EXPECT_FALSE(table_->Holds(P(4)));
  EXPECT_EQ(table_->stats().misses, before.misses);
  // A batch larger than the pool is refused whole, even with room for part.
  ASSERT_TRUE(table_->Unpin(P(0)).ok());
  ASSERT_TRUE(table_->Unpin(P(1)).ok());
  EXPECT_EQ(TryResident({4, 5, 6}).code(), StatusCode::kResourceExhausted);
  EXPECT_FALSE(table_->Holds(P(4)));
  EXPECT_EQ(table_->GpuOf(P(0)), 0u);
  EXPECT_EQ(Resident({4, 5}), (Steps{Free(0), Alloc(4), Copy(4), Free(1), Alloc(5), Copy(5)}));
  // The other GPU has its own budget.
  EXPECT_EQ(Resident({10}, 1), (Steps{Alloc(10, 1), Copy(10, 1)}));
}

// Pages of one call are never victims for one another: the resident ones
// are hits and the others take the remaining pages' slots.
TEST_F(TierTableTest, PagesOfOneCallAreNotEachOthersVictims) {
  Resident({0, 1, 2, 3});
  EXPECT_EQ(Resident({2, 3, 4, 5}),
            (Steps{Free(0), Alloc(4), Copy(4), Free(1), Alloc(5), Copy(5)}));
  // The whole pool in one call: every other page goes, P4 and P5 (one
  // access) before P2 and P3 (two).
  EXPECT_EQ(Resident({6, 7, 8, 9}),
            (Steps{Free(4), Alloc(6), Copy(6), Free(5), Alloc(7), Copy(7), Free(2), Alloc(8),
                   Copy(8), Free(3), Alloc(9), Copy(9)}));
}

TEST_F(TierTableTest, InvalidationDropsTheGpuCopyWithoutWriteBack) {
  Resident({0}, 0, /*write=*/true, /*pin=*/true);
  Resident({1});
  TierSteps out;
  ASSERT_TRUE(table_->Drop(P(0), &out).ok());
  EXPECT_EQ(out, (Steps{Free(0)}));  // dirty and pinned: coherence wins
  EXPECT_FALSE(table_->Holds(P(0)));
  EXPECT_EQ(table_->used_slots(table_->PoolIndex(0, kBase)), 1u);
  EXPECT_EQ(table_->host_bytes(), 1u * kPage);
  EXPECT_EQ(table_->stats().writebacks, 0u);
  out.clear();
  ASSERT_TRUE(table_->Drop(P(0), &out).ok());  // not held: nothing
  ASSERT_TRUE(table_->Drop(P(7), &out).ok());
  EXPECT_TRUE(out.empty());
  // A host-only page leaves without steps.
  AddHost(8);
  ASSERT_TRUE(table_->Drop(P(8), &out).ok());
  EXPECT_TRUE(out.empty());
  EXPECT_FALSE(table_->Holds(P(8)));
}

TEST_F(TierTableTest, AReadForSendWritesBackADirtyCopyAndKeepsIt) {
  Resident({0}, 0, /*write=*/true);
  Resident({1, 2, 3});
  TierSteps out;
  ASSERT_TRUE(table_->PrepareHostRead(P(0), &out).ok());
  EXPECT_EQ(out, (Steps{WriteBack(0)}));
  EXPECT_EQ(table_->GpuOf(P(0)), 0u);
  EXPECT_FALSE(table_->IsDirty(P(0)));
  out.clear();
  ASSERT_TRUE(table_->PrepareHostRead(P(0), &out).ok());  // clean now
  ASSERT_TRUE(table_->PrepareHostRead(P(1), &out).ok());  // never dirty
  ASSERT_TRUE(table_->PrepareHostRead(P(9), &out).ok());  // not held
  EXPECT_TRUE(out.empty());
  // Evicting it later costs no copy.
  EXPECT_EQ(Resident({4}), (Steps{Free(0), Alloc(4), Copy(4)}));
  EXPECT_EQ(table_->stats().writebacks, 1u);
}

TEST_F(TierTableTest, MovingBetweenGpusWritesBackOnTheWay) {
  Resident({0}, 0, /*write=*/true);
  EXPECT_EQ(Resident({0}, 1), (Steps{WriteBack(0, 0), Free(0, 0), Alloc(0, 1), Copy(0, 1)}));
  EXPECT_EQ(table_->GpuOf(P(0)), 1u);
  EXPECT_FALSE(table_->IsDirty(P(0)));
  EXPECT_EQ(table_->used_slots(table_->PoolIndex(0, kBase)), 0u);
  EXPECT_EQ(table_->stats().moves, 1u);
  Resident({0}, 1, false, /*pin=*/true);
  EXPECT_EQ(TryResident({0}, 0).code(), StatusCode::kFailedPrecondition);
}

TEST_F(TierTableTest, HostBudgetFullReportsPagesToLeaveTheNode) {
  Make(/*host_budget_pages=*/4, 1000);
  EXPECT_EQ(AddHost(0), Steps{});
  AddHost(1);
  AddHost(2);
  EXPECT_EQ(Resident({3}, 0, /*write=*/true), (Steps{Alloc(3), Copy(3)}));
  EXPECT_EQ(table_->host_bytes(), 4u * kPage);
  // A fifth page: the coldest page with no GPU copy leaves.
  EXPECT_EQ(AddHost(4), (Steps{Leave(0)}));
  EXPECT_TRUE(table_->IsLeaving(P(0)));
  EXPECT_EQ(AddHost(4), Steps{});  // held already: an access, nothing more
  EXPECT_EQ(TryResident({0}).code(), StatusCode::kFailedPrecondition);  // it is on its way out
  TierSteps out;
  ASSERT_TRUE(table_->Drop(P(0), &out).ok());  // coherence took it
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(AddHost(5), (Steps{Leave(1)}));
  // The agent refused to evict: the page stays, and is chosen again later.
  ASSERT_TRUE(table_->KeepOnNode(P(1)).ok());
  EXPECT_FALSE(table_->IsLeaving(P(1)));
  EXPECT_EQ(table_->KeepOnNode(P(1)).code(), StatusCode::kFailedPrecondition);
  // P1..P5 were over budget since; P6 makes two too many.
  EXPECT_EQ(AddHost(6), (Steps{Leave(1), Leave(2)}));
  EXPECT_EQ(table_->stats().leaves, 4u);
}

TEST_F(TierTableTest, HostBudgetSendsGpuPagesOnlyWhenNoHostOnlyPageIsLeft) {
  Make(/*host_budget_pages=*/2, 1000);
  Resident({0}, 0, /*write=*/true);
  Resident({1}, 0, false, /*pin=*/true);
  // The page being added is never the one sent away; the unpinned GPU page
  // goes, written back first.
  EXPECT_EQ(AddHost(2), (Steps{WriteBack(0), Free(0), Leave(0)}));
  EXPECT_FALSE(table_->GpuOf(P(0)).has_value());
  // MakeResident admits pages too, and keeps its own pages.
  EXPECT_EQ(Resident({3}), (Steps{Alloc(3), Copy(3), Leave(2)}));
  // Everything else pinned or leaving: over budget, counted, nothing to do.
  Resident({3}, 0, false, true);
  EXPECT_EQ(AddHost(4), Steps{});
  EXPECT_EQ(table_->stats().host_over_budget, 1u);
}

TEST_F(TierTableTest, UnplaceRollsBackAPlacement) {
  Resident({0}, 0, /*write=*/true, /*pin=*/true);
  EXPECT_EQ(table_->Unplace(P(0), 2).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(table_->Unplace(P(0), 1).ok());
  EXPECT_FALSE(table_->GpuOf(P(0)).has_value());
  EXPECT_FALSE(table_->IsDirty(P(0)));
  EXPECT_EQ(table_->PinsOf(P(0)), 0u);
  EXPECT_EQ(table_->used_slots(table_->PoolIndex(0, kBase)), 0u);
  EXPECT_EQ(table_->Unplace(P(0), 0).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(Resident({0}), (Steps{Alloc(0), Copy(0)}));
}

// A write-back a store refused: the evicted page is on its GPU again,
// dirty, in the slot it never left, and evictable as before.
TEST_F(TierTableTest, KeepDirtyOnGpuUndoesAnEvictionsWriteBack) {
  Resident({0}, 0, /*write=*/true);
  const int pool = table_->PoolIndex(0, kBase);
  TierSteps out;
  ASSERT_TRUE(table_->EvictFromGpu(P(0), &out).ok());
  EXPECT_EQ(out, (Steps{WriteBack(0), Free(0)}));
  EXPECT_EQ(table_->used_slots(pool), 0u);
  ASSERT_TRUE(table_->KeepDirtyOnGpu(P(0), 0).ok());
  EXPECT_EQ(table_->GpuOf(P(0)), 0u);
  EXPECT_TRUE(table_->IsDirty(P(0)));
  EXPECT_EQ(table_->used_slots(pool), 1u);
  EXPECT_EQ(table_->evictable_slots(pool), 1u);
  // Again (a resend of the same failure) changes nothing more.
  ASSERT_TRUE(table_->KeepDirtyOnGpu(P(0), 0).ok());
  EXPECT_EQ(table_->used_slots(pool), 1u);
  // A write-back for a host read: the copy stays dirty.
  out.clear();
  ASSERT_TRUE(table_->PrepareHostRead(P(0), &out).ok());
  EXPECT_FALSE(table_->IsDirty(P(0)));
  ASSERT_TRUE(table_->KeepDirtyOnGpu(P(0), 0).ok());
  EXPECT_TRUE(table_->IsDirty(P(0)));
  // Refusals: on another GPU, not held, not a page.
  EXPECT_EQ(table_->KeepDirtyOnGpu(P(0), 1).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(table_->KeepDirtyOnGpu(P(1), 0).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(table_->KeepDirtyOnGpu(P(0) + 1, 0).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(table_->KeepDirtyOnGpu(P(0), 7).code(), StatusCode::kInvalidArgument);
}

// A page the host budget sent away whose write-back failed stays.
TEST_F(TierTableTest, KeepDirtyOnGpuKeepsALeavingPage) {
  Make(/*host_budget_pages=*/1, /*aging_period=*/1000);
  Resident({0}, 0, /*write=*/true);
  EXPECT_EQ(AddHost(1), (Steps{WriteBack(0), Free(0), Leave(0)}));
  EXPECT_TRUE(table_->IsLeaving(P(0)));
  ASSERT_TRUE(table_->KeepDirtyOnGpu(P(0), 0).ok());
  EXPECT_FALSE(table_->IsLeaving(P(0)));
  EXPECT_EQ(table_->GpuOf(P(0)), 0u);
  EXPECT_TRUE(table_->IsDirty(P(0)));
}

TEST_F(TierTableTest, RemoveRegionFreesItsGpuCopiesWithoutWriteBack) {
  ASSERT_TRUE(table_->AddRegion(0x20000000, 16 * kPage, kPage).ok());
  ASSERT_TRUE(table_->AddPool(0, 0x20000000, 4).ok());
  Resident({0}, 0, /*write=*/true);
  TierSteps out;
  std::vector<PageAddr> other = {0x20000000 + kPage, 0x20000000};
  ASSERT_TRUE(table_->MakeResident(other, 0, true, true, ++tick_, &out).ok());
  out.clear();
  ASSERT_TRUE(table_->RemoveRegion(0x20000000, &out).ok());
  EXPECT_EQ(out, (Steps{{TierStepKind::kFreeSlot, 0x20000000, 0},
                        {TierStepKind::kFreeSlot, 0x20000000 + kPage, 0}}));
  EXPECT_EQ(table_->page_count(), 1u);
  EXPECT_EQ(table_->RemoveRegion(0x20000000, &out).code(), StatusCode::kNotFound);
  EXPECT_EQ(table_->Touch(0x20000000, tick_).code(), StatusCode::kInvalidArgument);
}

TEST_F(TierTableTest, RefusesBadPagesAndArguments) {
  const auto kInvalid = StatusCode::kInvalidArgument;
  TierSteps out;
  auto resident = [&](std::vector<PageAddr> pages, uint32_t gpu = 0) {
    return table_->MakeResident(pages, gpu, false, false, ++tick_, &out).code();
  };
  EXPECT_EQ(resident({kBase - kPage}), kInvalid);     // before the region
  EXPECT_EQ(resident({P(kRegionPages)}), kInvalid);   // after it
  EXPECT_EQ(resident({P(1) + 8}), kInvalid);          // not a page start
  EXPECT_EQ(resident({P(1), P(2), P(1)}), kInvalid);  // twice
  EXPECT_EQ(resident({P(1)}, /*gpu=*/2), kInvalid);   // no such pool
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(table_->page_count(), 0u);
  EXPECT_EQ(table_->Unpin(P(1) + 1).code(), kInvalid);
  EXPECT_EQ(table_->Touch(P(1), tick_).code(), StatusCode::kNotFound);
  EXPECT_EQ(table_->Drop(0, &out).code(), kInvalid);
  EXPECT_EQ(table_->PrepareHostRead(0, &out).code(), kInvalid);
  EXPECT_EQ(table_->AddHostPage(P(1) + 1, tick_, &out).code(), kInvalid);
  // Regions.
  EXPECT_EQ(table_->AddRegion(kBase + kPage, kPage, kPage).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(table_->AddRegion(kBase - kPage, 2 * kPage, kPage).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(table_->AddRegion(0x40000000, 0, kPage).code(), kInvalid);
  EXPECT_EQ(table_->AddRegion(0x40000000 + 4096, 2u << 20, 2u << 20).code(), kInvalid);
  EXPECT_EQ(table_->AddRegion(0x40000000, kPage, 8192).code(), kInvalid);
  // Pools.
  EXPECT_EQ(table_->AddPool(0, kBase, 4).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(table_->AddPool(2, kBase + kPage, 4).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(table_->PoolIndex(2, kBase), -1);
  EXPECT_EQ(table_->HoldFreeSlots(-1, 1).code(), kInvalid);
  EXPECT_EQ(table_->HoldFreeSlots(table_->PoolIndex(0, kBase), 5).code(),
            StatusCode::kResourceExhausted);
  // Options.
  TierTableOptions o;
  EXPECT_TRUE(TierTable::Create(o).ok());
  o.aging_period = 0;
  EXPECT_EQ(TierTable::Create(o).status().code(), kInvalid);
}

// Each region has a pool of its own on a GPU: one region's pages never
// take (or evict for) another's slots; a removed region's pool takes no
// page, and keeps counting the slots held in it until they are released.
TEST(TierTableRegionPoolsTest, EachRegionHasItsOwnPool) {
  TierTableOptions o;
  auto t = TierTable::Create(o);
  ASSERT_TRUE(t.ok());
  TierTable& table = **t;
  ASSERT_TRUE(table.AddRegion(kBase, 16 * kPage, kPage).ok());
  ASSERT_TRUE(table.AddRegion(0x40000000, 4u << 20, 2u << 20).ok());
  ASSERT_TRUE(table.AddPool(0, kBase, 1).ok());
  ASSERT_TRUE(table.AddPool(0, 0x40000000, 1).ok());
  TierSteps out;
  std::vector<PageAddr> small = {kBase}, huge = {0x40000000};
  ASSERT_TRUE(table.MakeResident(small, 0, false, false, 1, &out).ok());
  ASSERT_TRUE(table.MakeResident(huge, 0, false, false, 2, &out).ok());
  EXPECT_EQ(out, (Steps{Alloc(0),
                        Copy(0),
                        {TierStepKind::kAllocateSlot, 0x40000000, 0},
                        {TierStepKind::kCopyToDevice, 0x40000000, 0}}));
  EXPECT_EQ(table.host_bytes(), kPage + (2u << 20));
  // The 4 KiB region's pool is full: its next page evicts its own first
  // page, not the other region's.
  out.clear();
  std::vector<PageAddr> next = {kBase + kPage};
  ASSERT_TRUE(table.MakeResident(next, 0, false, false, 3, &out).ok());
  EXPECT_EQ(out, (Steps{Free(0), Alloc(1), Copy(1)}));
  EXPECT_EQ(table.GpuOf(0x40000000), 0u);
  // A slot held in the 2 MiB region's pool outlives its region.
  out.clear();
  const int huge_pool = table.PoolIndex(0, 0x40000000);
  ASSERT_TRUE(table.DropHoldingSlot(0x40000000, &out).ok());
  ASSERT_TRUE(table.RemoveRegion(0x40000000, &out).ok());
  EXPECT_EQ(table.PoolIndex(0, 0x40000000), -1);
  EXPECT_EQ(table.used_slots(huge_pool), 1u);
  EXPECT_EQ(table.HoldFreeSlots(huge_pool, 0).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(table.ReleaseHeldSlot(huge_pool).ok());
  EXPECT_EQ(table.used_slots(huge_pool), 0u);
}

}  // namespace
}  // namespace dsvm::node
