// Tests of node::DeviceTier (GPU-tier migrations) on the emulated device
// backend and real PageStores: bytes round trip host -> GPU -> host, an
// oversubscribed working set stays correct, batches count as they should.
#include "node/memory/device_tier.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "node/memory/device_backend.h"
#include "node/memory/device_page_pool.h"
#include "node/memory/page_store.h"
#include "node/memory/tier_table.h"
#include "proto/status.h"

namespace dsvm::node {
namespace {

constexpr PageAddr kBase = 0x200000000000ull;
constexpr uint32_t kPage = 4096;

// A region's store on a plain memfd (no hugetlb pages).
std::unique_ptr<PageStore> PlainStore(PageAddr base, uint64_t size, uint32_t page_size) {
  PageStoreOptions so;
  so.try_hugetlb = false;
  auto s = PageStore::Create(base, size, page_size, so);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? std::move(s).value() : nullptr;
}

// `gpus` emulated GPUs of 64 MiB each.
std::unique_ptr<DeviceBackend> EmulatedGpus(uint32_t gpus) {
  DeviceBackendOptions bo;
  bo.emulated_devices = gpus;
  bo.emulated_device_bytes = 64u << 20;
  auto b = MakeDeviceBackend("emulated", bo);
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return b.ok() ? std::move(b).value() : nullptr;
}

std::vector<uint8_t> RandomBytes(size_t n, std::mt19937_64& rng) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t r = rng();
    std::memcpy(v.data() + i, &r, std::min<size_t>(8, n - i));
  }
  return v;
}

struct TierConfig {
  uint64_t region_pages = 48;
  uint32_t page_size = kPage;
  uint64_t budget_pages = 16;  // per GPU
  uint64_t arena_pages = 16;
  uint64_t batch_pages = 4;        // staging per lane
  uint64_t host_budget_pages = 0;  // 0: none
  uint32_t devices = 2;
  uint64_t device_bytes = 1ull << 30;
  std::chrono::microseconds copy_delay{0};  // the emulated backend's test seam
  std::function<void()> keep_alive;         // DeviceTierOptions::keep_alive
  bool map_for_copies = true;               // PageStoreOptions::map_for_copies
  int direct = -1;  // DeviceTierOptions::direct_copies: 0 or 1; -1: the test's parameter
  uint64_t direct_min_pages = 1;  // DeviceTierOptions::direct_min_bytes, in pages
  uint64_t pinned_limit_pages = 0;  // DeviceTierOptions::pinned_limit_bytes, in pages
  bool hugetlb = false;             // PageStoreOptions::try_hugetlb (2 MiB pages)
};

// A run of the suite: copy threads, and whether pages may copy direct.
struct TierParam {
  uint32_t copy_threads;
  bool direct;
};

// One region (a PageStore of random bytes), a pool per GPU, a tier over them,
// and a model of what each page's bytes should be. Every test runs with the
// caller alone staging copies (1 copy thread) and with 3 copy threads
// (waves of 3 batches staged at once on 6 lanes), staged, and both again
// with direct copies (the region's bytes are all in its memfd, so every
// page copies direct, unless a test makes holes).
class DeviceTierTest : public testing::TestWithParam<TierParam> {
 protected:
  void Build(TierConfig c = {}) {
    c_ = c;
    DeviceBackendOptions bo;
    bo.emulated_devices = c.devices;
    bo.emulated_device_bytes = c.device_bytes;
    bo.emulated_copy_delay = c.copy_delay;
    auto b = MakeDeviceBackend("emulated", bo);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    backend_ = std::move(b).value();
    PageStoreOptions so;
    so.try_hugetlb = c.hugetlb;
    so.map_for_copies = c.map_for_copies;
    auto s = PageStore::Create(kBase, c.region_pages * c.page_size, c.page_size, so);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
    DeviceTierOptions to;
    to.batch_bytes = c.batch_pages * c.page_size;
    to.host_budget_bytes = c.host_budget_pages * c.page_size;
    to.copy_threads = GetParam().copy_threads;
    to.direct_copies = c.direct < 0 ? GetParam().direct : c.direct != 0;
    to.direct_min_bytes = c.direct_min_pages * c.page_size;
    to.pinned_limit_bytes = c.pinned_limit_pages * c.page_size;
    to.keep_alive = c.keep_alive;
    to.arena_bytes = c.arena_pages * c.page_size;
    auto t = DeviceTier::Create(backend_.get(),
                                std::vector<uint64_t>(c.devices, c.budget_pages * c.page_size), to);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tier_ = std::move(t).value();
    ASSERT_TRUE(tier_->AddRegion(store_.get()).ok());
    for (uint32_t d = 0; d < c.devices; ++d) {
      auto st = backend_->CreateStream(d);
      ASSERT_TRUE(st.ok());
      test_streams_.push_back(*st);
    }
    model_.resize(c.region_pages);
    for (uint64_t i = 0; i < c.region_pages; ++i) {
      model_[i] = RandomBytes(c.page_size, rng_);
      ASSERT_TRUE(store_->WritePage(P(i), model_[i]).ok());
    }
  }

  PageAddr P(uint64_t i) const { return kBase + i * c_.page_size; }
  // The region's pool on `gpu`.
  const DevicePagePool* Pool(uint32_t gpu) const { return tier_->PoolOf(gpu, kBase); }
  std::vector<PageAddr> Pages(std::vector<uint64_t> idx) const {
    std::vector<PageAddr> v;
    for (uint64_t i : idx) v.push_back(P(i));
    return v;
  }
  std::vector<uint64_t> Range(uint64_t first, uint64_t n) const {
    std::vector<uint64_t> v(n);
    std::iota(v.begin(), v.end(), first);
    return v;
  }

  void Sync(uint32_t gpu) {
    auto f = backend_->RecordFence(test_streams_[gpu]);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE(backend_->Wait(*f).ok());
  }
  // What the GPU holds at `ptr` (the test reading device memory as a kernel would).
  std::vector<uint8_t> ReadDevice(uint32_t gpu, DevicePtr ptr) {
    std::vector<uint8_t> out(c_.page_size);
    EXPECT_TRUE(backend_->CopyToHost(test_streams_[gpu], ptr, out.data(), out.size()).ok());
    Sync(gpu);
    return out;
  }
  // A kernel writing new bytes to page i's GPU copy at `ptr`.
  void KernelWrite(uint32_t gpu, uint64_t i, DevicePtr ptr) {
    model_[i] = RandomBytes(c_.page_size, rng_);
    ASSERT_TRUE(
        backend_->CopyToDevice(test_streams_[gpu], model_[i].data(), ptr, c_.page_size).ok());
    Sync(gpu);
  }
  // Pages `idx` made resident on GPU 0 for write (their bytes checked
  // there), written by a kernel, written back (checked in the store);
  // left pinned. Returns their slots.
  std::vector<DevicePtr> WriteOnGpuAndBack(const std::vector<uint64_t>& idx, uint64_t tick) {
    auto ptrs = tier_->MakeResident(kBase, Pages(idx), 0, /*for_write=*/true, tick);
    EXPECT_TRUE(ptrs.ok()) << ptrs.status().ToString();
    if (!ptrs.ok()) return {};
    for (size_t i = 0; i < idx.size(); ++i) {
      EXPECT_EQ(ReadDevice(0, (*ptrs)[i]), model_[idx[i]]) << idx[i];
      KernelWrite(0, idx[i], (*ptrs)[i]);
    }
    EXPECT_TRUE(tier_->WriteBack(Pages(idx)).ok());
    for (uint64_t i : idx) EXPECT_EQ(ReadStore(i), model_[i]) << i;
    return *ptrs;
  }
  std::vector<uint8_t> ReadStore(uint64_t i) {
    std::vector<uint8_t> out(c_.page_size);
    EXPECT_TRUE(store_->ReadPage(P(i), out).ok());
    return out;
  }

  TierConfig c_;
  std::mt19937_64 rng_{20240505};
  std::unique_ptr<DeviceBackend> backend_;
  std::unique_ptr<PageStore> store_;
  std::unique_ptr<DeviceTier> tier_;
  std::vector<StreamId> test_streams_;
  std::vector<std::vector<uint8_t>> model_;
};

INSTANTIATE_TEST_SUITE_P(CopyThreads, DeviceTierTest,
                         testing::Values(TierParam{1, false}, TierParam{3, false},
                                         TierParam{1, true}, TierParam{3, true}),
                         [](const testing::TestParamInfo<TierParam>& info) {
                           return "Threads" + std::to_string(info.param.copy_threads) +
                                  (info.param.direct ? "Direct" : "");
                         });

TEST_P(DeviceTierTest, BytesRoundTripHostToGpuToHost) {
  Build();
  const std::vector<PageAddr> pages = Pages(Range(0, 8));
  auto ptrs = tier_->MakeResident(kBase, pages, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
  ASSERT_EQ(ptrs->size(), 8u);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ((*ptrs)[i], tier_->SlotOf(pages[i]));
    EXPECT_EQ(ReadDevice(0, (*ptrs)[i]), model_[i]) << "page " << i << " on the GPU";
  }
  for (size_t i = 0; i < 8; ++i) KernelWrite(0, i, (*ptrs)[i]);
  ASSERT_TRUE(tier_->WriteBack(pages).ok());
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(ReadStore(i), model_[i]) << "page " << i << " on host";
  // Written back and kept: clean, still resident, no copy to bring it back.
  EXPECT_FALSE(tier_->table().IsDirty(pages[0]));
  EXPECT_EQ(tier_->table().GpuOf(pages[0]), 0u);
  ASSERT_TRUE(tier_->WriteBack(pages).ok());  // nothing dirty: no copies
  const DeviceTierStats& st = tier_->stats();
  EXPECT_EQ(st.pages_to_device, 8u);
  EXPECT_EQ(st.pages_to_host, 8u);
  EXPECT_EQ(st.to_device_calls, 2u);  // 8 pages, 4 per batch
  EXPECT_EQ(st.to_host_calls, 2u);
  EXPECT_EQ(Pool(0)->used_slots(), 8u);
  ASSERT_TRUE(tier_->Unpin(pages).ok());
}

