// jacobi_mpi: a 2-D Jacobi stencil whose grids live in one dsvm region that
// every MPI rank maps at the same address.
//
//   mpirun -np 3 jacobi_mpi --socket-dir DIR [--n N] [--iterations K]
//                           [--region NAME] [--keep]
//
// Rank r connects to the node daemon at DIR/node<r>.sock (without
// --socket-dir: $DSVM_SOCKET, then dsvm's default socket). Rank 0 creates the
// region and broadcasts its address; the others then open it and check that
// they got the same address. Each rank relaxes its block
// of rows and reads its neighbours' boundary rows ("halos") straight from
// region memory, so those pages move between the nodes every iteration; a
// dsvm_barrier_t in the region separates the iterations. MPI carries only the
// launch, the region handshake and the final reduction: the sharing is dsvm's.
//
// Rank 0 then repeats the computation alone in malloc'd memory and compares:
// the arithmetic and its order are the same, so the grids must be bitwise
// equal. Exit status: 0 when they are, 1 when not or when anything failed
// (a failure aborts every rank: the others would wait at the barrier), 2 for
// bad arguments.
//
// Layout of the region (4 KiB pages): page 0 holds the header with the
// barrier; grid 0 and grid 1 follow, each N*N doubles, row-major, each
// starting on a page. With N = 512 a row is exactly one page: besides page
// 0, only halo rows cross between nodes.
#include <dsvm/dsvm.h>
#include <mpi.h>

#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr size_t kPageSize = DSVM_PAGE_SIZE_4K;
constexpr uint64_t kMagic = 0x6473766d6a61636bULL;  // "dsvmjack"

// Page 0 of the region. Rank 0 writes it before the others open the region;
// afterwards only `barrier` changes.
struct Header {
  dsvm_barrier_t barrier;
  uint64_t magic;
  uint64_t n;
  uint64_t grid_offset[2];  // bytes from the region's start
};
static_assert(sizeof(Header) <= kPageSize, "the header is one page");

struct Options {
  std::string socket_dir;
  std::string region = "jacobi";
  int n = 512;
  int iterations = 100;
  bool keep = false;
};

int rank = 0;

// Reports a failed dsvm_ call with the library's own sentence and stops every
// rank: the others may be waiting for this one at a dsvm barrier.
[[noreturn]] void DsvmFailed(const char* call, int err) {
  std::fprintf(stderr, "jacobi_mpi: rank %d: %s: %s: %s\n", rank, call, dsvm_strerror(err),
               dsvm_last_error());
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();  // MPI_Abort does not return
}

void Check(const char* call, int err) {
  if (err < 0) DsvmFailed(call, err);
}

[[noreturn]] void Fail(const std::string& why) {
  std::fprintf(stderr, "jacobi_mpi: rank %d: %s\n", rank, why.c_str());
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();
}

bool ParseInt(const char* s, int lo, int hi, int* out) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) return false;
  *out = static_cast<int>(v);
  return true;
}

// Returns false on a bad command line, having said why.
bool ParseOptions(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    bool ok = true;
    if (a == "--keep") {
      o->keep = true;
      continue;
    } else if (v == nullptr) {
      ok = false;
    } else if (a == "--socket-dir") {
      o->socket_dir = v;
    } else if (a == "--region") {
      o->region = v;
    } else if (a == "--n") {
      ok = ParseInt(v, 3, 8192, &o->n);
    } else if (a == "--iterations") {
      ok = ParseInt(v, 1, 1000000, &o->iterations);
    } else {
      if (rank == 0) std::fprintf(stderr, "jacobi_mpi: unknown flag '%s'\n", a.c_str());
      return false;
    }
    if (!ok) {
      if (rank == 0) std::fprintf(stderr, "jacobi_mpi: flag '%s' needs a valid value\n", a.c_str());
      return false;
    }
    ++i;
  }
  return true;
}

