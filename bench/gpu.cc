#include "bench/gpu.h"

#include <dsvm/dsvm.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "bench/bench_output.h"
#include "bench/cluster.h"
#include "bench/coordinator_process.h"
#include "bench/node_process.h"
#include "examples/embedding_bag.h"
#include "node/memory/device_backend.h"
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

uint32_t CopyThreads(const GpuBenchOptions& o) {
  return o.copy_threads != 0 ? o.copy_threads : node::DefaultCopyThreads();
}

// One tier over `store`, moving `pages` there and back for o.passes passes
// (the best pass counts; `cold_h2d` is the first's host-to-device rate).
struct TierRun {
  double h2d = 0, d2h = 0, cold_h2d = 0;
  node::DeviceTierStats stats;
};

Status MeasureTier(const GpuBenchOptions& o, DeviceBackend* backend, node::PageStore* store,
                   const std::vector<proto::PageAddr>& pages, bool direct, TierRun* run) {
  node::DeviceTierOptions to;
  to.copy_threads = CopyThreads(o);
  to.direct_copies = direct;
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<node::DeviceTier> tier,
                        node::DeviceTier::Create(backend, std::vector<uint64_t>{o.bytes}, to));
  DSVM_RETURN_IF_ERROR(tier->AddRegion(store));
  uint64_t tick = 1;
  for (int pass = 0; pass < o.passes; ++pass) {
    auto t0 = Clock::now();
    auto resident = tier->MakeResident(kBase, pages, 0, /*for_write=*/true, tick++);
    if (!resident.ok()) return resident.status();
    const double h2d = Gbps(o.bytes, Clock::now() - t0);
    if (pass == 0) run->cold_h2d = h2d;
    run->h2d = std::max(run->h2d, h2d);
    DSVM_RETURN_IF_ERROR(tier->Unpin(pages));
    t0 = Clock::now();
    DSVM_RETURN_IF_ERROR(tier->WriteBack(pages));  // every copy is dirty
    run->d2h = std::max(run->d2h, Gbps(o.bytes, Clock::now() - t0));
    DSVM_RETURN_IF_ERROR(tier->Drop(pages));
  }
  run->stats = tier->stats();
  const auto& s = run->stats;
  std::fprintf(stderr,
               "dsvm-bench gpu: direct copies %s: %llu copy calls to the device (%llu entries, "
               "%llu pages direct), %llu back (%llu entries, %llu direct) over %d passes of %llu "
               "pages each way; %llu blocks pinned\n",
               direct ? "on" : "off", static_cast<unsigned long long>(s.to_device_calls),
               static_cast<unsigned long long>(s.to_device_entries),
               static_cast<unsigned long long>(s.direct_pages_to_device),
               static_cast<unsigned long long>(s.to_host_calls),
               static_cast<unsigned long long>(s.to_host_entries),
               static_cast<unsigned long long>(s.direct_pages_to_host), o.passes,
               static_cast<unsigned long long>(pages.size()),
               static_cast<unsigned long long>(s.blocks_registered));
  return Status::Ok();
}