// A long copy calls keep_alive after each batch it waited for, each way,
// so the daemon can beat while a migration holds its loop; a call with
// nothing to copy waits for nothing and calls nothing.
TEST_P(DeviceTierTest, KeepAliveIsCalledAfterEachBatchWaitedFor) {
  uint64_t calls = 0;
  TierConfig c;
  c.keep_alive = [&calls] { ++calls; };
  Build(c);
  const std::vector<PageAddr> pages = Pages(Range(0, 16));  // 4 batches of 4
  auto ptrs = tier_->MakeResident(kBase, pages, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
  // At least once per batch; more often while a wait lasts past
  // keep_alive_every (a loaded machine).
  EXPECT_GE(calls, 4u);
  for (size_t i = 0; i < pages.size(); ++i) KernelWrite(0, i, (*ptrs)[i]);
  const uint64_t after_in = calls;
  ASSERT_TRUE(tier_->WriteBack(pages).ok());
  EXPECT_GE(calls, after_in + 4);
  const uint64_t after_out = calls;
  ASSERT_TRUE(tier_->WriteBack(pages).ok());  // clean now: no copies
  EXPECT_EQ(calls, after_out);
  for (size_t i = 0; i < pages.size(); ++i) EXPECT_EQ(ReadStore(i), model_[i]) << "page " << i;
  ASSERT_TRUE(tier_->Unpin(pages).ok());
}

// A wait that lasts (each emulated copy takes 30 ms) calls keep_alive while
// it waits too, not only once after: the daemon serves its loop from there
// during a GPU map's copies. Fails without: 4 calls, one per batch.
TEST_P(DeviceTierTest, KeepAliveIsCalledWhileALongWaitLasts) {
  uint64_t calls = 0;
  TierConfig c;
  c.copy_delay = std::chrono::milliseconds(30);
  c.keep_alive = [&calls] { ++calls; };
  Build(c);
  const std::vector<PageAddr> pages = Pages(Range(0, 16));  // 4 batches of 4
  auto ptrs = tier_->MakeResident(kBase, pages, 0, /*for_write=*/false, 1);
  ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
  EXPECT_GE(calls, 8u);
  for (size_t i = 0; i < pages.size(); ++i) EXPECT_EQ(ReadDevice(0, (*ptrs)[i]), model_[i]);
  ASSERT_TRUE(tier_->Unpin(pages).ok());
}

// While tracked, Touches names the pages a call moves, victims included,
// from keep_alive (the daemon holds their requests meanwhile); untracked,
// nothing is recorded.
TEST_P(DeviceTierTest, TouchesNamesTheVictimsOfACallWhileTracked) {
  bool victim_seen = false, other_seen = false;
  TierConfig c;
  c.keep_alive = [&] {
    victim_seen |= tier_->Touches(Pages(Range(0, 1))[0]);
    other_seen |= tier_->Touches(Pages(Range(40, 1))[0]);
  };
  Build(c);
  const std::vector<PageAddr> first = Pages(Range(0, 16));  // the whole budget, dirty
  ASSERT_TRUE(tier_->MakeResident(kBase, first, 0, /*for_write=*/true, 1).ok());
  ASSERT_TRUE(tier_->Unpin(first).ok());
  EXPECT_FALSE(victim_seen);  // untracked
  tier_->TrackTouches(true);
  const std::vector<PageAddr> next = Pages(Range(16, 16));  // evicts them all
  auto placed = tier_->MakeResident(kBase, next, 0, /*for_write=*/false, 2);
  ASSERT_TRUE(placed.ok()) << placed.status().ToString();
  EXPECT_TRUE(victim_seen);
  EXPECT_FALSE(other_seen);
  EXPECT_FALSE(tier_->Touches(first[0])) << "cleared when the call ends";
  ASSERT_TRUE(tier_->Unpin(next).ok());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_EQ(ReadStore(i), model_[i]) << "page " << i;
}

// keep_alive must leave the tier alone (the daemon serves only what does
// not need it): a call from there stops the process rather than change
// the table under the call that waits.
TEST_P(DeviceTierTest, ACallFromKeepAliveStopsTheProcess) {
  testing::FLAGS_gtest_death_test_style = "threadsafe";
  TierConfig c;
  c.keep_alive = [this] { (void)tier_->TakePagesToLeave(); };
  EXPECT_DEATH(
      {
        Build(c);
        (void)tier_->MakeResident(kBase, Pages(Range(0, 4)), 0, /*for_write=*/false, 1);
      },
      "called from its keep_alive");
}

// N small pages go in ceil(N / batch) copy calls each way; pages whose slots
// are adjacent travel as one copy entry. (Staged, or direct in runs too
// short to copy direct: freed slots are reused in another order than the
// pages', so direct copies would take one entry per page.)
TEST_P(DeviceTierTest, SmallPagesAreBatchedIntoFewCopies) {
  TierConfig c;
  c.direct_min_pages = 16;
  Build(c);
  for (uint64_t n : {1u, 4u, 5u, 13u}) {
    SCOPED_TRACE(n);
    const DeviceTierStats before = tier_->stats();
    const std::vector<PageAddr> pages = Pages(Range(0, n));
    auto ptrs = tier_->MakeResident(kBase, pages, 0, /*for_write=*/true, n);
    ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
    const uint64_t calls = (n + 3) / 4;
    EXPECT_EQ(tier_->stats().to_device_calls - before.to_device_calls, calls);
    EXPECT_EQ(tier_->stats().pages_to_device - before.pages_to_device, n);
    // Fresh slots from one arena are adjacent: one entry per batch.
    EXPECT_EQ(tier_->stats().to_device_entries - before.to_device_entries, calls);
    for (uint64_t i = 0; i < n; ++i) EXPECT_EQ(ReadDevice(0, (*ptrs)[i]), model_[i]);
    for (uint64_t i = 0; i < n; ++i) KernelWrite(0, i, (*ptrs)[i]);
    ASSERT_TRUE(tier_->WriteBack(pages).ok());
    EXPECT_EQ(tier_->stats().to_host_calls - before.to_host_calls, calls);
    EXPECT_EQ(tier_->stats().pages_to_host - before.pages_to_host, n);
    for (uint64_t i = 0; i < n; ++i) EXPECT_EQ(ReadStore(i), model_[i]);
    ASSERT_TRUE(tier_->Unpin(pages).ok());
    ASSERT_TRUE(tier_->Drop(pages).ok());  // forget them: the next round copies again
    EXPECT_EQ(Pool(0)->used_slots(), 0u);
  }
}

// Pages of 64 KiB, batches of 2 MiB: 32 pages per copy call.
TEST_P(DeviceTierTest, LargerPagesBatchByBytes) {
  TierConfig c;
  c.page_size = 64 << 10;
  c.region_pages = 80;
  c.budget_pages = 80;
  c.arena_pages = 80;
  c.batch_pages = 32;
  c.devices = 1;
  Build(c);
  const std::vector<PageAddr> pages = Pages(Range(0, 70));
  auto ptrs = tier_->MakeResident(kBase, pages, 0, false, 1);
  ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
  EXPECT_EQ(tier_->stats().to_device_calls, 3u);  // 32 + 32 + 6
  EXPECT_EQ(tier_->stats().bytes_to_device, 70ull * (64 << 10));
  for (uint64_t i = 0; i < 70; i += 7) EXPECT_EQ(ReadDevice(0, (*ptrs)[i]), model_[i]);
}

// A working set three times the GPU budget, touched in a loop in chunks with
// reads and writes mixed: every page the GPU shows is the page's latest
// bytes, the host ends with them all, and the tier copied exactly what the
// table decided (a second TierTable, fed the same calls, says what that is).
TEST_P(DeviceTierTest, OversubscribedWorkingSetStaysCorrect) {
  TierConfig c;
  c.region_pages = 48;
  c.budget_pages = 16;
  c.devices = 1;
  Build(c);
  TierTableOptions so;
  so.aging_period = 1024;
  auto shadow_or = TierTable::Create(so);
  ASSERT_TRUE(shadow_or.ok());
  TierTable& shadow = **shadow_or;
  ASSERT_TRUE(shadow.AddRegion(kBase, c.region_pages * kPage, kPage).ok());
  ASSERT_TRUE(shadow.AddPool(0, kBase, c.budget_pages).ok());
  uint64_t want_to_device = 0, want_to_host = 0;

  std::vector<uint64_t> order = Range(0, c.region_pages);
  uint64_t tick = 0;
  for (int round = 0; round < 8; ++round) {
    // Hot pages 0..3 every round; the rest in a new order each round.
    std::shuffle(order.begin() + 4, order.end(), rng_);
    for (size_t at = 0; at < order.size(); at += 6) {
      std::vector<uint64_t> idx(order.begin() + at, order.begin() + std::min(at + 6, order.size()));
      if (at != 0) idx.insert(idx.begin(), 0);  // page 0 is in every chunk: the hottest
      const bool write = (round + at / 6) % 3 == 0;
      const std::vector<PageAddr> pages = Pages(idx);
      ++tick;
      auto ptrs = tier_->MakeResident(kBase, pages, 0, write, tick);
      ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
      TierSteps steps;
      ASSERT_TRUE(shadow.MakeResident(pages, 0, write, true, tick, &steps).ok());
      for (const TierStep& s : steps) {
        want_to_device += s.kind == TierStepKind::kCopyToDevice;
        want_to_host += s.kind == TierStepKind::kWriteBack;
      }
      for (size_t k = 0; k < idx.size(); ++k) {
        ASSERT_EQ(ReadDevice(0, (*ptrs)[k]), model_[idx[k]])
            << "round " << round << " page " << idx[k];
        if (write) KernelWrite(0, idx[k], (*ptrs)[k]);
      }
      ASSERT_TRUE(tier_->Unpin(pages).ok());
      for (PageAddr p : pages) ASSERT_TRUE(shadow.Unpin(p).ok());
      ASSERT_EQ(Pool(0)->used_slots(), tier_->table().used_slots(tier_->table().PoolIndex(0, kBase)));
      ASSERT_LE(Pool(0)->used_slots(), c.budget_pages);
    }
  }
  const DeviceTierStats& st = tier_->stats();
  EXPECT_EQ(st.pages_to_device, want_to_device);
  EXPECT_EQ(st.pages_to_host, want_to_host);
  EXPECT_EQ(st.pages_to_device, tier_->table().stats().copies_to_device);
  EXPECT_GT(tier_->table().stats().evictions, 0u);
  EXPECT_GT(st.pages_to_host, 0u);                  // dirty victims went back
  EXPECT_LT(st.pages_to_host, st.pages_to_device);  // clean ones did not
  EXPECT_EQ(tier_->table().GpuOf(P(0)), 0u);        // the hot page never left
  // Every page's latest bytes reach the host.
  ASSERT_TRUE(tier_->WriteBack(Pages(Range(0, c.region_pages))).ok());
  for (uint64_t i = 0; i < c.region_pages; ++i) ASSERT_EQ(ReadStore(i), model_[i]) << "page " << i;
}

// With copies slow enough to be in flight while the next batch is staged, a
// lane's staging buffer is still reused only after its batch is done: the
// bytes arrive intact both ways.
TEST_P(DeviceTierTest, StagingIsReusedOnlyAfterItsBatchIsDone) {
  TierConfig c;
  c.devices = 1;
  c.budget_pages = 32;
  c.arena_pages = 32;
  c.copy_delay = std::chrono::microseconds(300);
  Build(c);
  const std::vector<PageAddr> pages = Pages(Range(0, 32));
  auto ptrs = tier_->MakeResident(kBase, pages, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
  EXPECT_EQ(tier_->stats().to_device_calls, 8u);
  for (uint64_t i = 0; i < 32; ++i) ASSERT_EQ(ReadDevice(0, (*ptrs)[i]), model_[i]) << i;
  for (uint64_t i = 0; i < 32; ++i) KernelWrite(0, i, (*ptrs)[i]);
  ASSERT_TRUE(tier_->WriteBack(pages).ok());
  EXPECT_EQ(tier_->stats().to_host_calls, 8u);
  for (uint64_t i = 0; i < 32; ++i) ASSERT_EQ(ReadStore(i), model_[i]) << i;
}

TEST_P(DeviceTierTest, EverythingPinnedIsExhaustedAndBadPagesAreRefused) {
  Build();
  auto all = tier_->MakeResident(kBase, Pages(Range(0, 16)), 0, false, 1);
  ASSERT_TRUE(all.ok());
  auto more = tier_->MakeResident(kBase, Pages({16}), 0, false, 2);
  EXPECT_EQ(more.status().code(), StatusCode::kResourceExhausted) << more.status().ToString();
  // The other GPU has room.
  EXPECT_TRUE(tier_->MakeResident(kBase, Pages({16}), 1, false, 3).ok());
  const auto kInvalid = StatusCode::kInvalidArgument;
  const std::vector<PageAddr> outside = {kBase + 48 * kPage};
  const std::vector<PageAddr> unaligned = {kBase + 100};
  const std::vector<PageAddr> twice = {P(20), P(20)};
  EXPECT_EQ(tier_->MakeResident(kBase, outside, 0, false, 4).status().code(), kInvalid);
  EXPECT_EQ(tier_->MakeResident(kBase, unaligned, 0, false, 4).status().code(), kInvalid);
  EXPECT_EQ(tier_->MakeResident(kBase, twice, 0, false, 4).status().code(), kInvalid);
  EXPECT_EQ(tier_->MakeResident(kBase + kPage, Pages({20}), 0, false, 4).status().code(), kInvalid);
  EXPECT_EQ(tier_->MakeResident(kBase, Pages({20}), 7, false, 4).status().code(), kInvalid);
  EXPECT_EQ(tier_->WriteBack(outside).code(), kInvalid);
  EXPECT_EQ(tier_->Drop(unaligned).code(), kInvalid);
  EXPECT_EQ(tier_->Unpin(Pages({30})).code(), StatusCode::kFailedPrecondition);
}

TEST_P(DeviceTierTest, DropFreesTheSlotWithoutWritingBack) {
  Build();
  const std::vector<PageAddr> pages = Pages({5});
  auto ptrs = tier_->MakeResident(kBase, pages, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(ptrs.ok());
  const std::vector<uint8_t> host = model_[5];
  KernelWrite(0, 5, (*ptrs)[0]);
  ASSERT_TRUE(tier_->Drop(pages).ok());
  EXPECT_EQ(ReadStore(5), host);  // the GPU's bytes were not written back
  EXPECT_EQ(tier_->stats().pages_to_host, 0u);
  EXPECT_EQ(Pool(0)->used_slots(), 0u);
  EXPECT_EQ(tier_->SlotOf(P(5)), 0u);
  EXPECT_FALSE(tier_->table().Holds(P(5)));
}

// A lost gpu map's slots (Detach) stay taken, bytes and all, until Release:
// later residency and runs go around them, so a client still using the old
// device pointers never sees another page's bytes.
TEST_P(DeviceTierTest, DetachedSlotsStayTakenUntilReleased) {
  Build();
  const std::vector<PageAddr> mapped = Pages(Range(0, 8));
  auto run = tier_->MapRun(kBase, mapped, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  for (size_t i = 0; i < 8; ++i) KernelWrite(0, i, run->ptr + i * kPage);
  std::vector<HeldSlot> held;
  ASSERT_TRUE(tier_->Detach(Pages({0, 1, 2, 3, 4, 5, 6, 7, 30}), &held).ok());
  ASSERT_EQ(held.size(), 8u) << "page 30 had no GPU copy";
  EXPECT_FALSE(tier_->table().Holds(P(0)));
  EXPECT_EQ(tier_->SlotOf(P(0)), 0u);
  EXPECT_EQ(Pool(0)->used_slots(), 8u);
  EXPECT_EQ(tier_->stats().pages_to_host, 0u) << "nothing written back";
  // The budget (16) has 8 slots left: 9 pinned pages do not fit.
  EXPECT_EQ(tier_->MakeResident(kBase, Pages(Range(8, 9)), 0, false, 2).status().code(),
            StatusCode::kResourceExhausted);
  auto other = tier_->MakeResident(kBase, Pages(Range(8, 8)), 0, false, 3);
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  ASSERT_TRUE(tier_->Unpin(Pages(Range(8, 8))).ok());
  // A run of 8 evicts those unpinned pages rather than use the held slots.
  auto run2 = tier_->MapRun(kBase, Pages(Range(16, 8)), 0, false, 4);
  ASSERT_TRUE(run2.ok()) << run2.status().ToString();
  EXPECT_TRUE(run2->ptr + run2->bytes <= run->ptr || run2->ptr >= run->ptr + run->bytes);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(ReadDevice(0, run->ptr + i * kPage), model_[i]) << "held slot " << i << " changed";
  }
  ASSERT_TRUE(tier_->Unpin(Pages(Range(16, 8))).ok());
  ASSERT_TRUE(tier_->Release(held).ok());
  EXPECT_EQ(Pool(0)->used_slots(), 8u);  // run2's
  EXPECT_EQ(tier_->Release(held).code(), StatusCode::kInvalidArgument);
  // Free again: 16 pages fit (run2's 8 unpinned are evicted as needed).
  auto all = tier_->MakeResident(kBase, Pages(Range(24, 16)), 0, false, 5);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  ASSERT_TRUE(tier_->Unpin(Pages(Range(24, 16))).ok());
}

// Two maps of one range share its slots; lost together, each holds them,
// and only the second Release frees them.
TEST_P(DeviceTierTest, MapsOfOneRangeLostTogetherEachHoldTheSlots) {
  Build();
  const std::vector<PageAddr> mapped = Pages(Range(0, 8));
  auto run = tier_->MapRun(kBase, mapped, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  auto again = tier_->MapRun(kBase, mapped, 0, /*for_write=*/true, 2);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->ptr, run->ptr);
  for (size_t i = 0; i < 8; ++i) KernelWrite(0, i, run->ptr + i * kPage);
  std::vector<HeldSlot> first, second;
  ASSERT_TRUE(tier_->Detach(mapped, &first).ok());
  ASSERT_TRUE(tier_->Detach(mapped, &second).ok());
  ASSERT_EQ(first.size(), 8u);
  ASSERT_EQ(second.size(), 8u) << "the second map holds the same slots";
  ASSERT_TRUE(tier_->Release(first).ok());
  EXPECT_EQ(Pool(0)->used_slots(), 8u) << "still held by the second map";
  // The free half of the budget takes 8 pinned pages; a 9th finds no slot.
  EXPECT_EQ(tier_->MakeResident(kBase, Pages(Range(8, 9)), 0, false, 3).status().code(),
            StatusCode::kResourceExhausted);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(ReadDevice(0, run->ptr + i * kPage), model_[i]) << "held slot " << i << " changed";
  }
  ASSERT_TRUE(tier_->Release(second).ok());
  EXPECT_EQ(Pool(0)->used_slots(), 0u);
  EXPECT_EQ(tier_->Release(second).code(), StatusCode::kInvalidArgument);
}

// A replica run (read-mostly replication) copies pages to a second GPU and
// leaves their copy on the first where it is, pinned or not; its slots are
// held outside the table until released, and a dirty copy on the first GPU
// reaches the replica (written back first).
TEST_P(DeviceTierTest, AReplicaRunLeavesTheOtherGpusCopyInPlace) {
  Build();
  const std::vector<PageAddr> pages = Pages(Range(2, 4));
  auto on0 = tier_->MapRun(kBase, pages, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(on0.ok()) << on0.status().ToString();
  KernelWrite(0, 3, on0->ptr + kPage);  // page 3 dirty on GPU 0
  std::vector<HeldSlot> held;
  auto on1 = tier_->MapReplicaRun(kBase, pages, 1, &held);
  ASSERT_TRUE(on1.ok()) << on1.status().ToString();
  ASSERT_EQ(held.size(), 4u);
  EXPECT_EQ(on1->gpu, 1u);
  for (size_t i = 0; i < pages.size(); ++i) {
    EXPECT_EQ(tier_->table().GpuOf(pages[i]), 0u) << "the copy on GPU 0 stays";
    EXPECT_EQ(tier_->table().PinsOf(pages[i]), 1u);
    EXPECT_EQ(ReadDevice(1, on1->ptr + i * kPage), model_[2 + i]) << "replica of page " << 2 + i;
  }
  EXPECT_EQ(Pool(1)->used_slots(), 4u);
  EXPECT_EQ(tier_->table().held_slots(tier_->table().PoolIndex(1, kBase)), 4u);
  EXPECT_EQ(tier_->stats().replica_runs, 1u);
  // GPU 1's budget (16) counts the held slots: 13 pinned pages do not fit.
  EXPECT_EQ(tier_->MakeResident(kBase, Pages(Range(20, 13)), 1, false, 2).status().code(),
            StatusCode::kResourceExhausted);
  ASSERT_TRUE(tier_->Release(held).ok());
  EXPECT_EQ(Pool(1)->used_slots(), 0u);
  ASSERT_TRUE(tier_->Unpin(pages).ok());
}

// A dirty page moved to another GPU arrives with the bytes the first GPU wrote.
TEST_P(DeviceTierTest, MovingBetweenGpusCarriesDirtyBytes) {
  Build();
  const std::vector<PageAddr> pages = Pages({2, 3});
  auto on0 = tier_->MakeResident(kBase, pages, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(on0.ok());
  KernelWrite(0, 2, (*on0)[0]);
  KernelWrite(0, 3, (*on0)[1]);
  ASSERT_TRUE(tier_->Unpin(pages).ok());
  auto on1 = tier_->MakeResident(kBase, pages, 1, false, 2);
  ASSERT_TRUE(on1.ok()) << on1.status().ToString();
  EXPECT_EQ(ReadDevice(1, (*on1)[0]), model_[2]);
  EXPECT_EQ(ReadDevice(1, (*on1)[1]), model_[3]);
  EXPECT_EQ(ReadStore(2), model_[2]);
  EXPECT_EQ(Pool(0)->used_slots(), 0u);
  EXPECT_EQ(Pool(1)->used_slots(), 2u);
}

// Past the host budget the tier reports pages to leave the node, with their
// host bytes current (a dirty GPU copy is written back first).
TEST_P(DeviceTierTest, HostBudgetReportsPagesToLeave) {
  TierConfig c;
  c.host_budget_pages = 6;
  c.devices = 1;
  Build(c);
  const std::vector<PageAddr> first = Pages(Range(0, 4));
  auto a = tier_->MakeResident(kBase, first, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(a.ok());
  for (uint64_t i = 0; i < 4; ++i) KernelWrite(0, i, (*a)[i]);
  ASSERT_TRUE(tier_->Unpin(first).ok());
  EXPECT_TRUE(tier_->TakePagesToLeave().empty());
  ASSERT_TRUE(tier_->MakeResident(kBase, Pages(Range(4, 4)), 0, false, 2).ok());
  // 8 pages held, 6 allowed; no page is host-only, so the two coldest GPU
  // copies go, written back.
  EXPECT_EQ(tier_->TakePagesToLeave(), Pages({0, 1}));
  EXPECT_TRUE(tier_->TakePagesToLeave().empty());
  EXPECT_EQ(ReadStore(0), model_[0]);
  EXPECT_EQ(ReadStore(1), model_[1]);
  EXPECT_EQ(tier_->SlotOf(P(0)), 0u);
  // A leaving page gets neither a GPU copy nor a replica of a map.
  EXPECT_EQ(tier_->MapRun(kBase, Pages({0, 1}), 0, false, 3).status().code(),
            StatusCode::kFailedPrecondition);
  std::vector<HeldSlot> held;
  EXPECT_EQ(tier_->MapReplicaRun(kBase, Pages({0, 1}), 0, &held).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_TRUE(held.empty());
  ASSERT_TRUE(tier_->Drop(Pages({0, 1})).ok());  // coherence took them
  EXPECT_EQ(tier_->table().host_bytes(), 6u * kPage);
}

// The device runs out of memory below the pool's budget: the call fails with
// kResourceExhausted and is undone; the tier keeps serving.
TEST_P(DeviceTierTest, DeviceFullBelowTheBudgetIsRolledBack) {
  TierConfig c;
  c.devices = 1;
  c.budget_pages = 32;
  c.arena_pages = 16;
  c.device_bytes = 16 * kPage;  // room for one arena only
  Build(c);
  auto r = tier_->MakeResident(kBase, Pages(Range(0, 20)), 0, true, 1);
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().ToString();
  EXPECT_EQ(tier_->stats().rollbacks, 1u);
  EXPECT_EQ(Pool(0)->used_slots(), 0u);
  EXPECT_EQ(tier_->table().used_slots(0), 0u);
  EXPECT_EQ(tier_->table().PinsOf(P(0)), 0u);
  EXPECT_FALSE(tier_->table().GpuOf(P(0)).has_value());
  auto ok = tier_->MakeResident(kBase, Pages(Range(0, 8)), 0, false, 2);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ReadDevice(0, (*ok)[7]), model_[7]);
}

// A write-back whose store write fails (here: RLIMIT_FSIZE below the
// victims' offsets, so pwrite gets EFBIG) keeps its copies: the call that
// needed their slots fails with the store's error, the dirty pages stay
// on the GPU, dirty, in their slots, and nothing is placed; the clean
// victims go as planned. The tier keeps serving, and once the store takes
// the bytes again the pages are written back and evicted as usual. Fails
// without: the tier refused every later copy ("failed earlier").
TEST_P(DeviceTierTest, AWriteBackAStoreRefusesKeepsTheDirtyCopies) {
  TierConfig c;
  c.devices = 1;
  c.map_for_copies = false;  // RLIMIT_FSIZE below fails write(2) alone
  Build(c);
  const std::vector<PageAddr> dirty = Pages(Range(40, 8));
  auto a = tier_->MakeResident(kBase, dirty, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  for (uint64_t i = 0; i < 8; ++i) KernelWrite(0, 40 + i, (*a)[i]);
  ASSERT_TRUE(tier_->Unpin(dirty).ok());
  auto clean = tier_->MakeResident(kBase, Pages(Range(20, 8)), 0, /*for_write=*/false, 2);
  ASSERT_TRUE(clean.ok());
  ASSERT_TRUE(tier_->Unpin(Pages(Range(20, 8))).ok());
  // 16 more pages would evict all 16 resident ones; the dirty ones'
  // write-back fails.
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  ::signal(SIGXFSZ, SIG_IGN);
  rlimit low = old;
  low.rlim_cur = 40 * kPage;
  auto limit = [&](bool on) { ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, on ? &low : &old), 0); };
  limit(true);
  const std::vector<PageAddr> next = Pages(Range(0, 16));
  auto r = tier_->MakeResident(kBase, next, 0, /*for_write=*/false, 3);
  const Status wb = tier_->WriteBack(Pages({41}));
  auto evict = tier_->EvictCopies(Pages({42}));
  limit(false);
  ::signal(SIGXFSZ, SIG_DFL);
  EXPECT_EQ(r.status().code(), StatusCode::kIoError) << r.status().ToString();
  EXPECT_EQ(wb.code(), StatusCode::kIoError) << wb.ToString();
  EXPECT_EQ(evict.code(), StatusCode::kIoError) << evict.ToString();
  EXPECT_EQ(tier_->stats().write_backs_failed, 3u);
  for (PageAddr p : next) {
    EXPECT_FALSE(tier_->table().GpuOf(p).has_value()) << "nothing placed";
    EXPECT_EQ(tier_->table().PinsOf(p), 0u);
  }
  for (uint64_t i = 0; i < 8; ++i) {
    EXPECT_EQ(tier_->table().GpuOf(P(40 + i)), 0u) << "kept on the GPU: " << 40 + i;
    EXPECT_TRUE(tier_->table().IsDirty(P(40 + i)));
    EXPECT_EQ(tier_->SlotOf(P(40 + i)), (*a)[i]) << "in its slot";
    EXPECT_EQ(ReadDevice(0, (*a)[i]), model_[40 + i]);
    EXPECT_FALSE(tier_->table().GpuOf(P(20 + i)).has_value()) << "clean, evicted as planned";
  }
  EXPECT_EQ(Pool(0)->used_slots(), 8u);
  EXPECT_TRUE(tier_->TakePagesToLeave().empty());
  // The store takes bytes again: the same call goes through, the dirty
  // pages written back on their eviction.
  auto again = tier_->MakeResident(kBase, next, 0, /*for_write=*/false, 4);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  for (uint64_t i = 0; i < 8; ++i) {
    EXPECT_EQ(ReadStore(40 + i), model_[40 + i]) << "page " << 40 + i;
    EXPECT_FALSE(tier_->table().GpuOf(P(40 + i)).has_value());
  }
  for (size_t i = 0; i < next.size(); ++i) EXPECT_EQ(ReadDevice(0, (*again)[i]), model_[i]);
  EXPECT_TRUE(tier_->Unpin(next).ok());
  EXPECT_TRUE(tier_->RemoveRegion(kBase).ok());
}

// A page moving to another GPU whose write-back fails stays where it was,
// dirty; so does a page the host budget sends away (it does not leave).
TEST_P(DeviceTierTest, AFailedWriteBackUndoesAMoveAndALeave) {
  TierConfig c;
  c.devices = 2;
  c.map_for_copies = false;
  c.host_budget_pages = 1;
  Build(c);
  auto a = tier_->MakeResident(kBase, Pages({44}), 0, /*for_write=*/true, 1);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  KernelWrite(0, 44, (*a)[0]);
  ASSERT_TRUE(tier_->Unpin(Pages({44})).ok());
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  ::signal(SIGXFSZ, SIG_IGN);
  rlimit low = old;
  low.rlim_cur = 40 * kPage;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &low), 0);
  auto moved = tier_->MakeResident(kBase, Pages({44}), 1, /*for_write=*/false, 2);
  // A second host page passes the budget of one: page 44 would leave.
  const Status leave = tier_->AddHostPage(P(1), 3);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  ::signal(SIGXFSZ, SIG_DFL);
  EXPECT_EQ(moved.status().code(), StatusCode::kIoError) << moved.status().ToString();
  EXPECT_EQ(leave.code(), StatusCode::kIoError) << leave.ToString();
  EXPECT_EQ(tier_->table().GpuOf(P(44)), 0u);
  EXPECT_TRUE(tier_->table().IsDirty(P(44)));
  EXPECT_EQ(tier_->table().PinsOf(P(44)), 0u);
  EXPECT_FALSE(tier_->table().IsLeaving(P(44)));
  EXPECT_TRUE(tier_->TakePagesToLeave().empty());
  EXPECT_EQ(ReadDevice(0, (*a)[0]), model_[44]);
  EXPECT_EQ(Pool(1)->used_slots(), 0u);
  // Now through: the page moves with its bytes.
  auto again = tier_->MakeResident(kBase, Pages({44}), 1, /*for_write=*/false, 4);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(ReadDevice(1, (*again)[0]), model_[44]);
  EXPECT_EQ(ReadStore(44), model_[44]);
  ASSERT_TRUE(tier_->Unpin(Pages({44})).ok());
}

// Direct copies: a block whose bytes are all in the memfd is registered
// with the backend once, and its pages move between its mapping and their
// slots with no staging, both ways; the registration outlives the calls.
TEST_P(DeviceTierTest, DirectCopiesRegisterEachBlockOnce) {
  TierConfig c;
  c.direct = 1;
  c.devices = 1;
  Build(c);  // 48 pages of 4 KiB: one block, the region's end cuts it
  const std::vector<PageAddr> pages = Pages(Range(0, 8));
  ASSERT_EQ(WriteOnGpuAndBack(Range(0, 8), 1).size(), 8u);
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 8u);
  EXPECT_EQ(tier_->stats().direct_pages_to_host, 8u);
  EXPECT_EQ(tier_->stats().blocks_registered, 1u);
  EXPECT_EQ(backend_->registered_count(), 1u);
  EXPECT_EQ(backend_->registered_bytes(), 48u * kPage);
  ASSERT_TRUE(tier_->Unpin(pages).ok());
  auto more = tier_->MakeResident(kBase, Pages(Range(8, 8)), 0, false, 2);
  ASSERT_TRUE(more.ok()) << more.status().ToString();
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 16u);
  EXPECT_EQ(tier_->stats().blocks_registered, 1u) << "the block stays registered";
  ASSERT_TRUE(tier_->Unpin(Pages(Range(8, 8))).ok());
  // Off, nothing is registered and every page is staged.
  tier_.reset();  // before the backend and store it uses
  test_streams_.clear();
  c.direct = 0;
  Build(c);
  ASSERT_TRUE(tier_->MakeResident(kBase, pages, 0, false, 1).ok());
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 0u);
  EXPECT_EQ(backend_->registered_count(), 0u);
  ASSERT_TRUE(tier_->Unpin(pages).ok());
}