// The fixed boundary in rows [first, last) of grid g: the top edge at 100,
// the left edge at 50, the others at 0. The interior starts at 0 (fresh
// region memory, or a zeroed vector).
void SetBoundary(double* g, int n, int first, int last) {
  for (int i = first; i < last; ++i) {
    double* row = g + static_cast<size_t>(i) * n;
    if (i == 0 || i == n - 1) {
      for (int j = 0; j < n; ++j) row[j] = i == 0 ? 100.0 : 0.0;
    } else {
      row[0] = 50.0;
      row[n - 1] = 0.0;
    }
  }
}

// One Jacobi sweep over rows [first, last) of the interior: next = mean of
// the four neighbours in old. Both the dsvm run and the reference call this
// one function, so they do the same arithmetic in the same order. Returns
// the largest change.
double Relax(const double* old, double* next, int n, int first, int last) {
  double change = 0.0;
  for (int i = first; i < last; ++i) {
    const double* up = old + static_cast<size_t>(i - 1) * n;
    const double* row = old + static_cast<size_t>(i) * n;
    const double* down = old + static_cast<size_t>(i + 1) * n;
    double* out = next + static_cast<size_t>(i) * n;
    for (int j = 1; j < n - 1; ++j) {
      out[j] = 0.25 * ((up[j] + down[j]) + (row[j - 1] + row[j + 1]));
      change = std::fmax(change, std::fabs(out[j] - row[j]));
    }
  }
  return change;
}

// The interior rows [first, last) of `rank` among `ranks`.
void RowsOf(int r, int ranks, int n, int* first, int* last) {
  const int interior = n - 2;
  *first = 1 + static_cast<int>(static_cast<int64_t>(interior) * r / ranks);
  *last = 1 + static_cast<int>(static_cast<int64_t>(interior) * (r + 1) / ranks);
}

size_t RoundUp(size_t v, size_t to) { return (v + to - 1) / to * to; }

// What moved on a node between two dsvm_stats snapshots, as MPI sends it.
enum Counter {
  kReadFaults,
  kWriteFaults,
  kLocalHits,
  kPagesFetched,
  kPagesSent,
  kInvalidations,
  kDowngrades,
  kCounters
};

void Delta(const dsvm_node_stats_t& before, const dsvm_node_stats_t& after,
           uint64_t out[kCounters]) {
  out[kReadFaults] = after.read_faults - before.read_faults;
  out[kWriteFaults] = after.write_faults - before.write_faults;
  out[kLocalHits] = after.local_hits - before.local_hits;
  out[kPagesFetched] = after.pages_fetched - before.pages_fetched;
  out[kPagesSent] = after.pages_sent - before.pages_sent;
  out[kInvalidations] = after.invalidations - before.invalidations;
  out[kDowngrades] = after.downgrades - before.downgrades;
}

