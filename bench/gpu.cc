#include "bench/gpu.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "bench/bench_output.h"
#include "node/memory/device_backend.h"
#include "node/memory/device_page_pool.h"
#include "node/memory/device_tier.h"
#include "node/memory/page_store.h"

namespace dsvm::bench {

namespace {

using node::DeviceBackend;
using Clock = std::chrono::steady_clock;

constexpr proto::PageAddr kBase = 0x200000000000ull;

double Gbps(uint64_t bytes, Clock::duration d) {
  const double s = std::chrono::duration<double>(d).count();
  return s > 0 ? static_cast<double>(bytes) / s / 1e9 : 0;
}

std::string PageTag(uint32_t page_size) {
  switch (page_size) {
    case 4096: return ".page4k";
    case 65536: return ".page64k";
    default: return "";  // 2 MiB, the default
  }
}

Result<std::unique_ptr<DeviceBackend>> OpenBackend(const std::string& name) {
  if (name != "auto") return node::MakeDeviceBackend(name, {});
  auto cuda = node::MakeDeviceBackend("cuda", {});
  if (cuda.ok()) return cuda;
  std::fprintf(stderr, "dsvm-bench gpu: no GPU here (%s); measuring the emulated backend\n",
               cuda.status().ToString().c_str());
  return node::MakeDeviceBackend("emulated", {});
}

// The floor: the whole size in one copy each way, pinned memory <-> one
// arena, the best of `passes`.
Status MeasureRaw(DeviceBackend& b, const GpuBenchOptions& o, double* h2d, double* d2h) {
  DSVM_ASSIGN_OR_RETURN(node::DeviceArena arena, b.AllocateArena(0, o.bytes));
  DSVM_ASSIGN_OR_RETURN(node::StagingBuffer staging, b.AllocateStaging(o.bytes));
  DSVM_ASSIGN_OR_RETURN(node::StreamId stream, b.CreateStream(0));
  std::fill(staging.data, staging.data + o.bytes, uint8_t{0x5a});
  Status st;
  *h2d = *d2h = 0;
  for (int pass = 0; pass < o.passes && st.ok(); ++pass) {
    auto t0 = Clock::now();
    st = b.CopyToDevice(stream, staging.data, arena.base, o.bytes);
    if (st.ok()) {
      auto fence = b.RecordFence(stream);
      st = fence.ok() ? b.Wait(*fence) : fence.status();
    }
    *h2d = std::max(*h2d, Gbps(o.bytes, Clock::now() - t0));
    if (!st.ok()) break;
    t0 = Clock::now();
    st = b.CopyToHost(stream, arena.base, staging.data, o.bytes);
    if (st.ok()) {
      auto fence = b.RecordFence(stream);
      st = fence.ok() ? b.Wait(*fence) : fence.status();
    }
    *d2h = std::max(*d2h, Gbps(o.bytes, Clock::now() - t0));
  }
  b.DestroyStream(stream).IgnoreError();  // the run's error, if any, is `st`
  b.FreeStaging(staging.data).IgnoreError();
  b.FreeArena(arena.base).IgnoreError();
  return st;
}

uint64_t Checksum(node::PageStore& store, uint32_t page_size) {
  std::vector<uint8_t> page(page_size);
  uint64_t sum = 0;
  for (uint64_t i = 0; i < store.page_count(); ++i) {
    if (!store.ReadPage(store.base() + i * page_size, page).ok()) return 0;
    for (size_t k = 0; k < page.size(); k += 8) {
      uint64_t w;
      std::memcpy(&w, page.data() + k, 8);
      sum = sum * 1099511628211ull + w;
    }
  }
  return sum;
}

}  // namespace

Status RunGpu(const GpuBenchOptions& o) {
  if (o.bytes == 0 || o.bytes % o.page_size != 0 || o.passes < 1 ||
      (o.page_size != 4096 && o.page_size != 65536 && o.page_size != (2u << 20))) {
    return InvalidArgument("--size must be a multiple of --page-size (4K, 64K or 2M)");
  }
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<DeviceBackend> backend, OpenBackend(o.backend));
  const std::string b(backend->name());
  std::fprintf(stderr, "dsvm-bench gpu: backend %s, %.0f MiB each way, %u-byte pages\n",
               b.c_str(), static_cast<double>(o.bytes) / (1 << 20), o.page_size);
  double raw_h2d = 0, raw_d2h = 0;
  DSVM_RETURN_IF_ERROR(MeasureRaw(*backend, o, &raw_h2d, &raw_d2h));