// Host-to-device and device-to-host migration through the tier against the
// raw copies. Its backend (and the backend's threads) are gone when it
// returns: the oversubscribed part forks daemons next.
Status RunMigration(const GpuBenchOptions& o, std::unique_ptr<DeviceBackend> backend) {
  const std::string b(backend->name());
  std::fprintf(stderr, "dsvm-bench gpu: backend %s, %.0f MiB each way, %u-byte pages\n",
               b.c_str(), static_cast<double>(o.bytes) / (1 << 20), o.page_size);
  double raw_h2d = 0, raw_d2h = 0;
  DSVM_RETURN_IF_ERROR(MeasureRaw(*backend, o, &raw_h2d, &raw_d2h));

  // A fresh store of the same random bytes for each run, so that each
  // run's first pass maps and pins them itself. A plain memfd, as on a
  // machine that reserves no hugetlb pages (the usual case), so that runs
  // compare alike from machine to machine.
  std::vector<proto::PageAddr> pages;
  for (uint64_t i = 0; i < o.bytes / o.page_size; ++i) pages.push_back(kBase + i * o.page_size);
  auto make_store = [&]() -> Result<std::unique_ptr<node::PageStore>> {
    node::PageStoreOptions so;
    so.name = "dsvm-bench-gpu";
    so.try_hugetlb = false;
    DSVM_ASSIGN_OR_RETURN(std::unique_ptr<node::PageStore> store,
                          node::PageStore::Create(kBase, o.bytes, o.page_size, so));
    std::mt19937_64 rng(42);
    std::vector<uint8_t> bytes(o.page_size);
    for (proto::PageAddr page : pages) {
      for (size_t k = 0; k < bytes.size(); k += 8) {
        const uint64_t w = rng();
        std::memcpy(bytes.data() + k, &w, 8);
      }
      DSVM_RETURN_IF_ERROR(store->WritePage(page, bytes));
    }
    return store;
  };
  uint64_t before = 0;
  const std::string p = PageTag(o.page_size);
  EmitMetric("gpu." + b + ".bytes", static_cast<double>(o.bytes), "bytes");
  EmitMetric("gpu." + b + ".copy_threads", CopyThreads(o), "threads");
  EmitMetric("gpu." + b + ".raw_h2d.gbps", raw_h2d, "GB/s");
  EmitMetric("gpu." + b + ".raw_d2h.gbps", raw_d2h, "GB/s");
  auto ratio = [](double a, double b) { return b > 0 ? a / b : 0; };
  TierRun runs[2];  // [0]: direct copies on, [1]: off
  for (int k = 0; k < 2; ++k) {
    const bool direct = k == 0;
    if (o.direct_copies == (direct ? "off" : "on")) continue;
    DSVM_ASSIGN_OR_RETURN(std::unique_ptr<node::PageStore> store, make_store());
    if (before == 0) before = Checksum(*store, o.page_size);
    DSVM_RETURN_IF_ERROR(MeasureTier(o, backend.get(), store.get(), pages, direct, &runs[k]));
    if (Checksum(*store, o.page_size) != before) {
      return Internal("the pages came back from the device with other bytes");
    }
    const TierRun& r = runs[k];
    const std::string tag = p + (o.direct_copies == "both" && !direct ? ".staged" : "");
    EmitMetric("gpu." + b + ".migrate_h2d" + tag + ".gbps", r.h2d, "GB/s");
    EmitMetric("gpu." + b + ".migrate_d2h" + tag + ".gbps", r.d2h, "GB/s");
    EmitMetric("gpu." + b + ".migrate_h2d" + tag + ".vs_raw", ratio(r.h2d, raw_h2d), "ratio");
    EmitMetric("gpu." + b + ".migrate_d2h" + tag + ".vs_raw", ratio(r.d2h, raw_d2h), "ratio");
    EmitMetric("gpu." + b + ".migrate_h2d" + tag + ".cold.gbps", r.cold_h2d, "GB/s");
    const uint64_t moved = r.stats.pages_to_device + r.stats.pages_to_host;
    EmitMetric("gpu." + b + ".migrate" + tag + ".direct_share",
               ratio(static_cast<double>(r.stats.direct_pages_to_device +
                                         r.stats.direct_pages_to_host),
                     static_cast<double>(moved)),
               "ratio");
  }
  if (o.direct_copies == "both") {
    EmitMetric("gpu." + b + ".migrate_h2d" + p + ".direct_vs_staged", ratio(runs[0].h2d, runs[1].h2d),
               "ratio");
    EmitMetric("gpu." + b + ".migrate_d2h" + p + ".direct_vs_staged", ratio(runs[0].d2h, runs[1].d2h),
               "ratio");
  }
  return Status::Ok();
}

// --- The oversubscribed workload -------------------------------------------

using examples::Batch;
using examples::ChunkPlan;
using examples::Gatherer;

