// embedding_gather: an embedding-bag gather over a table larger than the
// GPU's budget, streamed through dsvm_gpu_map / dsvm_gpu_unmap (issue #5).
//
//   embedding_gather [--socket PATH] [--rows N] [--dim D] [--chunk BYTES]
//                    [--page-size 4096|65536|2097152] [--batches B] [--bags N]
//                    [--bag-size L] [--gpu G] [--kernel auto|cpu|cuda]
//                    [--region NAME] [--seed S] [--keep] [--inject-wrong-result]
//                    [--pipeline]
//
// The process connects to the node daemon at --socket (else $DSVM_SOCKET,
// then dsvm's default socket), whose GPU tier (dsvm-node --device-backend
// emulated|cuda --gpu-budget BYTES) holds at most the budget of region pages
// on a GPU. It creates a region holding a table of N rows of D floats and
// writes the table into it. Then, per batch, it draws B bags of L random row
// ids, groups the lookups by chunk (--chunk bytes of consecutive rows, at
// most the GPU budget), and for every chunk that a lookup of the batch
// needs: dsvm_gpu_map(chunk, DSVM_GPU_READ) makes it resident on the GPU
// (evicting older chunks once the budget is full), the kernel adds the
// chunk's rows to their bags' sums reading the device pointer, and
// dsvm_gpu_unmap lets the chunk go. Chunks are visited in ascending order
// in even batches and descending in odd ones, so the chunks mapped last
// before a turn are still resident after it. With --pipeline, while a
// chunk is gathered a second thread places the next one with
// dsvm_gpu_prefetch, so its copies overlap the kernel and its map then
// finds it in place (the budget must hold two chunks).
//
// The kernel: with a cuda daemon (the device pointer is CUDA device memory)
// a CUDA kernel (embedding_bag_cuda.cu, built where CMake finds CUDA); with
// an emulated daemon (the device pointer is host memory playing the GPU's) a
// CPU loop over the device pointer. --kernel forces one.
//
// Every batch's sums are compared with the same sums computed on the CPU
// over a plain malloc'd copy of the table: they must be bitwise equal (the
// table's values make every sum exact, embedding_bag.h). Exit status: 0
// when every batch matched, 1 when one did not or a dsvm call failed, 2 for
// bad arguments. --inject-wrong-result adds 1 to one sum before the check
// (to show the check catching it; the exit status is then 1).
#include <dsvm/dsvm.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <future>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "examples/embedding_bag.h"

namespace {

using dsvm::examples::Batch;
using dsvm::examples::ChunkPlan;
using dsvm::examples::Gatherer;

struct Options {
  std::string socket;
  std::string region = "embedding-gather";
  uint64_t rows = 262144;  // x 64 floats: 64 MiB
  uint32_t dim = 64;
  uint64_t chunk = uint64_t{8} << 20;
  uint64_t page_size = DSVM_PAGE_SIZE_64K;
  uint32_t batches = 8;
  uint32_t bags = 2048;
  uint32_t bag_size = 32;
  int gpu = 0;
  std::string kernel = "auto";
  uint64_t seed = 1;
  bool keep = false;
  bool inject_wrong_result = false;
  bool pipeline = false;
};

int Usage() {
  std::fprintf(stderr,
               "usage: embedding_gather [--socket PATH] [--rows N] [--dim D] [--chunk BYTES]\n"
               "                        [--page-size 4096|65536|2097152] [--batches B] [--bags N]\n"
               "                        [--bag-size L] [--gpu G] [--kernel auto|cpu|cuda]\n"
               "                        [--region NAME] [--seed S] [--keep] [--inject-wrong-result]\n"
               "                        [--pipeline]\n");
  return 2;
}

// A count with an optional K, M or G suffix (powers of 2).
bool ParseU64(const char* s, uint64_t lo, uint64_t hi, uint64_t* out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s, &end, 10);
  if (errno != 0 || end == s || *s == '-') return false;
  int shift = 0;
  if (*end == 'K' || *end == 'k') shift = 10;
  if (*end == 'M' || *end == 'm') shift = 20;
  if (*end == 'G' || *end == 'g') shift = 30;
  if (shift != 0) ++end;
  if (*end != '\0' || v > (~0ull >> shift)) return false;
  v <<= shift;
  if (v < lo || v > hi) return false;
  *out = v;
  return true;
}

