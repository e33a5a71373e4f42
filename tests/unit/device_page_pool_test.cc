// Tests of node::DevicePagePool (page slots under an HBM budget) on the
// emulated device backend.
#include "node/memory/device_page_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "node/memory/device_backend.h"
#include "proto/status.h"

namespace dsvm::node {
namespace {

std::unique_ptr<DeviceBackend> Emulated(uint64_t device_bytes = 1ull << 30, uint32_t devices = 1) {
  DeviceBackendOptions o;
  o.emulated_devices = devices;
  o.emulated_device_bytes = device_bytes;
  auto b = MakeDeviceBackend("emulated", o);
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return std::move(b).value();
}

std::unique_ptr<DevicePagePool> Pool(DeviceBackend* backend, DevicePagePoolOptions o) {
  auto p = DevicePagePool::Create(backend, o);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return p.ok() ? std::move(p).value() : nullptr;
}

bool InsideAnArena(const DevicePagePool& pool, DevicePtr p, uint64_t bytes) {
  for (const DeviceArena& a : pool.arenas()) {
    if (p >= a.base && p - a.base + bytes <= a.bytes) return true;
  }
  return false;
}

// One suite per page size: arenas of 4 pages, a budget of 10 pages (plus a
// fraction of a page, which the pool rounds away), so the pool ends with
// arenas of 4, 4 and 2 pages.
class DevicePagePoolTest : public testing::TestWithParam<uint32_t> {
 protected:
  void SetUp() override {
    page_ = GetParam();
    backend_ = Emulated();
    DevicePagePoolOptions o;
    o.page_size = page_;
    o.arena_bytes = 4ull * page_;
    o.budget_bytes = 10ull * page_ + page_ / 2;
    pool_ = Pool(backend_.get(), o);
    ASSERT_NE(pool_, nullptr);
  }

  std::vector<DeviceSlot> AllocateAll() {
    std::vector<DeviceSlot> slots;
    for (;;) {
      auto s = pool_->Allocate();
      if (!s.ok()) {
        EXPECT_EQ(s.status().code(), StatusCode::kResourceExhausted) << s.status().ToString();
        return slots;
      }
      slots.push_back(*s);
    }
  }