// Past pinned_limit_bytes, the blocks least recently copied through are
// unpinned first; a call whose own blocks fill the limit stages the rest.
TEST_P(DeviceTierTest, PinnedMemoryStaysUnderItsLimit) {
  constexpr uint64_t kBlock = (2 << 20) / kPage;
  TierConfig c;
  c.direct = 1;
  c.devices = 1;
  c.region_pages = 3 * kBlock;
  c.pinned_limit_pages = 2 * kBlock;
  Build(c);
  const DeviceTierStats& s = tier_->stats();
  // Maps `pages` (read), checks their bytes on the device, unpins them.
  auto map = [&](const std::vector<uint64_t>& idx, uint64_t token) {
    auto ptrs = tier_->MakeResident(kBase, Pages(idx), 0, /*for_write=*/false, token);
    ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
    for (size_t i = 0; i < idx.size(); ++i) {
      EXPECT_EQ(ReadDevice(0, (*ptrs)[i]), model_[idx[i]]) << idx[i];
    }
    ASSERT_TRUE(tier_->Unpin(Pages(idx)).ok());
  };
  map(Range(0, 4), 1);
  map(Range(kBlock, 4), 2);
  EXPECT_EQ(backend_->registered_count(), 2u);
  EXPECT_EQ(s.pinned_bytes, 2 * kBlock * kPage);
  map(Range(2 * kBlock, 4), 3);  // block 0 was used longest ago: it goes
  EXPECT_EQ(s.blocks_unpinned_for_room, 1u);
  EXPECT_EQ(backend_->registered_count(), 2u);
  map(Range(4, 4), 4);  // block 0 again: block 1 goes, block 2 stays
  EXPECT_EQ(s.blocks_unpinned_for_room, 2u);
  EXPECT_EQ(s.blocks_registered, 4u);
  map(Range(2 * kBlock + 4, 4), 5);
  EXPECT_EQ(s.blocks_registered, 4u) << "block 2 stayed registered";
  EXPECT_EQ(s.direct_pages_to_device, 20u);
  // One call through all three blocks: two fit the limit, the third's run
  // is staged, and no block of the call is unpinned under it.
  std::vector<uint64_t> all = Range(8, 4);
  for (uint64_t i : Range(kBlock + 8, 4)) all.push_back(i);
  for (uint64_t i : Range(2 * kBlock + 8, 4)) all.push_back(i);
  map(all, 6);
  EXPECT_EQ(s.direct_pages_to_device, 28u);
  EXPECT_EQ(s.pages_to_device, 32u);
  EXPECT_EQ(backend_->registered_count(), 2u);
  EXPECT_LE(s.pinned_bytes, 2 * kBlock * kPage);
}

