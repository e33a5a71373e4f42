// The embedding-bag gather shared by examples/embedding_gather and
// `dsvm-bench gpu` (issue #5): a table of `rows` x `dim` floats, batches of
// bags of row ids, and per bag the sum of its rows (what a recommendation
// model's EmbeddingBag with mode "sum" computes).
//
// The table's values are multiples of 1/64 in [-8, 8), so every sum of up
// to 32768 of them is exact in float whatever the order of the additions:
// a gather done chunk by chunk, or with atomic adds on a GPU, must then be
// bitwise equal to the CPU reference, and any difference is a wrong byte,
// never rounding.
//
// Only the C++ standard library here: the examples use dsvm through its
// public API alone. C++17, for nvcc (embedding_bag_cuda.cu includes it).
#ifndef DSVM_EXAMPLES_EMBEDDING_BAG_H_
#define DSVM_EXAMPLES_EMBEDDING_BAG_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace dsvm::examples {

// Element (row, d) of the table.
inline float TableValue(uint64_t row, uint32_t d) {
  const uint64_t h = (row * 0x9E3779B97F4A7C15ull) ^ (uint64_t{d} * 0xC2B2AE3D27D4EB4Full);
  return static_cast<float>(static_cast<int>((h >> 40) % 1024) - 512) / 64.0f;
}

// Writes rows [first, first + count) of the table, row-major, at `out`.
void FillRows(float* out, uint64_t first, uint64_t count, uint32_t dim);

// A batch: `bags` bags of `bag_size` row ids; rows[b * bag_size + i].
struct Batch {
  uint32_t bags = 0;
  uint32_t bag_size = 0;
  std::vector<uint64_t> rows;
};

// Row ids drawn uniformly from [0, table_rows).
Batch MakeBatch(std::mt19937_64& rng, uint64_t table_rows, uint32_t bags, uint32_t bag_size);

// One lookup of a chunk: add row `row` of the chunk (counted from the
// chunk's first row) to bag `bag`.
struct Lookup {
  uint32_t bag;
  uint32_t row;
};

// A batch's lookups grouped by chunk (chunk c holds table rows
// [c * chunk_rows, (c + 1) * chunk_rows)): chunk c's lookups are
// lookups[start[c] .. start[c + 1]).
struct ChunkPlan {
  uint64_t chunk_rows = 0;
  std::vector<uint64_t> start;  // chunks + 1 entries
  std::vector<Lookup> lookups;

  size_t chunks() const { return start.empty() ? 0 : start.size() - 1; }
  const Lookup* of(size_t c) const { return lookups.data() + start[c]; }
  size_t count(size_t c) const { return start[c + 1] - start[c]; }
};

// chunk_rows must be at most 2^32.
ChunkPlan PlanChunks(const Batch& batch, uint64_t table_rows, uint64_t chunk_rows);

// The reference: out[b * dim + d] = sum over the bag's rows of
// table[row * dim + d], on the CPU, in the bag's order.
void ReferenceSums(const float* table, uint32_t dim, const Batch& batch, float* out);

// Where a gather runs. `rows` passed to Gather is the address of a chunk's
// first row as the device sees it: host memory for "cpu" (the emulated
// backend's device memory, or the plain host table), a CUDA device pointer
// (or mapped host memory's device pointer) for "cuda". Every Gather has
// finished reading `rows` when it returns, so the caller may then unmap it.
class Gatherer {
 public:
  virtual ~Gatherer() = default;
  virtual const char* name() const = 0;
  // Starts a batch of `bags` bags: the sums start at zero. False on error
  // (error() says why).
  virtual bool Begin(uint32_t bags) = 0;
  // sums[l.bag] += rows[l.row] for each of the `count` lookups.
  virtual bool Gather(const float* rows, const Lookup* lookups, size_t count) = 0;
  // Copies the batch's sums (bags x dim floats) to `out`.
  virtual bool Finish(float* out) = 0;
  const std::string& error() const { return error_; }

 protected:
  std::string error_;
};

std::unique_ptr<Gatherer> MakeCpuGatherer(uint32_t dim);

// CUDA, where the build has it (DSVM_EXAMPLE_CUDA, embedding_bag_cuda.cu).
// Whether a GPU is usable here; else *why says why.
bool CudaUsable(std::string* why);
// Whether `p` is device memory of a GPU (cudaPointerGetAttributes), so a
// kernel can read it; false without CUDA.
bool IsCudaDevicePointer(const void* p);
// nullptr with *why without CUDA or a GPU. gpu: the device to run on.
std::unique_ptr<Gatherer> MakeCudaGatherer(uint32_t dim, int gpu, std::string* why);

// Host memory a CUDA kernel reads over the bus (cudaHostAlloc with
// cudaHostAllocMapped): for zero-copy. Without CUDA, plain memory.
struct MappedHostBuffer {
  void* host = nullptr;
  const void* device = nullptr;  // what a kernel reads (cuda); == host otherwise
  bool cuda = false;
};
bool AllocateMappedHost(size_t bytes, bool cuda, MappedHostBuffer* out, std::string* why);
void FreeMappedHost(MappedHostBuffer* b);

// A device buffer and copies into it, for the hand-written staging loop:
// cudaMalloc and cudaMemcpy with CUDA, host memory and memcpy without.
struct DeviceBuffer {
  void* device = nullptr;
  bool cuda = false;
};
bool AllocateDevice(size_t bytes, bool cuda, DeviceBuffer* out, std::string* why);
bool CopyToDeviceBuffer(const DeviceBuffer& b, const void* src, size_t bytes, std::string* why);
void FreeDevice(DeviceBuffer* b);

}  // namespace dsvm::examples

#endif  // DSVM_EXAMPLES_EMBEDDING_BAG_H_