// What the three variants share: the table, the batches, their plans and
// the sums they must produce.
struct Workload {
  uint64_t rows = 0;
  uint64_t row_bytes = 0;
  uint64_t table_bytes = 0;  // rows * row_bytes: the region's size
  uint64_t chunk_rows = 0;
  uint64_t chunk_bytes = 0;  // chunk_rows * row_bytes, a whole number of pages
  uint64_t chunks = 0;
  uint32_t dim = 0;
  std::vector<float> table;
  std::vector<Batch> batches;
  std::vector<ChunkPlan> by_chunk;  // per batch
  std::vector<ChunkPlan> whole;     // per batch, the table as one chunk
  std::vector<std::vector<float>> want;
};

Status MakeWorkload(const GpuBenchOptions& o, Workload* w) {
  if (o.oversub_factor < 2) return InvalidArgument("the table must be at least twice the budget");
  if (o.dim == 0 || o.bags == 0 || o.bag_size == 0 || o.bag_size > 32768 || o.batches == 0) {
    return InvalidArgument("dim, bags, bag size (at most 32768) and batches must be positive");
  }
  w->dim = o.dim;
  w->row_bytes = uint64_t{o.dim} * sizeof(float);
  // A chunk is a whole number of rows and of the region's pages.
  const uint64_t unit = std::lcm(w->row_bytes, uint64_t{o.region_page_size});
  w->chunk_bytes = std::min(o.chunk_bytes, o.gpu_budget) / unit * unit;
  if (w->chunk_bytes == 0) {
    return InvalidArgument("the chunk (and the GPU budget) must hold at least " +
                           std::to_string(unit) + " bytes");
  }
  w->chunk_rows = w->chunk_bytes / w->row_bytes;
  w->rows = o.gpu_budget * o.oversub_factor / w->row_bytes;
  if (w->rows >= (uint64_t{1} << 32)) return InvalidArgument("the table has 2^32 rows or more");
  w->table_bytes = w->rows * w->row_bytes;
  w->chunks = (w->rows + w->chunk_rows - 1) / w->chunk_rows;
  w->table.resize(w->rows * o.dim);
  examples::FillRows(w->table.data(), 0, w->rows, o.dim);
  std::mt19937_64 rng(7);
  for (uint32_t b = 0; b < o.batches; ++b) {
    w->batches.push_back(examples::MakeBatch(rng, w->rows, o.bags, o.bag_size));
    w->by_chunk.push_back(examples::PlanChunks(w->batches.back(), w->rows, w->chunk_rows));
    w->whole.push_back(examples::PlanChunks(w->batches.back(), w->rows, w->rows));
    w->want.emplace_back(uint64_t{o.bags} * o.dim);
    examples::ReferenceSums(w->table.data(), o.dim, w->batches.back(), w->want.back().data());
  }
  return Status::Ok();
}

Status CheckSums(const Workload& w, uint32_t batch, const std::vector<float>& got,
                 const char* variant) {
  const std::vector<float>& want = w.want[batch];
  for (size_t i = 0; i < got.size(); ++i) {
    // Bitwise: every sum is exact (examples/embedding_bag.h).
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      return Internal(std::string(variant) + ": batch " + std::to_string(batch) + ", bag " +
                      std::to_string(i / w.dim) + ", column " + std::to_string(i % w.dim) +
                      ": sum " + std::to_string(got[i]) + ", the CPU's " + std::to_string(want[i]));
    }
  }
  return Status::Ok();
}

Status GatherFailed(const Gatherer& g, const char* variant) {
  return Internal(std::string(variant) + ": " + g.error());
}

Result<std::unique_ptr<Gatherer>> MakeGatherer(bool cuda, uint32_t dim) {
  if (!cuda) return examples::MakeCpuGatherer(dim);
  std::string why;
  std::unique_ptr<Gatherer> g = examples::MakeCudaGatherer(dim, 0, &why);
  if (!g) return Unavailable("the CUDA gather kernel: " + why);
  return g;
}