// Pages that could copy direct but whose runs of neighbours are shorter
// than direct_min_bytes are staged, bytes and all; long runs go direct.
TEST_P(DeviceTierTest, ShortDirectRunsAreStaged) {
  TierConfig c;
  c.direct = 1;
  c.direct_min_pages = 4;
  c.devices = 1;
  Build(c);
  const std::vector<PageAddr> scattered = Pages({0, 2, 4, 6});  // runs of one page
  auto a = tier_->MakeResident(kBase, scattered, 0, false, 1);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 0u);
  EXPECT_EQ(tier_->stats().pages_to_device, 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(ReadDevice(0, (*a)[i]), model_[2 * i]) << i;
  const std::vector<PageAddr> run = Pages(Range(8, 8));
  auto b = tier_->MakeResident(kBase, run, 0, false, 2);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 8u);
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(ReadDevice(0, (*b)[i]), model_[8 + i]) << i;
  ASSERT_TRUE(tier_->Unpin(scattered).ok());
  ASSERT_TRUE(tier_->Unpin(run).ok());
}

// Pages dropped in order and brought back take their freed slots in the
// same order (a pool hands out the last freed first): neighbours stay
// neighbours on the device, and copy as one, direct.
TEST_P(DeviceTierTest, PagesTakeFreedSlotsInAddressOrder) {
  TierConfig c;
  c.direct = 1;
  c.direct_min_pages = 4;
  c.devices = 1;
  Build(c);
  const std::vector<PageAddr> pages = Pages(Range(0, 8));
  for (uint64_t round = 1; round <= 2; ++round) {
    SCOPED_TRACE(round);
    const DeviceTierStats before = tier_->stats();
    auto ptrs = tier_->MakeResident(kBase, pages, 0, false, round);
    ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
    for (size_t i = 1; i < 8; ++i) EXPECT_EQ((*ptrs)[i], (*ptrs)[i - 1] + kPage) << i;
    EXPECT_EQ(tier_->stats().direct_pages_to_device - before.direct_pages_to_device, 8u);
    EXPECT_EQ(tier_->stats().to_device_entries - before.to_device_entries, 2u);  // 2 batches of 4
    for (size_t i = 0; i < 8; ++i) EXPECT_EQ(ReadDevice(0, (*ptrs)[i]), model_[i]) << i;
    ASSERT_TRUE(tier_->Unpin(pages).ok());
    ASSERT_TRUE(tier_->Drop(pages).ok());
  }
}

