#include "examples/embedding_bag.h"

#include "examples/embedding_bag_cuda.h"

#include <cstdlib>
#include <cstring>

namespace dsvm::examples {

void FillRows(float* out, uint64_t first, uint64_t count, uint32_t dim) {
  for (uint64_t r = 0; r < count; ++r) {
    for (uint32_t d = 0; d < dim; ++d) out[r * dim + d] = TableValue(first + r, d);
  }
}

Batch MakeBatch(std::mt19937_64& rng, uint64_t table_rows, uint32_t bags, uint32_t bag_size) {
  Batch b;
  b.bags = bags;
  b.bag_size = bag_size;
  b.rows.resize(uint64_t{bags} * bag_size);
  std::uniform_int_distribution<uint64_t> row(0, table_rows - 1);
  for (uint64_t& r : b.rows) r = row(rng);
  return b;
}

ChunkPlan PlanChunks(const Batch& batch, uint64_t table_rows, uint64_t chunk_rows) {
  ChunkPlan p;
  p.chunk_rows = chunk_rows;
  const uint64_t chunks = (table_rows + chunk_rows - 1) / chunk_rows;
  // A counting sort by chunk: keeps each chunk's lookups in batch order.
  p.start.assign(chunks + 1, 0);
  for (uint64_t r : batch.rows) ++p.start[r / chunk_rows + 1];
  for (uint64_t c = 0; c < chunks; ++c) p.start[c + 1] += p.start[c];
  std::vector<uint64_t> next(p.start.begin(), p.start.end() - 1);
  p.lookups.resize(batch.rows.size());
  for (uint64_t i = 0; i < batch.rows.size(); ++i) {
    const uint64_t r = batch.rows[i];
    p.lookups[next[r / chunk_rows]++] = {static_cast<uint32_t>(i / batch.bag_size),
                                         static_cast<uint32_t>(r % chunk_rows)};
  }
  return p;
}

void ReferenceSums(const float* table, uint32_t dim, const Batch& batch, float* out) {
  for (uint32_t b = 0; b < batch.bags; ++b) {
    float* sum = out + uint64_t{b} * dim;
    for (uint32_t d = 0; d < dim; ++d) sum[d] = 0.0f;
    for (uint32_t i = 0; i < batch.bag_size; ++i) {
      const float* row = table + batch.rows[uint64_t{b} * batch.bag_size + i] * dim;
      for (uint32_t d = 0; d < dim; ++d) sum[d] += row[d];
    }
  }
}

namespace {

class CpuGatherer final : public Gatherer {
 public:
  explicit CpuGatherer(uint32_t dim) : dim_(dim) {}
  const char* name() const override { return "cpu"; }
  bool Begin(uint32_t bags) override {
    sums_.assign(uint64_t{bags} * dim_, 0.0f);
    return true;
  }
  bool Gather(const float* rows, const Lookup* lookups, size_t count) override {
    for (size_t i = 0; i < count; ++i) {
      const Lookup& l = lookups[i];
      const float* row = rows + uint64_t{l.row} * dim_;
      float* sum = sums_.data() + uint64_t{l.bag} * dim_;
      for (uint32_t d = 0; d < dim_; ++d) sum[d] += row[d];
    }
    return true;
  }
  bool Finish(float* out) override {
    std::memcpy(out, sums_.data(), sums_.size() * sizeof(float));
    return true;
  }

 private:
  const uint32_t dim_;
  std::vector<float> sums_;
};

}  // namespace

std::unique_ptr<Gatherer> MakeCpuGatherer(uint32_t dim) {
  return std::make_unique<CpuGatherer>(dim);
}

#ifndef DSVM_EXAMPLE_CUDA
// Built without CUDA: every CUDA path answers so.
namespace cuda_impl {
namespace {
constexpr const char* kNoCuda = "built without CUDA";
}  // namespace
bool Usable(std::string* why) {
  *why = kNoCuda;
  return false;
}
bool IsDevicePointer(const void*) { return false; }
std::unique_ptr<Gatherer> MakeGatherer(uint32_t, int, std::string* why) {
  *why = kNoCuda;
  return nullptr;
}
bool AllocateMapped(size_t, MappedHostBuffer*, std::string* why) {
  *why = kNoCuda;
  return false;
}
void FreeMapped(MappedHostBuffer*) {}
bool AllocateDevice(size_t, DeviceBuffer*, std::string* why) {
  *why = kNoCuda;
  return false;
}
bool CopyToDevice(const DeviceBuffer&, const void*, size_t, std::string* why) {
  *why = kNoCuda;
  return false;
}
void FreeDevice(DeviceBuffer*) {}
}  // namespace cuda_impl
#endif  // DSVM_EXAMPLE_CUDA

bool CudaUsable(std::string* why) { return cuda_impl::Usable(why); }

bool IsCudaDevicePointer(const void* p) { return cuda_impl::IsDevicePointer(p); }

std::unique_ptr<Gatherer> MakeCudaGatherer(uint32_t dim, int gpu, std::string* why) {
  return cuda_impl::MakeGatherer(dim, gpu, why);
}

bool AllocateMappedHost(size_t bytes, bool cuda, MappedHostBuffer* out, std::string* why) {
  if (cuda) return cuda_impl::AllocateMapped(bytes, out, why);
  out->host = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  out->device = out->host;
  out->cuda = false;
  if (out->host == nullptr) *why = "out of memory";
  return out->host != nullptr;
}

void FreeMappedHost(MappedHostBuffer* b) {
  if (b->cuda) {
    cuda_impl::FreeMapped(b);
  } else {
    std::free(b->host);
  }
  *b = {};
}

bool AllocateDevice(size_t bytes, bool cuda, DeviceBuffer* out, std::string* why) {
  if (cuda) return cuda_impl::AllocateDevice(bytes, out, why);
  out->device = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  out->cuda = false;
  if (out->device == nullptr) *why = "out of memory";
  return out->device != nullptr;
}

bool CopyToDeviceBuffer(const DeviceBuffer& b, const void* src, size_t bytes, std::string* why) {
  if (b.cuda) return cuda_impl::CopyToDevice(b, src, bytes, why);
  std::memcpy(b.device, src, bytes);
  return true;
}

void FreeDevice(DeviceBuffer* b) {
  if (b->cuda) {
    cuda_impl::FreeDevice(b);
  } else {
    std::free(b->device);
  }
  *b = {};
}

}  // namespace dsvm::examples