// The timed passes of one variant: `batch(b)` runs batch b and leaves its
// sums in `sums`; they are checked after the clock stops. Returns the best
// pass's seconds.
template <typename RunBatch>
Result<double> TimePasses(const Workload& w, int passes, const char* variant, RunBatch batch) {
  std::vector<float> sums(w.want[0].size());
  double best = 0;
  uint64_t turn = 0;
  for (int pass = 0; pass < passes; ++pass) {
    double seconds = 0;
    for (uint32_t b = 0; b < w.batches.size(); ++b) {
      const auto t0 = Clock::now();
      DSVM_RETURN_IF_ERROR(batch(b, turn++, sums.data()));
      seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      DSVM_RETURN_IF_ERROR(CheckSums(w, b, sums, variant));
    }
    if (pass == 0 || seconds < best) best = seconds;
  }
  return best;
}

// The chunks of a batch in the order they are visited: ascending on even
// turns, descending on odd ones (the chunks used last before a turn are the
// ones still on the GPU after it). Chunks no lookup needs are left out.
std::vector<uint64_t> ChunkOrder(const ChunkPlan& plan, uint64_t turn) {
  std::vector<uint64_t> order;
  for (uint64_t k = 0; k < plan.chunks(); ++k) {
    const uint64_t c = turn % 2 == 0 ? k : plan.chunks() - 1 - k;
    if (plan.count(c) != 0) order.push_back(c);
  }
  return order;
}

std::string DsvmError(const char* call, int rc) {
  return std::string(call) + ": " + dsvm_strerror(rc) + ": " + dsvm_last_error();
}

// (a) zero-copy: the kernel reads the rows from host memory.
Result<double> RunZeroCopy(const Workload& w, const GpuBenchOptions& o, bool cuda) {
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<Gatherer> g, MakeGatherer(cuda, w.dim));
  const float* rows = w.table.data();
  examples::MappedHostBuffer mapped;
  if (cuda) {
    std::string why;
    if (!examples::AllocateMappedHost(w.table_bytes, true, &mapped, &why)) {
      return Unavailable("zero_copy: " + why);
    }
    std::memcpy(mapped.host, w.table.data(), w.table_bytes);
    rows = static_cast<const float*>(mapped.device);
  }
  auto best = TimePasses(w, o.passes, "zero_copy", [&](uint32_t b, uint64_t, float* out) -> Status {
    const ChunkPlan& plan = w.whole[b];
    if (!g->Begin(o.bags) || !g->Gather(rows, plan.of(0), plan.count(0)) || !g->Finish(out)) {
      return GatherFailed(*g, "zero_copy");
    }
    return Status::Ok();
  });
  if (cuda) examples::FreeMappedHost(&mapped);
  return best;
}

// (b) the hand-written staging loop: each chunk copied into one device
// buffer (cudaMemcpy from the pageable table; emulated: memcpy), then
// gathered there.
Result<double> RunStaging(const Workload& w, const GpuBenchOptions& o, bool cuda) {
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<Gatherer> g, MakeGatherer(cuda, w.dim));
  examples::DeviceBuffer buffer;
  std::string why;
  if (!examples::AllocateDevice(w.chunk_bytes, cuda, &buffer, &why)) {
    return Unavailable("staging: " + why);
  }
  auto best = TimePasses(w, o.passes, "staging", [&](uint32_t b, uint64_t turn, float* out) -> Status {
    const ChunkPlan& plan = w.by_chunk[b];
    if (!g->Begin(o.bags)) return GatherFailed(*g, "staging");
    for (uint64_t c : ChunkOrder(plan, turn)) {
      const uint64_t first = c * w.chunk_rows;
      const uint64_t bytes = std::min(w.chunk_rows, w.rows - first) * w.row_bytes;
      std::string err;
      if (!examples::CopyToDeviceBuffer(buffer, w.table.data() + first * w.dim, bytes, &err)) {
        return Internal("staging: " + err);
      }
      if (!g->Gather(static_cast<const float*>(buffer.device), plan.of(c), plan.count(c))) {
        return GatherFailed(*g, "staging");
      }
    }
    return g->Finish(out) ? Status::Ok() : GatherFailed(*g, "staging");
  });
  examples::FreeDevice(&buffer);
  return best;
}