// A page a transfer holds a view of (a send in flight) is staged, and its
// block let go first: the write-back detaches the view (which keeps the
// bytes it lent) before the page changes, and may punch the page, from a
// copy thread. Once the view is gone the block goes direct again.
TEST_P(DeviceTierTest, APageWithATransfersViewIsStagedAndItsBlockLetGo) {
  TierConfig c;
  c.direct = 1;
  c.devices = 1;
  c.batch_pages = 2;  // several batches: the copy threads write back at once
  Build(c);
  const std::vector<PageAddr> pages = Pages(Range(0, 8));
  auto ptrs = tier_->MakeResident(kBase, pages, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
  EXPECT_EQ(backend_->registered_count(), 1u);
  const std::vector<uint8_t> lent = model_[3];
  auto view = store_->LendForSend(P(3));
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  for (size_t i = 0; i < 8; ++i) KernelWrite(0, i, (*ptrs)[i]);
  ASSERT_TRUE(tier_->WriteBack(pages).ok());
  EXPECT_EQ(tier_->stats().direct_pages_to_host, 0u);
  EXPECT_EQ(backend_->registered_count(), 0u);
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(ReadStore(i), model_[i]) << i;
  EXPECT_EQ(0, std::memcmp(view->get(), lent.data(), kPage)) << "the view keeps what it lent";
  view->reset();
  ASSERT_TRUE(tier_->Unpin(pages).ok());
  ASSERT_TRUE(tier_->Drop(pages).ok());
  auto again = tier_->MakeResident(kBase, pages, 0, false, 2);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 16u);
  EXPECT_EQ(backend_->registered_count(), 1u);
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(ReadDevice(0, (*again)[i]), model_[i]) << i;
  ASSERT_TRUE(tier_->Unpin(pages).ok());
}