bool ParseOptions(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--keep") {
      o->keep = true;
      continue;
    }
    if (a == "--inject-wrong-result") {
      o->inject_wrong_result = true;
      continue;
    }
    if (a == "--pipeline") {
      o->pipeline = true;
      continue;
    }
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (v == nullptr) {
      std::fprintf(stderr, "embedding_gather: '%s' needs a value (or is unknown)\n", a.c_str());
      return false;
    }
    uint64_t n = 0;
    bool ok = true;
    if (a == "--socket") {
      o->socket = v;
    } else if (a == "--region") {
      o->region = v;
    } else if (a == "--kernel") {
      o->kernel = v;
      ok = o->kernel == "auto" || o->kernel == "cpu" || o->kernel == "cuda";
    } else if (a == "--rows") {
      ok = ParseU64(v, 1, uint64_t{1} << 40, &o->rows);
    } else if (a == "--dim") {
      ok = ParseU64(v, 1, 65536, &n);
      o->dim = static_cast<uint32_t>(n);
    } else if (a == "--chunk") {
      ok = ParseU64(v, 4096, uint64_t{1} << 40, &o->chunk);
    } else if (a == "--page-size") {
      ok = ParseU64(v, 4096, DSVM_PAGE_SIZE_2M, &o->page_size) &&
           (o->page_size == DSVM_PAGE_SIZE_4K || o->page_size == DSVM_PAGE_SIZE_64K ||
            o->page_size == DSVM_PAGE_SIZE_2M);
    } else if (a == "--batches") {
      ok = ParseU64(v, 1, 1u << 20, &n);
      o->batches = static_cast<uint32_t>(n);
    } else if (a == "--bags") {
      ok = ParseU64(v, 1, 1u << 24, &n);
      o->bags = static_cast<uint32_t>(n);
    } else if (a == "--bag-size") {
      // At most 32768 rows per bag: the sums stay exact (embedding_bag.h).
      ok = ParseU64(v, 1, 32768, &n);
      o->bag_size = static_cast<uint32_t>(n);
    } else if (a == "--gpu") {
      ok = ParseU64(v, 0, 1024, &n);
      o->gpu = static_cast<int>(n);
    } else if (a == "--seed") {
      ok = ParseU64(v, 0, ~0ull, &o->seed);
    } else {
      std::fprintf(stderr, "embedding_gather: unknown flag '%s'\n", a.c_str());
      return false;
    }
    if (!ok) {
      std::fprintf(stderr, "embedding_gather: bad value '%s' for %s\n", v, a.c_str());
      return false;
    }
    ++i;
  }
  return true;
}

int DsvmFailed(const char* call, int err) {
  std::fprintf(stderr, "embedding_gather: %s: %s: %s\n", call, dsvm_strerror(err),
               dsvm_last_error());
  return 1;
}

double MiB(uint64_t bytes) { return static_cast<double>(bytes) / (1 << 20); }

// Chooses the kernel for device memory at `device` (the first map's).
std::unique_ptr<Gatherer> PickGatherer(const Options& o, const void* device) {
  std::string why;
  if (o.kernel == "cpu") return dsvm::examples::MakeCpuGatherer(o.dim);
  if (o.kernel == "cuda" || dsvm::examples::IsCudaDevicePointer(device)) {
    auto g = dsvm::examples::MakeCudaGatherer(o.dim, o.gpu, &why);
    if (!g) std::fprintf(stderr, "embedding_gather: no CUDA kernel: %s\n", why.c_str());
    return g;
  }
  return dsvm::examples::MakeCpuGatherer(o.dim);
}