  node::PageStoreOptions so;
  so.name = "dsvm-bench-gpu";
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<node::PageStore> store,
                        node::PageStore::Create(kBase, o.bytes, o.page_size, so));
  std::mt19937_64 rng(42);
  std::vector<uint8_t> bytes(o.page_size);
  std::vector<proto::PageAddr> pages;
  for (uint64_t i = 0; i < store->page_count(); ++i) {
    for (size_t k = 0; k < bytes.size(); k += 8) {
      const uint64_t w = rng();
      std::memcpy(bytes.data() + k, &w, 8);
    }
    pages.push_back(kBase + i * o.page_size);
    DSVM_RETURN_IF_ERROR(store->WritePage(pages.back(), bytes));
  }
  const uint64_t before = Checksum(*store, o.page_size);
  DSVM_ASSIGN_OR_RETURN(
      std::unique_ptr<node::DevicePagePool> pool,
      node::DevicePagePool::Create(backend.get(), {.device = 0, .page_size = o.page_size,
                                                   .budget_bytes = o.bytes}));
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<node::DeviceTier> tier,
                        node::DeviceTier::Create(backend.get(), {pool.get()}));
  DSVM_RETURN_IF_ERROR(tier->AddRegion(store.get()));
  double h2d = 0, d2h = 0;
  uint64_t tick = 1;
  for (int pass = 0; pass < o.passes; ++pass) {
    auto t0 = Clock::now();
    auto resident = tier->MakeResident(kBase, pages, 0, /*for_write=*/true, tick++);
    if (!resident.ok()) return resident.status();
    h2d = std::max(h2d, Gbps(o.bytes, Clock::now() - t0));
    DSVM_RETURN_IF_ERROR(tier->Unpin(pages));
    t0 = Clock::now();
    DSVM_RETURN_IF_ERROR(tier->WriteBack(pages));  // every copy is dirty
    d2h = std::max(d2h, Gbps(o.bytes, Clock::now() - t0));
    DSVM_RETURN_IF_ERROR(tier->Drop(pages));
  }
  if (Checksum(*store, o.page_size) != before) {
    return Internal("the pages came back from the device with other bytes");
  }
  const auto& s = tier->stats();
  std::fprintf(stderr,
               "dsvm-bench gpu: %llu copy calls to the device (%llu entries), %llu back "
               "(%llu entries) for %llu pages each way per pass\n",
               static_cast<unsigned long long>(s.to_device_calls),
               static_cast<unsigned long long>(s.to_device_entries),
               static_cast<unsigned long long>(s.to_host_calls),
               static_cast<unsigned long long>(s.to_host_entries),
               static_cast<unsigned long long>(pages.size()));
  const std::string p = PageTag(o.page_size);
  EmitMetric("gpu." + b + ".bytes", static_cast<double>(o.bytes), "bytes");
  EmitMetric("gpu." + b + ".raw_h2d.gbps", raw_h2d, "GB/s");
  EmitMetric("gpu." + b + ".raw_d2h.gbps", raw_d2h, "GB/s");
  EmitMetric("gpu." + b + ".migrate_h2d" + p + ".gbps", h2d, "GB/s");
  EmitMetric("gpu." + b + ".migrate_d2h" + p + ".gbps", d2h, "GB/s");
  EmitMetric("gpu." + b + ".migrate_h2d" + p + ".vs_raw", raw_h2d > 0 ? h2d / raw_h2d : 0, "ratio");
  EmitMetric("gpu." + b + ".migrate_d2h" + p + ".vs_raw", raw_d2h > 0 ? d2h / raw_d2h : 0, "ratio");
  return Status::Ok();
}

}  // namespace dsvm::bench