void PrintCounters(const char* label, const uint64_t c[kCounters]) {
  std::printf("  %-8s %11" PRIu64 " %12" PRIu64 " %10" PRIu64 " %13" PRIu64 " %10" PRIu64
              " %13" PRIu64 " %10" PRIu64 "\n",
              label, c[kReadFaults], c[kWriteFaults], c[kLocalHits], c[kPagesFetched],
              c[kPagesSent], c[kInvalidations], c[kDowngrades]);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int ranks = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  Options o;
  if (!ParseOptions(argc, argv, &o)) {
    MPI_Finalize();
    return 2;
  }
  const int n = o.n;
  if (ranks > n - 2) {
    if (rank == 0) std::fprintf(stderr, "jacobi_mpi: more ranks than interior rows\n");
    MPI_Finalize();
    return 2;
  }
  const size_t grid_bytes = RoundUp(sizeof(double) * n * n, kPageSize);

  // Connect to this rank's node daemon.
  const std::string socket =
      o.socket_dir.empty() ? "" : o.socket_dir + "/node" + std::to_string(rank) + ".sock";
  Check("dsvm_init", dsvm_init(socket.empty() ? nullptr : socket.c_str()));
  uint32_t node = 0;
  Check("dsvm_node_id", dsvm_node_id(&node));

  // The handshake: rank 0 creates the region and fills in its header, then
  // broadcasts its address; the others open it and must get the same one.
  void* base = nullptr;
  size_t region_size = kPageSize + 2 * grid_bytes;
  if (rank == 0) {
    Check("dsvm_region_create",
          dsvm_region_create(o.region.c_str(), region_size, kPageSize, &base));
    auto* h = static_cast<Header*>(base);
    h->magic = kMagic;
    h->n = static_cast<uint64_t>(n);
    h->grid_offset[0] = kPageSize;
    h->grid_offset[1] = kPageSize + grid_bytes;
    Check("dsvm_barrier_init", dsvm_barrier_init(&h->barrier, static_cast<uint32_t>(ranks)));
  }
  uint64_t base_address = reinterpret_cast<uintptr_t>(base);
  MPI_Bcast(&base_address, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  if (rank != 0) {
    Check("dsvm_region_open", dsvm_region_open(o.region.c_str(), &base, &region_size));
    if (reinterpret_cast<uintptr_t>(base) != base_address) {
      Fail("the region is at a different address than in rank 0");
    }
  }
  auto* header = static_cast<Header*>(base);
  if (header->magic != kMagic || header->n != static_cast<uint64_t>(n)) {
    Fail("the region's header is not the one rank 0 wrote");
  }
  double* grid[2];
  for (int g = 0; g < 2; ++g) {
    grid[g] = reinterpret_cast<double*>(static_cast<char*>(base) + header->grid_offset[g]);
  }
  int first = 0;
  int last = 0;
  RowsOf(rank, ranks, n, &first, &last);

  // Who runs where, printed by rank 0 in rank order.
  std::vector<uint32_t> nodes(ranks);
  MPI_Gather(&node, 1, MPI_UINT32_T, nodes.data(), 1, MPI_UINT32_T, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("jacobi_mpi: %d ranks, %dx%d doubles, %d iterations; region '%s' at %p, %zu KiB\n",
                ranks, n, n, o.iterations, o.region.c_str(), base, region_size / 1024);
    for (int r = 0; r < ranks; ++r) {
      int f = 0;
      int l = 0;
      RowsOf(r, ranks, n, &f, &l);
      std::printf("  rank %d on node %u: rows %d..%d\n", r, nodes[r], f, l - 1);
    }
    std::fflush(stdout);
  }

  // Each rank writes the boundary cells of its own rows first (rank 0 the
  // top edge too, the last rank the bottom edge), so that a row's page
  // starts on the node that computes it. From here on dsvm alone moves the
  // data and orders the steps.
  for (int g = 0; g < 2; ++g) {
    SetBoundary(grid[g], n, rank == 0 ? 0 : first, rank == ranks - 1 ? n : last);
  }
  Check("dsvm_barrier_wait", dsvm_barrier_wait(&header->barrier));
  dsvm_node_stats_t before;
  dsvm_node_stats_t after;
  Check("dsvm_stats", dsvm_stats(&before));
  const double start = MPI_Wtime();
  double change = 0.0;
  for (int k = 0; k < o.iterations; ++k) {
    change = Relax(grid[k % 2], grid[(k + 1) % 2], n, first, last);
    Check("dsvm_barrier_wait", dsvm_barrier_wait(&header->barrier));
  }
  const double seconds = MPI_Wtime() - start;
  Check("dsvm_stats", dsvm_stats(&after));

  // The final reduction: the largest change in the last step, the slowest
  // rank's time, and what moved on each node.
  uint64_t moved[kCounters];
  Delta(before, after, moved);
  std::vector<uint64_t> all_moved(static_cast<size_t>(ranks) * kCounters);
  double max_change = 0.0;
  double max_seconds = 0.0;
  MPI_Reduce(&change, &max_change, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  MPI_Reduce(&seconds, &max_seconds, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  MPI_Gather(moved, kCounters, MPI_UINT64_T, all_moved.data(), kCounters, MPI_UINT64_T, 0,
             MPI_COMM_WORLD);

  // Rank 0 checks the result against the same computation in one process.
  int verdict = 0;
  if (rank == 0) {
    std::printf(
        "%d iterations over dsvm: %.3f s (%.2f ms each); largest change in the last: %.3g\n",
        o.iterations, max_seconds, 1e3 * max_seconds / o.iterations, max_change);
    std::printf("moved on each node during the iterations (dsvm_stats):\n");
    std::printf("  %-8s %11s %12s %10s %13s %10s %13s %10s\n", "", "read_faults", "write_faults",
                "local_hits", "pages_fetched", "pages_sent", "invalidations", "downgrades");
    uint64_t total[kCounters] = {};
    for (int r = 0; r < ranks; ++r) {
      const uint64_t* c = &all_moved[static_cast<size_t>(r) * kCounters];
      for (int i = 0; i < kCounters; ++i) total[i] += c[i];
      const std::string label = "node " + std::to_string(nodes[r]);
      PrintCounters(label.c_str(), c);
    }
    PrintCounters("total", total);
    if (static_cast<size_t>(n) * sizeof(double) == kPageSize) {
      // A row is a page. Each iteration a rank reads the row above and the
      // row below its block, both written by a neighbour in the previous one.
      const uint64_t halo = 2ull * (ranks - 1) * o.iterations;
      std::printf("of the %" PRIu64 " pages fetched, %" PRIu64
                  " are halo rows (2 per pair of neighbouring ranks and iteration);\n"
                  "the rest is mostly the barrier's page, which every rank writes each iteration\n",
                  total[kPagesFetched], halo);
    }

    const size_t points = static_cast<size_t>(n) * n;
    std::vector<double> ref[2] = {std::vector<double>(points, 0.0),
                                  std::vector<double>(points, 0.0)};
    SetBoundary(ref[0].data(), n, 0, n);
    SetBoundary(ref[1].data(), n, 0, n);
    const double ref_start = MPI_Wtime();
    for (int k = 0; k < o.iterations; ++k) {
      Relax(ref[k % 2].data(), ref[(k + 1) % 2].data(), n, 1, n - 1);
    }
    const double ref_seconds = MPI_Wtime() - ref_start;
    // Reading the whole result here fetches the other ranks' rows to node 0.
    const double* got = grid[o.iterations % 2];
    const double* want = ref[o.iterations % 2].data();
    double max_diff = 0.0;
    size_t differ = 0;
    for (size_t p = 0; p < points; ++p) {
      // Bitwise: the same arithmetic in the same order gives the same bits.
      if (std::memcmp(&got[p], &want[p], sizeof(double)) != 0) ++differ;
      max_diff = std::fmax(max_diff, std::fabs(got[p] - want[p]));
    }
    std::printf("check: the same %d iterations in one process, malloc'd memory: %.3f s\n",
                o.iterations, ref_seconds);
    std::printf("check: max |dsvm - reference| = %g over %zu points, %zu differ bitwise: %s\n",
                max_diff, points, differ, differ == 0 ? "PASS" : "FAIL");
    verdict = differ == 0 ? 0 : 1;
    std::fflush(stdout);
  }
  MPI_Bcast(&verdict, 1, MPI_INT, 0, MPI_COMM_WORLD);

  // Every rank closes the region before rank 0 deletes it.
  Check("dsvm_region_close", dsvm_region_close(base));
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0 && !o.keep) Check("dsvm_region_destroy", dsvm_region_destroy(o.region.c_str()));
  Check("dsvm_finalize", dsvm_finalize());
  MPI_Finalize();
  return verdict;
}