// A punch in a registered block (the node gives a page up, retains it,
// or discards the region) ends the block's registration before the page
// goes, since the pinned page would no longer be the memfd's. A block with
// a hole is staged; once whole again it is registered anew and copies the
// new bytes. Pages on both sides of a block boundary never share a copy
// (a copy may not leave its registered block).
TEST_P(DeviceTierTest, APunchEndsTheRegistrationOfItsBlock) {
  TierConfig c;
  c.direct = 1;
  c.devices = 1;
  c.region_pages = 1024;  // two blocks of 2 MiB
  c.budget_pages = 64;
  c.arena_pages = 64;
  c.batch_pages = 16;
  Build(c);
  const std::vector<PageAddr> across = Pages(Range(508, 8));  // 4 pages in each block
  auto ptrs = tier_->MakeResident(kBase, across, 0, false, 1);
  ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 8u);
  EXPECT_EQ(backend_->registered_count(), 2u);
  EXPECT_EQ(tier_->stats().to_device_entries, 2u) << "one copy per block";
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(ReadDevice(0, (*ptrs)[i]), model_[508 + i]) << i;
  ASSERT_TRUE(tier_->Unpin(across).ok());

  // The node loses page 5: coherence drops it from the tier, the store punches it.
  ASSERT_TRUE(tier_->Drop(Pages({5})).ok());
  ASSERT_TRUE(store_->Discard(P(5)).ok());
  EXPECT_EQ(backend_->registered_count(), 1u);
  EXPECT_EQ(tier_->stats().blocks_unregistered, 1u);
  // Its block has a hole: staged, bytes still right.
  auto staged = tier_->MakeResident(kBase, Pages({6}), 0, false, 2);
  ASSERT_TRUE(staged.ok()) << staged.status().ToString();
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 8u);
  EXPECT_EQ(ReadDevice(0, (*staged)[0]), model_[6]);
  ASSERT_TRUE(tier_->Unpin(Pages({6})).ok());
  // Page 5 comes back with new bytes: the block is whole, registered again.
  model_[5] = RandomBytes(kPage, rng_);
  ASSERT_TRUE(store_->WritePage(P(5), model_[5]).ok());
  auto back = tier_->MakeResident(kBase, Pages({5}), 0, false, 3);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 9u);
  EXPECT_EQ(tier_->stats().blocks_registered, 3u);
  EXPECT_EQ(ReadDevice(0, (*back)[0]), model_[5]);
  ASSERT_TRUE(tier_->Unpin(Pages({5})).ok());

  // A retained page (its local access revoked) leaves a hole too.
  ASSERT_TRUE(store_->Retain(P(600)).ok());
  EXPECT_EQ(backend_->registered_count(), 1u);
  auto kept = tier_->MakeResident(kBase, Pages({600}), 0, false, 4);
  ASSERT_TRUE(kept.ok()) << kept.status().ToString();
  EXPECT_EQ(ReadDevice(0, (*kept)[0]), model_[600]) << "the retained bytes, staged";
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 9u);
  ASSERT_TRUE(tier_->Unpin(Pages({600})).ok());

  // The region's removal ends the rest; so does the tier's end.
  ASSERT_TRUE(tier_->RemoveRegion(kBase).ok());
  EXPECT_EQ(backend_->registered_count(), 0u);
  EXPECT_EQ(tier_->stats().pinned_bytes, 0u);
  ASSERT_TRUE(tier_->AddRegion(store_.get()).ok());
  ASSERT_TRUE(tier_->MakeResident(kBase, Pages({1}), 0, false, 5).ok());
  EXPECT_EQ(backend_->registered_count(), 1u);
  tier_.reset();
  EXPECT_EQ(backend_->registered_count(), 0u);
  // A punch after the tier is gone reaches no listener.
  EXPECT_TRUE(store_->Discard(P(1)).ok());
}

// A hugetlb store's pages copy direct too: each 2 MiB page is its own
// block, registered once, and a punch ends its registration. Needs hugetlb
// pages reserved (vm.nr_hugepages); skipped without, unless
// DSVM_REQUIRE_HUGETLB is set (tests/unit/with-hugetlb.sh reserves them).
TEST_P(DeviceTierTest, HugetlbPagesCopyDirect) {
  constexpr uint32_t kHuge = 2 << 20;
  TierConfig c;
  c.hugetlb = true;
  c.page_size = kHuge;
  c.region_pages = 4;
  c.budget_pages = 4;
  c.arena_pages = 4;
  c.batch_pages = 1;
  c.devices = 1;
  c.direct = 1;
  Build(c);
  if (!store_->hugetlb()) {
    ASSERT_EQ(std::getenv("DSVM_REQUIRE_HUGETLB"), nullptr) << "the store got no hugetlb pages";
    GTEST_SKIP() << "no hugetlb pages reserved (vm.nr_hugepages): the store is a plain memfd";
  }
  const std::vector<PageAddr> pages = Pages({0, 1, 2});
  ASSERT_EQ(WriteOnGpuAndBack({0, 1, 2}, 1).size(), 3u);
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 3u);
  EXPECT_EQ(tier_->stats().direct_pages_to_host, 3u);
  EXPECT_EQ(tier_->stats().blocks_registered, 3u) << "one block per huge page";
  EXPECT_EQ(backend_->registered_bytes(), 3ull * kHuge);
  ASSERT_TRUE(tier_->Unpin(pages).ok());
  // The node loses page 1: its registration ends before the punch (the
  // emulated backend would refuse a copy of a registered page that left).
  ASSERT_TRUE(tier_->Drop(Pages({1})).ok());
  ASSERT_TRUE(store_->Discard(P(1)).ok());
  EXPECT_EQ(backend_->registered_count(), 2u);
  // It comes back with new bytes: the page is registered anew.
  model_[1] = RandomBytes(kHuge, rng_);
  ASSERT_TRUE(store_->WritePage(P(1), model_[1]).ok());
  auto back = tier_->MakeResident(kBase, Pages({1, 3}), 0, false, 2);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(tier_->stats().direct_pages_to_device, 5u);
  EXPECT_EQ(tier_->stats().blocks_registered, 5u);
  EXPECT_EQ(ReadDevice(0, (*back)[0]), model_[1]);
  EXPECT_EQ(ReadDevice(0, (*back)[1]), model_[3]);
  ASSERT_TRUE(tier_->Unpin(Pages({1, 3})).ok());
  ASSERT_TRUE(tier_->RemoveRegion(kBase).ok());
  EXPECT_EQ(backend_->registered_count(), 0u);
}

TEST(DeviceTierCreateTest, RefusesBadOptions) {
  auto b = MakeDeviceBackend("emulated", {});  // one GPU
  ASSERT_TRUE(b.ok());
  const std::vector<uint64_t> budgets = {1 << 20};
  EXPECT_TRUE(DeviceTier::Create(b->get(), budgets).ok());
  const auto kInvalid = StatusCode::kInvalidArgument;
  EXPECT_EQ(DeviceTier::Create(nullptr, budgets).status().code(), kInvalid);
  EXPECT_EQ(DeviceTier::Create(b->get(), {}).status().code(), kInvalid);
  EXPECT_EQ(DeviceTier::Create(b->get(), {0}).status().code(), kInvalid);
  EXPECT_EQ(DeviceTier::Create(b->get(), {1 << 20, 1 << 20}).status().code(), kInvalid);
  DeviceTierOptions o;
  o.streams_per_gpu = 1;
  EXPECT_EQ(DeviceTier::Create(b->get(), budgets, o).status().code(), kInvalid);
  o = {};
  o.batch_bytes = (1 << 20) + 1;
  EXPECT_EQ(DeviceTier::Create(b->get(), budgets, o).status().code(), kInvalid);
  o = {};
  o.arena_bytes = 0;
  EXPECT_EQ(DeviceTier::Create(b->get(), budgets, o).status().code(), kInvalid);
  o.arena_bytes = 6000;
  EXPECT_EQ(DeviceTier::Create(b->get(), budgets, o).status().code(), kInvalid);
  o = {};
  o.copy_threads = 0;
  EXPECT_EQ(DeviceTier::Create(b->get(), budgets, o).status().code(), kInvalid);
  o.copy_threads = 65;
  EXPECT_EQ(DeviceTier::Create(b->get(), budgets, o).status().code(), kInvalid);
  o = {};
  o.pinned_limit_bytes = (2 << 20) - 4096;  // less than one block: no direct copy could run
  EXPECT_EQ(DeviceTier::Create(b->get(), budgets, o).status().code(), kInvalid);
  o.pinned_limit_bytes = 2 << 20;
  EXPECT_TRUE(DeviceTier::Create(b->get(), budgets, o).ok());
  // The default: half the host's memory.
  const uint64_t memory = uint64_t(::sysconf(_SC_PHYS_PAGES)) * uint64_t(::sysconf(_SC_PAGESIZE));
  EXPECT_EQ(DefaultPinnedLimit(), memory / 2);
  // A region whose pages do not fit one batch.
  {
    o = {};
    o.batch_bytes = 32 << 10;
    auto t = DeviceTier::Create(b->get(), budgets, o);
    ASSERT_TRUE(t.ok());
    PageStoreOptions so;
    so.try_hugetlb = false;
    auto store = PageStore::Create(kBase, 1 << 20, 64 << 10, so);
    ASSERT_TRUE(store.ok());
    EXPECT_EQ((*t)->AddRegion(store->get()).code(), kInvalid);
    EXPECT_EQ((*t)->pool_count(), 0u);
  }
  // The tier's streams and staging go with it: a lane each, and two
  // streams for direct copies.
  const size_t streams = (*b)->stream_count();
  {
    auto t = DeviceTier::Create(b->get(), budgets);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ((*b)->stream_count(), streams + 2 + 2);
    EXPECT_EQ((*b)->staging_count(), 2u);
  }
  EXPECT_EQ((*b)->stream_count(), streams);
  EXPECT_EQ((*b)->staging_count(), 0u);
  // Two waves' worth of lanes for the copy threads.
  o = {};
  o.copy_threads = 3;
  {
    auto t = DeviceTier::Create(b->get(), budgets, o);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ((*b)->stream_count(), streams + 6 + 2);
    EXPECT_EQ((*b)->staging_count(), 6u);
  }
}