  uint32_t page_ = 0;
  std::unique_ptr<DeviceBackend> backend_;
  std::unique_ptr<DevicePagePool> pool_;
};

TEST_P(DevicePagePoolTest, StartsEmptyAndRoundsTheBudgetDown) {
  EXPECT_EQ(pool_->budget_bytes(), 10ull * page_);
  EXPECT_EQ(pool_->capacity_slots(), 10u);
  EXPECT_EQ(pool_->used_slots(), 0u);
  EXPECT_EQ(pool_->arena_count(), 0u);
  EXPECT_EQ(pool_->arena_bytes(), 0u);
  EXPECT_EQ(backend_->arena_count(), 0u);
}

TEST_P(DevicePagePoolTest, GrowsArenasOnDemandUpToTheBudget) {
  auto s = pool_->Allocate();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(pool_->arena_count(), 1u);
  EXPECT_EQ(pool_->arena_bytes(), 4ull * page_);
  for (int i = 1; i < 4; ++i) ASSERT_TRUE(pool_->Allocate().ok());
  EXPECT_EQ(pool_->arena_count(), 1u);
  ASSERT_TRUE(pool_->Allocate().ok());
  EXPECT_EQ(pool_->arena_count(), 2u);
  std::vector<DeviceSlot> rest = AllocateAll();
  EXPECT_EQ(rest.size(), 5u);
  EXPECT_EQ(pool_->arena_count(), 3u);
  // The last arena is cut to the budget.
  EXPECT_EQ(pool_->arenas()[2].bytes, 2ull * page_);
  EXPECT_EQ(pool_->arena_bytes(), pool_->budget_bytes());
  EXPECT_EQ(backend_->arena_bytes(0), pool_->budget_bytes());
  EXPECT_EQ(pool_->used_slots(), 10u);
  EXPECT_EQ(pool_->used_bytes(), 10ull * page_);
}

TEST_P(DevicePagePoolTest, SlotsAreDistinctAndInsideArenas) {
  std::vector<DeviceSlot> slots = AllocateAll();
  ASSERT_EQ(slots.size(), 10u);
  std::set<DevicePtr> ptrs;
  std::set<uint32_t> indexes;
  for (const DeviceSlot& s : slots) {
    EXPECT_TRUE(InsideAnArena(*pool_, s.ptr, page_)) << s.ptr;
    ptrs.insert(s.ptr);
    indexes.insert(s.index);
  }
  EXPECT_EQ(ptrs.size(), slots.size());
  EXPECT_EQ(indexes.size(), slots.size());
  // Slots do not overlap: sorted addresses are at least a page apart.
  DevicePtr prev = 0;
  for (DevicePtr p : ptrs) {
    if (prev != 0) {
      EXPECT_GE(p - prev, page_);
    }
    prev = p;
  }
}

TEST_P(DevicePagePoolTest, BudgetExhaustionAndRecoveryAfterFree) {
  std::vector<DeviceSlot> slots = AllocateAll();
  ASSERT_EQ(slots.size(), 10u);
  auto more = pool_->Allocate();
  EXPECT_EQ(more.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(more.status().message().find("budget"), std::string::npos) << more.status().message();
  ASSERT_TRUE(pool_->Free(slots[3]).ok());
  EXPECT_EQ(pool_->used_slots(), 9u);
  auto again = pool_->Allocate();
  ASSERT_TRUE(again.ok());
  // The freed slot comes back; no arena was added.
  EXPECT_EQ(again->ptr, slots[3].ptr);
  EXPECT_EQ(again->index, slots[3].index);
  EXPECT_EQ(pool_->arena_count(), 3u);
  EXPECT_EQ(pool_->Allocate().status().code(), StatusCode::kResourceExhausted);
}

TEST_P(DevicePagePoolTest, ReusesTheLastFreedSlotFirst) {
  std::vector<DeviceSlot> slots;
  for (int i = 0; i < 6; ++i) slots.push_back(*pool_->Allocate());
  ASSERT_TRUE(pool_->Free(slots[1]).ok());
  ASSERT_TRUE(pool_->Free(slots[4]).ok());
  EXPECT_EQ(pool_->Allocate()->ptr, slots[4].ptr);
  EXPECT_EQ(pool_->Allocate()->ptr, slots[1].ptr);
  // Then fresh slots again, without another arena.
  auto fresh = pool_->Allocate();
  ASSERT_TRUE(fresh.ok());
  for (const DeviceSlot& s : slots) EXPECT_NE(fresh->ptr, s.ptr);
  EXPECT_EQ(pool_->arena_count(), 2u);
}

TEST_P(DevicePagePoolTest, FreeRefusesWhatIsNotASlotInUse) {
  auto a = pool_->Allocate();
  auto b = pool_->Allocate();
  ASSERT_TRUE(a.ok() && b.ok());
  const auto kInvalid = StatusCode::kInvalidArgument;
  EXPECT_EQ(pool_->Free(DeviceSlot{a->ptr, 3}).code(), kInvalid);             // never carved
  EXPECT_EQ(pool_->Free(DeviceSlot{a->ptr, 1000}).code(), kInvalid);          // out of range
  EXPECT_EQ(pool_->Free(DeviceSlot{a->ptr + 1, a->index}).code(), kInvalid);  // wrong address
  EXPECT_EQ(pool_->Free(DeviceSlot{b->ptr, a->index}).code(), kInvalid);      // mismatched
  ASSERT_TRUE(pool_->Free(*a).ok());
  EXPECT_EQ(pool_->Free(*a).code(), kInvalid);  // double free
  EXPECT_EQ(pool_->used_slots(), 1u);
}

// Bytes written to each slot through the backend stay in that slot.
TEST_P(DevicePagePoolTest, SlotsHoldTheirOwnBytes) {
  std::vector<DeviceSlot> slots = AllocateAll();
  ASSERT_EQ(slots.size(), 10u);
  auto stream = backend_->CreateStream(0);
  ASSERT_TRUE(stream.ok());
  std::vector<std::vector<uint8_t>> in(slots.size()), out(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    in[i].assign(page_, static_cast<uint8_t>(0x10 + i));
    in[i][0] = static_cast<uint8_t>(i);  // distinct edges too
    in[i][page_ - 1] = static_cast<uint8_t>(0xf0 + i);
    out[i].assign(page_, 0);
    ASSERT_TRUE(backend_->CopyToDevice(*stream, in[i].data(), slots[i].ptr, page_).ok());
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    ASSERT_TRUE(backend_->CopyToHost(*stream, slots[i].ptr, out[i].data(), page_).ok());
  }
  auto f = backend_->RecordFence(*stream);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(backend_->Wait(*f).ok());
  for (size_t i = 0; i < slots.size(); ++i) EXPECT_EQ(out[i], in[i]) << "slot " << i;
}

// A run is n adjacent slots of one arena: consecutive indexes, each one
// page after the last.
TEST_P(DevicePagePoolTest, ARunIsAdjacentSlotsOfOneArena) {
  auto run = pool_->AllocateRun(3);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  EXPECT_EQ(pool_->used_slots(), 3u);
  EXPECT_EQ(pool_->arena_count(), 1u);
  for (uint32_t i = 0; i < 3; ++i) {
    EXPECT_FALSE(pool_->IsFree(run->index + i));
    EXPECT_EQ(pool_->SlotAt(run->index + i).ptr, run->ptr + uint64_t{i} * page_);
  }
  EXPECT_TRUE(InsideAnArena(*pool_, run->ptr, 3ull * page_));
  // The arena has one slot left: a run of 2 needs a second arena.
  auto two = pool_->AllocateRun(2);
  ASSERT_TRUE(two.ok()) << two.status().ToString();
  EXPECT_EQ(pool_->arena_count(), 2u);
  EXPECT_EQ(two->ptr, pool_->arenas()[1].base);
  // Slots of a run are ordinary slots: freed one by one, then taken again.
  ASSERT_TRUE(pool_->Free(pool_->SlotAt(run->index + 1)).ok());
  EXPECT_TRUE(pool_->IsFree(run->index + 1));
  EXPECT_EQ(pool_->Take(run->index).status().code(), StatusCode::kInvalidArgument) << "in use";
  auto taken = pool_->Take(run->index + 1);
  ASSERT_TRUE(taken.ok());
  EXPECT_EQ(taken->ptr, run->ptr + page_);
  EXPECT_EQ(pool_->used_slots(), 5u);
}

// Free slots that are not adjacent make no run: the pool grows instead.
TEST_P(DevicePagePoolTest, FragmentedFreeSlotsMakeNoRun) {
  std::vector<DeviceSlot> slots;
  for (int i = 0; i < 4; ++i) slots.push_back(*pool_->Allocate());
  ASSERT_EQ(pool_->arena_count(), 1u);
  ASSERT_TRUE(pool_->Free(slots[0]).ok());
  ASSERT_TRUE(pool_->Free(slots[2]).ok());
  auto run = pool_->AllocateRun(2);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  EXPECT_EQ(pool_->arena_count(), 2u);
  EXPECT_EQ(run->ptr, pool_->arenas()[1].base);
  // Once slot 1 is free too, slots 0..2 form a run in the first arena.
  ASSERT_TRUE(pool_->Free(slots[1]).ok());
  auto three = pool_->AllocateRun(3);
  ASSERT_TRUE(three.ok());
  EXPECT_EQ(three->ptr, slots[0].ptr);
  EXPECT_EQ(pool_->arena_count(), 2u);
}

// A run larger than an arena gets an arena of its own; runs never exceed
// the budget.
TEST_P(DevicePagePoolTest, ALargeRunGetsADedicatedArena) {
  auto six = pool_->AllocateRun(6);
  ASSERT_TRUE(six.ok()) << six.status().ToString();
  ASSERT_EQ(pool_->arena_count(), 1u);
  EXPECT_EQ(pool_->arenas()[0].bytes, 6ull * page_);
  EXPECT_EQ(six->ptr, pool_->arenas()[0].base);
  auto five = pool_->AllocateRun(5);  // 4 pages of budget left
  EXPECT_EQ(five.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(five.status().message().find("budget"), std::string::npos) << five.status().message();
  EXPECT_EQ(pool_->AllocateRun(0).status().code(), StatusCode::kInvalidArgument);
  auto four = pool_->AllocateRun(4);
  ASSERT_TRUE(four.ok()) << four.status().ToString();
  EXPECT_EQ(pool_->arena_bytes(), pool_->budget_bytes());
  EXPECT_EQ(pool_->used_slots(), 10u);
  EXPECT_EQ(pool_->Allocate().status().code(), StatusCode::kResourceExhausted);
}

TEST_P(DevicePagePoolTest, DestructionFreesItsArenas) {
  AllocateAll();
  EXPECT_EQ(backend_->arena_count(), 3u);
  pool_.reset();
  EXPECT_EQ(backend_->arena_count(), 0u);
  EXPECT_EQ(backend_->arena_bytes(0), 0u);
}

INSTANTIATE_TEST_SUITE_P(PageSizes, DevicePagePoolTest, testing::Values(4096u, 64u << 10, 2u << 20),
                         [](const testing::TestParamInfo<uint32_t>& info) {
                           return std::to_string(info.param / 1024) + "KiB";
                         });

// Pools of one GPU share its budget: what one holds the other cannot take,
// until the first gives back its empty arenas; a new arena then takes a
// released arena's slot indices.
TEST(DevicePagePoolSharedTest, PoolsOfOneGpuShareItsBudget) {
  auto backend = Emulated();
  DeviceBudget budget(512u << 10);
  DevicePagePoolOptions small;
  small.page_size = 4096;
  small.arena_bytes = 64u << 10;  // 16 slots
  small.budget_bytes = 512u << 10;
  small.shared = &budget;
  DevicePagePoolOptions large = small;
  large.page_size = 64u << 10;
  large.arena_bytes = 128u << 10;  // 2 slots
  auto s = Pool(backend.get(), small);
  auto l = Pool(backend.get(), large);
  ASSERT_TRUE(s && l);
  EXPECT_EQ(s->capacity_slots(), 128u);
  EXPECT_EQ(l->capacity_slots(), 8u);
  std::vector<DeviceSlot> slots;
  for (int i = 0; i < 128; ++i) {
    auto slot = s->Allocate();
    ASSERT_TRUE(slot.ok()) << i << ": " << slot.status().ToString();
    slots.push_back(*slot);
  }
  EXPECT_EQ(budget.free_bytes(), 0u);
  EXPECT_EQ(l->capacity_slots(), 0u);
  EXPECT_EQ(l->Allocate().status().code(), StatusCode::kResourceExhausted);
  // Nothing empty, nothing given back.
  auto none = s->ReleaseEmptyArenas();
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, 0u);
  // Arena 0's slots all free: it goes back, and the other size takes it.
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(s->Free(slots[i]).ok());
  const uint64_t generation = s->arena_generation();
  auto freed = s->ReleaseEmptyArenas();
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 64u << 10);
  EXPECT_NE(s->arena_generation(), generation);
  EXPECT_FALSE(s->ArenaLive(0));
  EXPECT_EQ(s->ArenaSlots(0).count, 0u);
  EXPECT_FALSE(s->IsFree(0)) << "a released arena's slots are no free slots";
  EXPECT_EQ(s->arena_bytes(), 448u << 10);
  EXPECT_EQ(s->capacity_slots(), 128u) << "the freed bytes may come back to it";
  EXPECT_EQ(l->capacity_slots(), 1u);
  auto big = l->Allocate();
  ASSERT_TRUE(big.ok()) << big.status().ToString();
  EXPECT_EQ(l->Allocate().status().code(), StatusCode::kResourceExhausted);
  ASSERT_TRUE(l->Free(*big).ok());
  ASSERT_TRUE(l->ReleaseEmptyArenas().ok());
  // The small pool grows again into arena 0's indices (and new memory).
  auto again = s->Allocate();
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_LT(again->index, 16u);
  EXPECT_EQ(s->arena_count(), 8u);
  EXPECT_TRUE(InsideAnArena(*s, again->ptr, 4096));
  s.reset();
  l.reset();
  EXPECT_EQ(budget.taken(), 0u) << "destroyed pools give their arenas back";
}

TEST(DevicePagePoolCreateTest, RefusesBadOptions) {
  auto backend = Emulated();
  const auto kInvalid = StatusCode::kInvalidArgument;
  DevicePagePoolOptions ok;
  ok.page_size = 64 << 10;
  ok.budget_bytes = 1 << 20;
  ok.arena_bytes = 256 << 10;
  EXPECT_TRUE(DevicePagePool::Create(backend.get(), ok).ok());
  EXPECT_EQ(DevicePagePool::Create(nullptr, ok).status().code(), kInvalid);
  DevicePagePoolOptions o = ok;
  o.device = 1;
  EXPECT_EQ(DevicePagePool::Create(backend.get(), o).status().code(), kInvalid);
  o = ok;
  o.page_size = 8192;
  EXPECT_EQ(DevicePagePool::Create(backend.get(), o).status().code(), kInvalid);
  o = ok;
  o.budget_bytes = 0;
  EXPECT_EQ(DevicePagePool::Create(backend.get(), o).status().code(), kInvalid);
  o.budget_bytes = (64 << 10) - 1;  // less than one page
  EXPECT_EQ(DevicePagePool::Create(backend.get(), o).status().code(), kInvalid);
  o = ok;
  o.arena_bytes = 0;
  EXPECT_EQ(DevicePagePool::Create(backend.get(), o).status().code(), kInvalid);
  o.arena_bytes = (256 << 10) + 4096;
  EXPECT_EQ(DevicePagePool::Create(backend.get(), o).status().code(), kInvalid);
  o = ok;
  o.page_size = 4096;
  o.budget_bytes = uint64_t{1} << 46;  // 2^34 pages: more than a pool indexes
  EXPECT_EQ(DevicePagePool::Create(backend.get(), o).status().code(), kInvalid);
}

// The device fills up before the pool reaches its budget (another pool, or
// another process, holds the rest): kResourceExhausted from the backend, and
// the pool keeps serving from what it holds.
TEST(DevicePagePoolCreateTest, DeviceOutOfMemoryBelowTheBudget) {
  auto backend = Emulated(/*device_bytes=*/2 << 20);
  DevicePagePoolOptions o;
  o.page_size = 64 << 10;
  o.arena_bytes = 1 << 20;
  o.budget_bytes = 4 << 20;
  auto pool = Pool(backend.get(), o);
  ASSERT_NE(pool, nullptr);
  std::vector<DeviceSlot> slots;
  for (int i = 0; i < 32; ++i) {
    auto s = pool->Allocate();
    ASSERT_TRUE(s.ok()) << i << ": " << s.status().ToString();
    slots.push_back(*s);
  }
  auto more = pool->Allocate();
  EXPECT_EQ(more.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(more.status().message().find("below its budget"), std::string::npos)
      << more.status().message();
  EXPECT_EQ(pool->arena_count(), 2u);
  ASSERT_TRUE(pool->Free(slots[0]).ok());
  EXPECT_TRUE(pool->Allocate().ok());
}

// Pools of different page sizes on different devices share one backend.
TEST(DevicePagePoolCreateTest, PoolsPerDeviceAndPageSize) {
  auto backend = Emulated(1 << 30, /*devices=*/2);
  DevicePagePoolOptions small;
  small.device = 0;
  small.page_size = 4096;
  small.budget_bytes = 1 << 20;
  small.arena_bytes = 256 << 10;
  DevicePagePoolOptions huge;
  huge.device = 1;
  huge.page_size = 2 << 20;
  huge.budget_bytes = 8 << 20;
  auto p0 = Pool(backend.get(), small);
  auto p1 = Pool(backend.get(), huge);
  ASSERT_TRUE(p0 && p1);
  auto s0 = p0->Allocate();
  auto s1 = p1->Allocate();
  ASSERT_TRUE(s0.ok() && s1.ok());
  EXPECT_EQ(backend->arena_bytes(0), 256u << 10);
  EXPECT_EQ(backend->arena_bytes(1), 8u << 20);  // budget below the 64 MiB default arena
  EXPECT_EQ(p1->capacity_slots(), 4u);
}

}  // namespace
}  // namespace dsvm::node