int Run(const Options& o) {
  const uint64_t row_bytes = uint64_t{o.dim} * sizeof(float);
  // A chunk is a whole number of rows and of pages.
  const uint64_t unit = std::lcm(row_bytes, o.page_size);
  if (o.chunk < unit) {
    std::fprintf(stderr, "embedding_gather: --chunk must be at least %" PRIu64
                 " bytes (a whole number of rows and of pages)\n", unit);
    return 2;
  }
  const uint64_t chunk_bytes = o.chunk / unit * unit;
  const uint64_t chunk_rows = chunk_bytes / row_bytes;
  if (chunk_rows > (uint64_t{1} << 32)) {
    std::fprintf(stderr, "embedding_gather: --chunk holds more than 2^32 rows\n");
    return 2;
  }
  const uint64_t table_bytes = o.rows * row_bytes;
  const uint64_t chunks = (o.rows + chunk_rows - 1) / chunk_rows;

  if (int rc = dsvm_init(o.socket.empty() ? nullptr : o.socket.c_str()); rc != DSVM_OK) {
    return DsvmFailed("dsvm_init", rc);
  }
  void* base = nullptr;
  if (int rc = dsvm_region_create(o.region.c_str(), table_bytes, o.page_size, &base);
      rc != DSVM_OK) {
    DsvmFailed("dsvm_region_create", rc);
    dsvm_finalize();
    return 1;
  }
  auto* table = static_cast<float*>(base);
  std::printf("embedding_gather: table of %" PRIu64 " rows x %u floats = %.1f MiB in region "
              "'%s' at %p (%" PRIu64 "-byte pages)\n",
              o.rows, o.dim, MiB(table_bytes), o.region.c_str(), base, o.page_size);
  std::printf("embedding_gather: %" PRIu64 " chunks of %.2f MiB (%" PRIu64 " rows) mapped on "
              "GPU %d; %u batches of %u bags x %u rows\n",
              chunks, MiB(chunk_bytes), chunk_rows, o.gpu, o.batches, o.bags, o.bag_size);

  int status = 0;
  // The application's table: written into the region once, and kept in
  // plain memory for the reference.
  std::vector<float> host(o.rows * o.dim);
  dsvm::examples::FillRows(host.data(), 0, o.rows, o.dim);
  if (int rc = dsvm_prefetch(base, table_bytes, DSVM_PREFETCH_WRITE); rc != DSVM_OK) {
    status = DsvmFailed("dsvm_prefetch", rc);
  }
  if (status == 0) std::memcpy(table, host.data(), table_bytes);

  std::mt19937_64 rng(o.seed);
  std::unique_ptr<Gatherer> gatherer;
  std::vector<float> sums(uint64_t{o.bags} * o.dim), want(sums.size());
  uint64_t maps = 0, mapped_bytes = 0, lookups = 0;
  double map_s = 0, gather_s = 0;
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  for (uint32_t b = 0; b < o.batches && status == 0; ++b) {
    const Batch batch = dsvm::examples::MakeBatch(rng, o.rows, o.bags, o.bag_size);
    const ChunkPlan plan = dsvm::examples::PlanChunks(batch, o.rows, chunk_rows);
    bool begun = false;
    std::vector<uint64_t> order;  // the chunks this batch needs, in visiting order
    for (uint64_t k = 0; k < chunks; ++k) {
      const uint64_t c = b % 2 == 0 ? k : chunks - 1 - k;
      if (plan.count(c) != 0) order.push_back(c);
    }
    auto range_of = [&](uint64_t c, char** addr, uint64_t* len) {
      const uint64_t first_row = c * chunk_rows;
      *addr = reinterpret_cast<char*>(table) + first_row * row_bytes;
      // The last chunk may end inside a page: the region's size is whole pages.
      *len = (std::min(chunk_rows, o.rows - first_row) * row_bytes + o.page_size - 1) /
             o.page_size * o.page_size;
    };
    for (size_t j = 0; j < order.size() && status == 0; ++j) {
      const uint64_t c = order[j];
      char* addr = nullptr;
      uint64_t len = 0;
      range_of(c, &addr, &len);
      void* device = nullptr;
      auto t0 = Clock::now();
      if (int rc = dsvm_gpu_map(addr, len, o.gpu, DSVM_GPU_READ, &device); rc != DSVM_OK) {
        status = DsvmFailed("dsvm_gpu_map", rc);
        break;
      }
      auto t1 = Clock::now();
      ++maps;
      mapped_bytes += len;
      std::future<int> ahead;  // --pipeline: the next chunk placed meanwhile
      if (o.pipeline && j + 1 < order.size()) {
        char* next = nullptr;
        uint64_t next_len = 0;
        range_of(order[j + 1], &next, &next_len);
        const int gpu = o.gpu;
        ahead = std::async(std::launch::async,
                           [=] { return dsvm_gpu_prefetch(next, next_len, gpu, 0); });
      }
      if (!gatherer) {
        gatherer = PickGatherer(o, device);
        if (gatherer) {
          std::printf("embedding_gather: kernel: %s (device pointer %p)\n", gatherer->name(),
                      device);
        }
      }
      if (!gatherer) {
        status = 1;
      } else if (!begun && !(begun = gatherer->Begin(o.bags))) {
        std::fprintf(stderr, "embedding_gather: %s\n", gatherer->error().c_str());
        status = 1;
      } else if (!gatherer->Gather(static_cast<const float*>(device), plan.of(c), plan.count(c))) {
        std::fprintf(stderr, "embedding_gather: gather: %s\n", gatherer->error().c_str());
        status = 1;
      }
      auto t2 = Clock::now();
      if (ahead.valid()) {
        if (int rc = ahead.get(); rc != DSVM_OK && status == 0) {
          status = DsvmFailed("dsvm_gpu_prefetch", rc);
        }
      }
      lookups += plan.count(c);
      if (int rc = dsvm_gpu_unmap(addr, len); rc != DSVM_OK && status == 0) {
        status = DsvmFailed("dsvm_gpu_unmap", rc);
      }
      map_s += std::chrono::duration<double>(t1 - t0).count() +
               std::chrono::duration<double>(Clock::now() - t2).count();
      gather_s += std::chrono::duration<double>(t2 - t1).count();
    }
    if (status != 0) break;
    if (!gatherer->Finish(sums.data())) {
      std::fprintf(stderr, "embedding_gather: %s\n", gatherer->error().c_str());
      status = 1;
      break;
    }
    if (o.inject_wrong_result && b == o.batches - 1) sums[sums.size() / 2] += 1.0f;
    dsvm::examples::ReferenceSums(host.data(), o.dim, batch, want.data());
    uint64_t wrong = 0, first_wrong = 0;
    for (uint64_t i = 0; i < sums.size(); ++i) {
      // Bitwise: every sum is exact (embedding_bag.h).
      if (std::memcmp(&sums[i], &want[i], sizeof(float)) != 0 && wrong++ == 0) first_wrong = i;
    }
    if (wrong != 0) {
      std::fprintf(stderr,
                   "embedding_gather: MISMATCH in batch %u: %" PRIu64 " of %zu sums differ "
                   "from the CPU reference; first: bag %" PRIu64 " column %" PRIu64
                   ": got %.9g, want %.9g\n",
                   b, wrong, sums.size(), first_wrong / o.dim, first_wrong % o.dim,
                   static_cast<double>(sums[first_wrong]), static_cast<double>(want[first_wrong]));
      status = 1;
    }
  }
  const double total_s = std::chrono::duration<double>(Clock::now() - start).count();
  if (status == 0) {
    std::printf("embedding_gather: %u batches, %" PRIu64 " lookups: every bag sum equals the "
                "CPU reference\n",
                o.batches, lookups);
    std::printf("embedding_gather: %" PRIu64 " maps, %.1f MiB mapped (%.1fx the table), "
                "%.3f s in map+unmap, %.3f s in the kernel, %.3f s in all\n",
                maps, MiB(mapped_bytes), static_cast<double>(mapped_bytes) / table_bytes, map_s,
                gather_s, total_s);
  }
  gatherer.reset();
  if (int rc = dsvm_region_close(base); rc != DSVM_OK && status == 0) {
    status = DsvmFailed("dsvm_region_close", rc);
  }
  if (!o.keep) {
    if (int rc = dsvm_region_destroy(o.region.c_str()); rc != DSVM_OK && status == 0) {
      status = DsvmFailed("dsvm_region_destroy", rc);
    }
  }
  dsvm_finalize();
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  // Progress lines in order with errors when both go to one file.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  Options o;
  if (!ParseOptions(argc, argv, &o)) return Usage();
  return Run(o);
}
