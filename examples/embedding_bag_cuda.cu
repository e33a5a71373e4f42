// The embedding-bag gather on a GPU (embedding_bag.h): built only where
// CMake found CUDA. Never run on a GPU yet (issue #5): no GPU here.
#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "examples/embedding_bag.h"
#include "examples/embedding_bag_cuda.h"

namespace dsvm::examples::cuda_impl {
namespace {

std::string Text(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// One thread per (lookup, column): sums[bag][d] += rows[row][d]. The table's
// values make every sum exact (embedding_bag.h), so the order the atomic
// adds land in does not change the result.
__global__ void GatherKernel(const float* __restrict__ rows, const Lookup* __restrict__ lookups,
                             uint32_t count, uint32_t dim, float* __restrict__ sums) {
  const uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= uint64_t{count} * dim) return;
  const Lookup l = lookups[i / dim];
  const uint32_t d = static_cast<uint32_t>(i % dim);
  atomicAdd(&sums[uint64_t{l.bag} * dim + d], rows[uint64_t{l.row} * dim + d]);
}

class CudaGatherer final : public Gatherer {
 public:
  CudaGatherer(uint32_t dim, int gpu) : dim_(dim), gpu_(gpu) {}
  ~CudaGatherer() override {
    cudaFree(sums_);
    cudaFree(lookups_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  const char* name() const override { return "cuda"; }

  bool Init() {
    if (!Ok("cudaSetDevice", cudaSetDevice(gpu_))) return false;
    return Ok("cudaStreamCreate", cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }

  bool Begin(uint32_t bags) override {
    const size_t bytes = size_t{bags} * dim_ * sizeof(float);
    if (bytes > sums_bytes_) {
      cudaFree(sums_);
      sums_ = nullptr;
      if (!Ok("cudaMalloc", cudaMalloc(&sums_, bytes))) return false;
      sums_bytes_ = bytes;
    }
    bags_ = bags;
    return Ok("cudaMemsetAsync", cudaMemsetAsync(sums_, 0, bytes, stream_));
  }

  bool Gather(const float* rows, const Lookup* lookups, size_t count) override {
    if (count == 0) return true;
    const size_t bytes = count * sizeof(Lookup);
    if (bytes > lookups_bytes_) {
      cudaFree(lookups_);
      lookups_ = nullptr;
      if (!Ok("cudaMalloc", cudaMalloc(&lookups_, bytes))) return false;
      lookups_bytes_ = bytes;
    }
    if (!Ok("cudaMemcpyAsync",
            cudaMemcpyAsync(lookups_, lookups, bytes, cudaMemcpyHostToDevice, stream_))) {
      return false;
    }
    const uint64_t threads = uint64_t{count} * dim_;
    constexpr uint32_t kBlock = 256;
    const auto blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
    GatherKernel<<<blocks, kBlock, 0, stream_>>>(rows, lookups_,
                                                 static_cast<uint32_t>(count), dim_,
                                                 sums_);
    if (!Ok("GatherKernel launch", cudaGetLastError())) return false;
    // The caller unmaps `rows` next: the kernel must be done with it.
    return Ok("cudaStreamSynchronize", cudaStreamSynchronize(stream_));
  }

  bool Finish(float* out) override {
    const size_t bytes = size_t{bags_} * dim_ * sizeof(float);
    if (!Ok("cudaMemcpyAsync",
            cudaMemcpyAsync(out, sums_, bytes, cudaMemcpyDeviceToHost, stream_))) {
      return false;
    }
    return Ok("cudaStreamSynchronize", cudaStreamSynchronize(stream_));
  }

 private:
  bool Ok(const char* what, cudaError_t err) {
    if (err == cudaSuccess) return true;
    error_ = Text(what, err);
    return false;
  }

  const uint32_t dim_;
  const int gpu_;
  cudaStream_t stream_ = nullptr;
  float* sums_ = nullptr;
  size_t sums_bytes_ = 0;
  Lookup* lookups_ = nullptr;
  size_t lookups_bytes_ = 0;
  uint32_t bags_ = 0;
};

}  // namespace

bool Usable(std::string* why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    *why = Text("cudaGetDeviceCount", err);
    return false;
  }
  if (count == 0) {
    *why = "no CUDA device";
    return false;
  }
  return true;
}

bool IsDevicePointer(const void* p) {
  std::string why;
  if (!Usable(&why)) return false;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice;
}

std::unique_ptr<Gatherer> MakeGatherer(uint32_t dim, int gpu, std::string* why) {
  if (!Usable(why)) return nullptr;
  auto g = std::make_unique<CudaGatherer>(dim, gpu);
  if (!g->Init()) {
    *why = g->error();
    return nullptr;
  }
  return g;
}

bool AllocateMapped(size_t bytes, MappedHostBuffer* out, std::string* why) {
  if (!Usable(why)) return false;
  void* host = nullptr;
  cudaError_t err = cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
  if (err != cudaSuccess) {
    *why = Text("cudaHostAlloc", err);
    return false;
  }
  void* device = nullptr;
  err = cudaHostGetDevicePointer(&device, host, 0);
  if (err != cudaSuccess) {
    cudaFreeHost(host);
    *why = Text("cudaHostGetDevicePointer", err);
    return false;
  }
  out->host = host;
  out->device = device;
  out->cuda = true;
  return true;
}

void FreeMapped(MappedHostBuffer* b) { cudaFreeHost(b->host); }

bool AllocateDevice(size_t bytes, DeviceBuffer* out, std::string* why) {
  if (!Usable(why)) return false;
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    *why = Text("cudaMalloc", err);
    return false;
  }
  out->device = p;
  out->cuda = true;
  return true;
}

bool CopyToDevice(const DeviceBuffer& b, const void* src, size_t bytes, std::string* why) {
  const cudaError_t err = cudaMemcpy(b.device, src, bytes, cudaMemcpyHostToDevice);
  if (err != cudaSuccess) {
    *why = Text("cudaMemcpy", err);
    return false;
  }
  return true;
}

void FreeDevice(DeviceBuffer* b) { cudaFree(b->device); }

}  // namespace dsvm::examples::cuda_impl