// The dsvm variants, as this process's client calls against `socket`:
// returns the plain one's best time; *pipelined_s the pipelined one's
// (while chunk j is gathered, a second thread has chunk j+1 placed with
// dsvm_gpu_prefetch, so its copies overlap the kernel).
// pages_in[0] and [1]: pages the daemon copied to the GPU per batch, plain
// and pipelined (dsvm_stats), which says how many chunks stayed in HBM
// from the batch before.
Result<double> RunDsvmMaps(const Workload& w, const GpuBenchOptions& o, bool cuda,
                           const std::string& socket, uint64_t* maps, double* pipelined_s,
                           double pages_in[2]) {
  if (int rc = dsvm_init(socket.c_str()); rc != DSVM_OK) return Unavailable(DsvmError("dsvm_init", rc));
  void* base = nullptr;
  Status st;
  if (int rc = dsvm_region_create("dsvm-bench-gpu", w.table_bytes, o.region_page_size, &base);
      rc != DSVM_OK) {
    st = Internal(DsvmError("dsvm_region_create", rc));
  } else if (int rc = dsvm_prefetch(base, w.table_bytes, DSVM_PREFETCH_WRITE); rc != DSVM_OK) {
    st = Internal(DsvmError("dsvm_prefetch", rc));
  }
  Result<double> best = Internal("not run");
  if (!st.ok()) {
    best = st;
  } else {
    std::memcpy(base, w.table.data(), w.table_bytes);
    auto* region = static_cast<char*>(base);
    auto g = MakeGatherer(cuda, w.dim);
    if (!g.ok()) {
      best = g.status();
    } else {
      auto chunk_range = [&](uint64_t c, char** addr, uint64_t* len) {
        const uint64_t first = c * w.chunk_rows;
        *addr = region + first * w.row_bytes;
        *len = (std::min(w.chunk_rows, w.rows - first) * w.row_bytes + o.region_page_size - 1) /
               o.region_page_size * o.region_page_size;
      };
      auto pages_in_now = [] {
        dsvm_node_stats_t stats{};
        return dsvm_stats(&stats) == DSVM_OK ? stats.gpu_pages_in : 0;
      };
      auto run = [&](bool pipelined) {
        const char* variant = pipelined ? "dsvm_pipelined" : "dsvm";
        const uint64_t in_before = pages_in_now();
        Result<double> r = TimePasses(w, o.passes, variant, [&](uint32_t b, uint64_t turn, float* out) -> Status {
          const ChunkPlan& plan = w.by_chunk[b];
          Gatherer& k = **g;
          if (!k.Begin(o.bags)) return GatherFailed(k, variant);
          const std::vector<uint64_t> order = ChunkOrder(plan, turn);
          for (size_t j = 0; j < order.size(); ++j) {
            const uint64_t c = order[j];
            char* addr = nullptr;
            uint64_t len = 0;
            chunk_range(c, &addr, &len);
            void* device = nullptr;
            if (int rc = dsvm_gpu_map(addr, len, 0, DSVM_GPU_READ, &device); rc != DSVM_OK) {
              return Internal(DsvmError("dsvm_gpu_map", rc));
            }
            ++*maps;
            // The next chunk is placed while this one is gathered.
            std::future<int> ahead;
            if (pipelined && j + 1 < order.size()) {
              char* next = nullptr;
              uint64_t next_len = 0;
              chunk_range(order[j + 1], &next, &next_len);
              ahead = std::async(std::launch::async,
                                 [=] { return dsvm_gpu_prefetch(next, next_len, 0, 0); });
            }
            const bool ok = k.Gather(static_cast<const float*>(device), plan.of(c), plan.count(c));
            if (ahead.valid()) {
              if (int rc = ahead.get(); rc != DSVM_OK) {
                return Internal(DsvmError("dsvm_gpu_prefetch", rc));
              }
            }
            if (int rc = dsvm_gpu_unmap(addr, len); rc != DSVM_OK) {
              return Internal(DsvmError("dsvm_gpu_unmap", rc));
            }
            if (!ok) return GatherFailed(k, variant);
          }
          return k.Finish(out) ? Status::Ok() : GatherFailed(k, variant);
        });
        pages_in[pipelined ? 1 : 0] = static_cast<double>(pages_in_now() - in_before) /
                                      (static_cast<double>(o.passes) * w.batches.size());
        return r;
      };
      best = run(false);
      if (best.ok()) {
        Result<double> piped = run(true);
        if (piped.ok()) {
          *pipelined_s = *piped;
        } else {
          best = piped.status();
        }
      }
    }
  }
  if (base != nullptr) {
    if (int rc = dsvm_region_close(base); rc != DSVM_OK && best.ok()) {
      best = Internal(DsvmError("dsvm_region_close", rc));
    }
    if (int rc = dsvm_region_destroy("dsvm-bench-gpu"); rc != DSVM_OK && best.ok()) {
      best = Internal(DsvmError("dsvm_region_destroy", rc));
    }
  }
  dsvm_finalize();
  return best;
}