// --- Runs (dsvm_gpu_map) ---------------------------------------------------

// A run's pages sit in adjacent slots in address order, behind one pointer;
// pages resident elsewhere on the GPU move into it with their bytes, by a
// copy on the device (no write-back, no copy from the host; their dirty
// bits go with them).
TEST_P(DeviceTierTest, ARunHoldsItsPagesInAddressOrder) {
  Build();
  // Pages 9, 5 and 3 resident first, in that order: slots 0, 1, 2.
  for (uint64_t i : {9, 5, 3}) {
    const std::vector<PageAddr> one = Pages({i});
    ASSERT_TRUE(tier_->MakeResident(kBase, one, 0, /*for_write=*/true, 1).ok());
    ASSERT_TRUE(tier_->Unpin(one).ok());
  }
  KernelWrite(0, 5, tier_->SlotOf(P(5)));  // dirty on the GPU: must move with its bytes
  const std::vector<PageAddr> pages = Pages(Range(4, 8));
  auto run = tier_->MapRun(kBase, pages, 0, /*for_write=*/false, 2);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  EXPECT_EQ(run->bytes, 8ull * kPage);
  EXPECT_EQ(run->ptr, run->arena + run->offset);
  for (size_t i = 0; i < pages.size(); ++i) {
    EXPECT_EQ(tier_->SlotOf(pages[i]), run->ptr + i * kPage) << "page " << 4 + i;
    EXPECT_EQ(ReadDevice(0, run->ptr + i * kPage), model_[4 + i]) << "page " << 4 + i;
    EXPECT_EQ(tier_->table().PinsOf(pages[i]), 1u);
  }
  EXPECT_EQ(tier_->stats().pages_moved_on_device, 2u) << "pages 9 and 5";
  EXPECT_EQ(tier_->stats().pages_to_host, 0u);
  EXPECT_EQ(tier_->stats().pages_to_device, 3u + 6u) << "the run's other 6 pages";
  EXPECT_TRUE(tier_->table().IsDirty(P(5)));
  EXPECT_TRUE(tier_->table().IsDirty(P(9)));
  EXPECT_EQ(tier_->table().GpuOf(P(3)), 0u) << "page 3 is not in the range and stays";
  EXPECT_EQ(Pool(0)->used_slots(), 9u);
  ASSERT_TRUE(tier_->WriteBack(Pages({5})).ok());
  EXPECT_EQ(ReadStore(5), model_[5]) << "the GPU's bytes, from the run's slot";
  // The same range again is in place: hits, one more pin, no copies.
  const uint64_t copies = tier_->stats().pages_to_device;
  auto again = tier_->MapRun(kBase, pages, 0, false, 3);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->ptr, run->ptr);
  EXPECT_EQ(tier_->stats().pages_to_device, copies);
  EXPECT_EQ(tier_->table().PinsOf(pages[0]), 2u);
  ASSERT_TRUE(tier_->Unpin(pages).ok());
  ASSERT_TRUE(tier_->Unpin(pages).ok());
}

// With the budget full, a run evicts the unpinned pages in its window (dirty
// ones written back) and never a pinned one.
TEST_P(DeviceTierTest, ARunEvictsByPlaceWhenTheBudgetIsFull) {
  Build();
  const std::vector<PageAddr> first = Pages(Range(0, 8));
  auto pinned = tier_->MapRun(kBase, first, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(pinned.ok()) << pinned.status().ToString();
  const std::vector<PageAddr> second = Pages(Range(8, 8));
  auto dirty = tier_->MapRun(kBase, second, 0, /*for_write=*/true, 2);
  ASSERT_TRUE(dirty.ok()) << dirty.status().ToString();
  for (size_t i = 0; i < 8; ++i) KernelWrite(0, 8 + i, dirty->ptr + i * kPage);
  ASSERT_TRUE(tier_->Unpin(second).ok());
  EXPECT_EQ(Pool(0)->used_slots(), 16u);
  const std::vector<PageAddr> third = Pages(Range(20, 8));
  auto run = tier_->MapRun(kBase, third, 0, false, 3);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  EXPECT_EQ(run->ptr, dirty->ptr) << "the only window without pinned pages";
  EXPECT_EQ(tier_->stats().run_evictions, 8u);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(ReadStore(8 + i), model_[8 + i]) << "dirty page " << 8 + i << " written back";
    EXPECT_FALSE(tier_->table().GpuOf(P(8 + i)).has_value());
    EXPECT_EQ(ReadDevice(0, run->ptr + i * kPage), model_[20 + i]);
  }
  // Everything is pinned now: no window for another run.
  auto none = tier_->MapRun(kBase, Pages(Range(30, 2)), 0, false, 4);
  EXPECT_EQ(none.status().code(), StatusCode::kResourceExhausted) << none.status().ToString();
  EXPECT_TRUE(tier_->Unpin(first).ok());
  EXPECT_TRUE(tier_->Unpin(third).ok());
}

// With the budget full of unpinned runs, a new run evicts the least
// recently used one (the table's order), not the first arena that would
// do: a stream of chunks through the budget keeps the chunks used last.
// Fails without: the run took arena 0, evicting the run mapped just before.
TEST_P(DeviceTierTest, ARunEvictsTheColdestRun) {
  TierConfig c;
  c.arena_pages = 4;  // four arenas of one run each
  Build(c);
  uint64_t tick = 1;
  auto map = [&](uint64_t first) {
    const std::vector<PageAddr> pages = Pages(Range(first, 4));
    auto run = tier_->MapRun(kBase, pages, 0, /*for_write=*/false, tick++);
    EXPECT_TRUE(run.ok()) << run.status().ToString();
    EXPECT_TRUE(tier_->Unpin(pages).ok());
    return run.ok() ? run->ptr : DevicePtr{0};
  };
  const DevicePtr a = map(0);
  const DevicePtr b = map(4);
  map(8);
  map(12);
  EXPECT_EQ(map(0), a) << "in place";
  const uint64_t copies = tier_->stats().pages_to_device;
  EXPECT_EQ(map(16), b) << "the run of pages 4-7, used least recently, made room";
  EXPECT_EQ(tier_->stats().pages_to_device, copies + 4);
  EXPECT_FALSE(tier_->table().GpuOf(P(4)).has_value());
  EXPECT_EQ(map(0), a) << "the run used just before stayed";
  EXPECT_EQ(tier_->stats().pages_to_device, copies + 4) << "and was not copied again";
  for (uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(ReadDevice(0, a + i * kPage), model_[i]);
    EXPECT_EQ(ReadDevice(0, b + i * kPage), model_[16 + i]);
  }
}

