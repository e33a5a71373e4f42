#include "client/lib/gpu_ipc.h"

#include <string>

#ifdef DSVM_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <cstring>
#endif

namespace dsvm::client {

#ifdef DSVM_HAVE_CUDA

namespace {

// Makes `gpu` the calling thread's device for its life, then gives the
// application its own current device back.
class ScopedDevice {
 public:
  explicit ScopedDevice(uint32_t gpu) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    status_ = cudaSetDevice(static_cast<int>(gpu));
  }
  ~ScopedDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_ = cudaSuccess;
};

}  // namespace

Result<void*> OpenCudaArena(uint32_t gpu, std::span<const uint8_t> handle) {
  cudaIpcMemHandle_t h;
  if (handle.size() != sizeof(h)) {
    return InvalidArgument("a CUDA IPC handle of " + std::to_string(handle.size()) + " bytes");
  }
  std::memcpy(&h, handle.data(), sizeof(h));
  ScopedDevice device(gpu);
  cudaError_t err = device.status();
  void* p = nullptr;
  if (err == cudaSuccess) err = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    return Unavailable(std::string("cannot open the node's GPU memory on CUDA device ") +
                       std::to_string(gpu) + ": " + cudaGetErrorName(err) + " (" +
                       cudaGetErrorString(err) + ")");
  }
  return p;
}

void CloseCudaArena(void* device_ptr) { cudaIpcCloseMemHandle(device_ptr); }

Result<void*> RegisterCudaHost(uint32_t gpu, void* addr, size_t len, bool registered) {
  ScopedDevice scoped(gpu);
  cudaError_t err = scoped.status();
  if (err == cudaSuccess && !registered) {
    err = cudaHostRegister(addr, len, cudaHostRegisterMapped | cudaHostRegisterPortable);
  }
  void* device = nullptr;
  if (err == cudaSuccess) err = cudaHostGetDevicePointer(&device, addr, 0);
  if (err != cudaSuccess) {
    return Unavailable(std::string("cannot map the pages into CUDA device ") + std::to_string(gpu) +
                       " (zero-copy): " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                       ")");
  }
  return device;
}

void UnregisterCudaHost(void* addr) { cudaHostUnregister(addr); }

#else

Result<void*> OpenCudaArena(uint32_t, std::span<const uint8_t>) {
  return Unavailable(
      "the node daemon's GPU memory is CUDA, and this libdsvm was built without CUDA "
      "(configure with -DDSVM_WITH_CUDA=ON where the toolkit is)");
}

void CloseCudaArena(void*) {}

Result<void*> RegisterCudaHost(uint32_t, void*, size_t, bool) {
  return Unavailable(
      "the node daemon's GPUs are CUDA, and this libdsvm was built without CUDA "
      "(configure with -DDSVM_WITH_CUDA=ON where the toolkit is)");
}

void UnregisterCudaHost(void*) {}

#endif

}  // namespace dsvm::client