// Starts a coordinator and a dsvm-node with `backend` and the budget, runs
// the dsvm variant as their client, and stops them.
Result<double> RunDsvm(const Workload& w, const GpuBenchOptions& o, const std::string& backend,
                       uint64_t* maps, double* pipelined_s, double pages_in[2]) {
  std::string node_binary = o.node_binary, coordinator_binary = o.coordinator_binary;
  DSVM_RETURN_IF_ERROR(ResolveBinaries(&node_binary, &coordinator_binary));
  // One node: the transport carries nothing but its join.
  ::setenv("UCX_TLS", "tcp", 0);
  ::setenv("UCX_NET_DEVICES", "lo", 0);
  TempDir dir;
  DSVM_RETURN_IF_ERROR(dir.Make("dsvm-bench-gpu"));
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<CoordinatorProcess> coordinator,
                        CoordinatorProcess::Start(coordinator_binary));
  const std::string socket = dir.path() + "/node.sock";
  DSVM_ASSIGN_OR_RETURN(
      std::unique_ptr<NodeProcess> node,
      NodeProcess::Start(node_binary, coordinator->address(), coordinator->secret_path(), socket,
                         dir.path() + "/node.log",
                         {"--device-backend", backend, "--gpu-budget",
                          std::to_string(o.gpu_budget), "--gpu-copy-threads",
                          std::to_string(CopyThreads(o)), "--gpu-direct-copies",
                          o.direct_copies == "off" ? "off" : "on"}));
  Result<double> best = RunDsvmMaps(w, o, backend == "cuda", socket, maps, pipelined_s, pages_in);
  if (!best.ok()) node->PrintLogTail(20);
  Status st = node->Stop();
  if (best.ok() && !st.ok()) best = st;
  st = coordinator->Stop();
  if (best.ok() && !st.ok()) best = st;
  return best;
}