TEST_P(DeviceTierTest, RunRefusals) {
  Build();
  EXPECT_EQ(tier_->MapRun(kBase, Pages({1, 3}), 0, false, 1).status().code(),
            StatusCode::kInvalidArgument)
      << "not consecutive";
  EXPECT_EQ(tier_->MapRun(kBase, {}, 0, false, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tier_->MapRun(kBase, Pages(Range(0, 17)), 0, false, 1).status().code(),
            StatusCode::kResourceExhausted)
      << "larger than the budget";
  EXPECT_EQ(tier_->MapRun(kBase, Pages(Range(0, 2)), 7, false, 1).status().code(),
            StatusCode::kInvalidArgument)
      << "no such gpu";
  ASSERT_TRUE(tier_->MapRun(kBase, Pages(Range(0, 4)), 0, false, 1).ok());
  auto overlap = tier_->MapRun(kBase, Pages(Range(2, 4)), 0, false, 2);
  EXPECT_EQ(overlap.status().code(), StatusCode::kFailedPrecondition) << overlap.status().ToString();
  auto other_gpu = tier_->MapRun(kBase, Pages(Range(0, 4)), 1, false, 2);
  EXPECT_EQ(other_gpu.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(tier_->table().PinsOf(P(2)), 1u) << "refusals change nothing";
}

// A map of pages already in place on the GPU needs no room: the other
// regions' unpinned pages stay (no arena of theirs is reclaimed for it).
// Fails when the room asked for counted every page of the call: a second
// map of the same range emptied the other region's arena.
TEST_P(DeviceTierTest, PagesInPlaceNeedNoRoom) {
  TierConfig c;
  c.arena_pages = 8;
  Build(c);
  constexpr PageAddr kOther = kBase + (1ull << 30);
  std::unique_ptr<PageStore> other = PlainStore(kOther, 8 * kPage, kPage);
  ASSERT_NE(other, nullptr);
  ASSERT_TRUE(tier_->AddRegion(other.get()).ok());
  const std::vector<PageAddr> mine = Pages(Range(0, 8));
  ASSERT_TRUE(tier_->MapRun(kBase, mine, 0, /*for_write=*/false, 1).ok());
  std::vector<PageAddr> theirs;
  for (uint64_t i = 0; i < 8; ++i) theirs.push_back(kOther + i * kPage);
  ASSERT_TRUE(tier_->MakeResident(kOther, theirs, 0, /*for_write=*/false, 2).ok());
  ASSERT_TRUE(tier_->Unpin(theirs).ok());  // cached, unpinned: the budget (16) is full
  ASSERT_TRUE(tier_->MapRun(kBase, mine, 0, /*for_write=*/false, 3).ok());  // in place
  EXPECT_EQ(tier_->stats().arenas_reclaimed, 0u);
  for (PageAddr p : theirs) EXPECT_EQ(tier_->table().GpuOf(p), 0u) << "page " << std::hex << p;
  ASSERT_TRUE(tier_->Unpin(mine).ok());
  ASSERT_TRUE(tier_->Unpin(mine).ok());
  ASSERT_TRUE(tier_->RemoveRegion(kOther).ok());
}

// A run larger than an arena gets a dedicated arena.
TEST_P(DeviceTierTest, ARunLargerThanAnArenaGetsItsOwn) {
  TierConfig c;
  c.arena_pages = 4;
  Build(c);
  const std::vector<PageAddr> pages = Pages(Range(10, 6));
  auto run = tier_->MapRun(kBase, pages, 1, /*for_write=*/false, 1);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  EXPECT_EQ(run->arena_bytes, 6ull * kPage);
  EXPECT_EQ(run->offset, 0u);
  for (size_t i = 0; i < pages.size(); ++i) {
    EXPECT_EQ(ReadDevice(1, run->ptr + i * kPage), model_[10 + i]);
  }
  ASSERT_TRUE(tier_->Unpin(pages).ok());
}

// A call the table refuses makes no room first: another region's arenas,
// full of evictable pages, are not reclaimed for it. Refused here: a page
// listed twice (MakeResident), and a run whose pages are mapped on another
// GPU (MapRun). Before the checks came first, each refusal had emptied
// arenas of the other region.
TEST(DeviceTierSharedBudgetTest, ARefusedCallReclaimsNoArena) {
  std::unique_ptr<DeviceBackend> backend = EmulatedGpus(2);
  ASSERT_NE(backend, nullptr);
  constexpr uint64_t kBudget = 256u << 10;
  const PageAddr a_base = kBase, b_base = kBase + (64u << 20);
  std::unique_ptr<PageStore> a = PlainStore(a_base, 1u << 20, 4096);
  std::unique_ptr<PageStore> bs = PlainStore(b_base, 1u << 20, 4096);
  ASSERT_TRUE(a != nullptr && bs != nullptr);
  for (uint64_t i = 0; i < 64; ++i) {
    ASSERT_TRUE(a->ZeroPage(a_base + i * 4096).ok());
    ASSERT_TRUE(bs->ZeroPage(b_base + i * 4096).ok());
  }
  DeviceTierOptions to;
  to.arena_bytes = 64u << 10;
  auto t = DeviceTier::Create(backend.get(), {kBudget, kBudget}, to);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::unique_ptr<DeviceTier> tier = std::move(t).value();
  ASSERT_TRUE(tier->AddRegion(a.get()).ok());
  ASSERT_TRUE(tier->AddRegion(bs.get()).ok());
  // Region B fills GPU 0's budget, unpinned (evictable).
  std::vector<PageAddr> bp;
  for (uint64_t i = 0; i < 64; ++i) bp.push_back(b_base + i * 4096);
  ASSERT_TRUE(tier->MakeResident(b_base, bp, 0, false, 1).ok());
  ASSERT_TRUE(tier->Unpin(bp).ok());
  auto b_on_gpu0 = [&] {
    uint64_t n = 0;
    for (PageAddr p : bp) n += tier->table().GpuOf(p) == std::optional<uint32_t>(0);
    return n;
  };
  ASSERT_EQ(b_on_gpu0(), 64u);
  // Region A's first pages are mapped on GPU 1.
  const std::vector<PageAddr> a_run = {a_base, a_base + 4096};
  ASSERT_TRUE(tier->MapRun(a_base, a_run, 1, false, 2).ok());

  const std::vector<PageAddr> twice = {a_base + 8 * 4096, a_base + 8 * 4096};
  EXPECT_EQ(tier->MakeResident(a_base, twice, 0, false, 3).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(tier->MapRun(a_base, a_run, 0, false, 4).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(tier->stats().arenas_reclaimed, 0u);
  EXPECT_EQ(b_on_gpu0(), 64u) << "region B's pages left GPU 0 for calls that were refused";
  // A call that is taken still gets its room.
  const std::vector<PageAddr> more = {a_base + 16 * 4096, a_base + 17 * 4096};
  ASSERT_TRUE(tier->MakeResident(a_base, more, 0, false, 5).ok());
  EXPECT_EQ(tier->stats().arenas_reclaimed, 1u);
  ASSERT_TRUE(tier->Unpin(more).ok());
  ASSERT_TRUE(tier->Unpin(a_run).ok());
}

// One budget per GPU, shared by the regions' pools: a region of 4 KiB
// pages fills it; a region of 64 KiB pages then takes memory back an arena
// at a time, evicting 4 KiB pages (dirty ones written back first), but
// never pinned ones. The arenas each region gets hold its pages only.
TEST(DeviceTierSharedBudgetTest, RegionsShareOneBudgetPerGpu) {
  std::unique_ptr<DeviceBackend> backend = EmulatedGpus(1);
  ASSERT_NE(backend, nullptr);
  constexpr uint64_t kBudget = 512u << 10;
  const PageAddr small_base = kBase, large_base = kBase + (64u << 20);
  std::unique_ptr<PageStore> small = PlainStore(small_base, 1u << 20, 4096);
  std::unique_ptr<PageStore> large = PlainStore(large_base, 1u << 20, 65536);
  ASSERT_TRUE(small != nullptr && large != nullptr);
  std::mt19937_64 rng(7);
  std::vector<std::vector<uint8_t>> small_bytes(256), large_bytes(16);
  for (uint64_t i = 0; i < 256; ++i) {
    small_bytes[i] = RandomBytes(4096, rng);
    ASSERT_TRUE(small->WritePage(small_base + i * 4096, small_bytes[i]).ok());
  }
  for (uint64_t i = 0; i < 16; ++i) {
    large_bytes[i] = RandomBytes(65536, rng);
    ASSERT_TRUE(large->WritePage(large_base + i * 65536, large_bytes[i]).ok());
  }
  DeviceTierOptions to;
  to.batch_bytes = 256u << 10;
  to.arena_bytes = 64u << 10;
  auto t = DeviceTier::Create(backend.get(), {kBudget}, to);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::unique_ptr<DeviceTier> tier = std::move(t).value();
  ASSERT_TRUE(tier->AddRegion(small.get()).ok());
  ASSERT_TRUE(tier->AddRegion(large.get()).ok());
  auto stream = backend->CreateStream(0);
  ASSERT_TRUE(stream.ok());
  auto sync = [&] {
    auto f = backend->RecordFence(*stream);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE(backend->Wait(*f).ok());
  };
  // 128 small pages fill the budget; the first 16 are written on the GPU.
  std::vector<PageAddr> sp;
  for (uint64_t i = 0; i < 128; ++i) sp.push_back(small_base + i * 4096);
  auto ptrs = tier->MakeResident(small_base, sp, 0, /*for_write=*/true, 1);
  ASSERT_TRUE(ptrs.ok()) << ptrs.status().ToString();
  for (uint64_t i = 0; i < 16; ++i) {
    small_bytes[i] = RandomBytes(4096, rng);
    ASSERT_TRUE(backend->CopyToDevice(*stream, small_bytes[i].data(), (*ptrs)[i], 4096).ok());
  }
  sync();
  ASSERT_TRUE(tier->Unpin(sp).ok());
  EXPECT_EQ(tier->arena_bytes(0), kBudget);
  // Four large pages need 256 KiB: four small arenas are emptied for them.
  std::vector<PageAddr> lp;
  for (uint64_t i = 0; i < 4; ++i) lp.push_back(large_base + i * 65536);
  auto lptrs = tier->MakeResident(large_base, lp, 0, /*for_write=*/false, 2);
  ASSERT_TRUE(lptrs.ok()) << lptrs.status().ToString();
  EXPECT_EQ(tier->stats().arenas_reclaimed, 4u);
  for (uint64_t i = 0; i < 4; ++i) {
    std::vector<uint8_t> got(65536);
    ASSERT_TRUE(backend->CopyToHost(*stream, (*lptrs)[i], got.data(), got.size()).ok());
    sync();
    EXPECT_EQ(got, large_bytes[i]) << "large page " << i;
  }
  uint64_t on_gpu = 0;
  for (PageAddr p : sp) on_gpu += tier->table().GpuOf(p).has_value();
  EXPECT_EQ(on_gpu, 64u);
  for (uint64_t i = 0; i < 16; ++i) {  // evicted or not, the host has the GPU's bytes
    if (tier->table().GpuOf(sp[i])) {
      ASSERT_TRUE(tier->WriteBack(std::span(&sp[i], 1)).ok());
    }
    std::vector<uint8_t> host(4096);
    ASSERT_TRUE(small->ReadPage(sp[i], host).ok());
    EXPECT_EQ(host, small_bytes[i]) << "small page " << i;
  }
  EXPECT_EQ(tier->arena_bytes(0), kBudget);
  // The rest of the small pages pinned: no more room for large ones.
  std::vector<PageAddr> kept;
  for (PageAddr p : sp) {
    if (tier->table().GpuOf(p)) kept.push_back(p);
  }
  ASSERT_TRUE(tier->MakeResident(small_base, kept, 0, false, 3).ok());
  std::vector<PageAddr> more;
  for (uint64_t i = 4; i < 8; ++i) more.push_back(large_base + i * 65536);
  EXPECT_EQ(tier->MakeResident(large_base, more, 0, false, 4).status().code(),
            StatusCode::kResourceExhausted);
  ASSERT_TRUE(tier->Unpin(kept).ok());
  ASSERT_TRUE(tier->Unpin(lp).ok());
  // Each region's GPU copies lie in its own pool's arenas, never in the
  // other's.
  auto in_pool = [](const DevicePagePool* pool, DevicePtr ptr) {
    for (const DeviceArena& arena : pool->arenas()) {
      if (arena.bytes != 0 && ptr >= arena.base && ptr < arena.base + arena.bytes) return true;
    }
    return false;
  };
  const DevicePagePool* small_pool = tier->PoolOf(0, small_base);
  const DevicePagePool* large_pool = tier->PoolOf(0, large_base);
  ASSERT_NE(small_pool, nullptr);
  ASSERT_NE(large_pool, nullptr);
  for (PageAddr p : kept) {
    EXPECT_TRUE(in_pool(small_pool, tier->SlotOf(p)) && !in_pool(large_pool, tier->SlotOf(p)));
  }
  for (PageAddr p : lp) {
    EXPECT_TRUE(in_pool(large_pool, tier->SlotOf(p)) && !in_pool(small_pool, tier->SlotOf(p)));
  }
  EXPECT_EQ(backend->arena_bytes(0), kBudget);
  tier.reset();
  EXPECT_EQ(backend->arena_bytes(0), 0u) << "the tier's pools gave their arenas back";
}

}  // namespace
}  // namespace dsvm::node