Status RunOversubscribed(const GpuBenchOptions& o, const std::string& b) {
  if (!UffdUsableOrSaySkip("dsvm-bench gpu (oversubscribed workload)")) return Status::Ok();
  const bool cuda = b == "cuda";
  Workload w;
  DSVM_RETURN_IF_ERROR(MakeWorkload(o, &w));
  std::fprintf(stderr,
               "dsvm-bench gpu: oversubscribed: a table of %.0f MiB (%llu rows x %u floats) "
               "through a GPU budget of %.0f MiB in chunks of %.1f MiB; %u batches of %u bags "
               "x %u rows, %d pass(es)\n",
               static_cast<double>(w.table_bytes) / (1 << 20),
               static_cast<unsigned long long>(w.rows), w.dim,
               static_cast<double>(o.gpu_budget) / (1 << 20),
               static_cast<double>(w.chunk_bytes) / (1 << 20), o.batches, o.bags, o.bag_size,
               o.passes);
  if (!cuda) {
    std::fprintf(stderr,
                 "dsvm-bench gpu: emulated backend: the device is host memory and the kernel a "
                 "CPU loop, so the oversubscribed figures measure dsvm's overhead only, not a "
                 "GPU (zero-copy reads just the rows it needs; dsvm copies whole chunks)\n");
  }
  uint64_t maps = 0;
  double pipelined_s = 0;
  double pages_in[2] = {0, 0};
  DSVM_ASSIGN_OR_RETURN(double dsvm_s, RunDsvm(w, o, b, &maps, &pipelined_s, pages_in));
  DSVM_ASSIGN_OR_RETURN(double zero_copy_s, RunZeroCopy(w, o, cuda));
  DSVM_ASSIGN_OR_RETURN(double staging_s, RunStaging(w, o, cuda));
  std::fprintf(stderr,
               "dsvm-bench gpu: oversubscribed: every sum of every variant equals the CPU's; "
               "%llu dsvm_gpu_map calls (%.1f per batch)\n",
               static_cast<unsigned long long>(maps),
               static_cast<double>(maps) / (2.0 * o.batches * o.passes));
  const std::string m = "gpu." + b + ".oversub";
  const double per_batch = 1000.0 / o.batches;
  EmitMetric(m + ".table_bytes", static_cast<double>(w.table_bytes), "bytes");
  EmitMetric(m + ".budget_bytes", static_cast<double>(o.gpu_budget), "bytes");
  EmitMetric(m + ".chunk_bytes", static_cast<double>(w.chunk_bytes), "bytes");
  // Bytes a batch looks up over the table's (GpuBenchOptions::bags).
  EmitMetric(m + ".reuse",
             static_cast<double>(uint64_t{o.bags} * o.bag_size * w.row_bytes) /
                 static_cast<double>(w.table_bytes),
             "ratio");
  EmitMetric(m + ".dsvm.ms_per_batch", dsvm_s * per_batch, "ms");
  // Bytes copied to the GPU per batch (the rest of the table stayed there).
  EmitMetric(m + ".dsvm.bytes_in_per_batch", pages_in[0] * o.region_page_size, "bytes");
  EmitMetric(m + ".dsvm_pipelined.bytes_in_per_batch", pages_in[1] * o.region_page_size,
             "bytes");
  EmitMetric(m + ".zero_copy.ms_per_batch", zero_copy_s * per_batch, "ms");
  EmitMetric(m + ".staging.ms_per_batch", staging_s * per_batch, "ms");
  EmitMetric(m + ".speedup_vs_zero_copy", dsvm_s > 0 ? zero_copy_s / dsvm_s : 0, "ratio");
  EmitMetric(m + ".time_vs_staging", staging_s > 0 ? dsvm_s / staging_s : 0, "ratio");
  EmitMetric(m + ".dsvm_pipelined.ms_per_batch", pipelined_s * per_batch, "ms");
  EmitMetric(m + ".pipelined.speedup_vs_zero_copy",
             pipelined_s > 0 ? zero_copy_s / pipelined_s : 0, "ratio");
  EmitMetric(m + ".pipelined.time_vs_staging", staging_s > 0 ? pipelined_s / staging_s : 0,
             "ratio");
  return Status::Ok();
}

}  // namespace

Status RunGpu(const GpuBenchOptions& o) {
  if (o.bytes == 0 || o.bytes % o.page_size != 0 || o.passes < 1 ||
      (o.page_size != 4096 && o.page_size != 65536 && o.page_size != (2u << 20))) {
    return InvalidArgument("--size must be a multiple of --page-size (4K, 64K or 2M)");
  }
  if (o.region_page_size != 4096 && o.region_page_size != 65536 &&
      o.region_page_size != (2u << 20)) {
    return InvalidArgument("the region's page size must be 4K, 64K or 2M");
  }
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<DeviceBackend> backend, OpenBackend(o.backend));
  const std::string b(backend->name());
  if (o.migration) DSVM_RETURN_IF_ERROR(RunMigration(o, std::move(backend)));
  backend.reset();  // the oversubscribed part forks daemons next
  if (!o.oversub) return Status::Ok();
  return RunOversubscribed(o, b);
}

}  // namespace dsvm::bench
