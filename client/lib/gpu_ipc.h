// How libdsvm reaches a node daemon's GPU memory in this process
// (dsvm_gpu_map): cuda arenas through CUDA IPC, and zero-copy maps
// (accessed-by advice) by registering the range with CUDA. The only part of libdsvm
// that sees CUDA headers, and only where the build found CUDA
// (DSVM_HAVE_CUDA); without it every call reports kUnavailable. Internal to
// client/lib.
#ifndef DSVM_CLIENT_LIB_GPU_IPC_H_
#define DSVM_CLIENT_LIB_GPU_IPC_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "proto/status.h"

namespace dsvm::client {

// The arena whose cudaIpcMemHandle_t is `handle`, on CUDA device `gpu`, as a
// device pointer of this process (cudaIpcOpenMemHandle). Errors:
// kUnavailable (built without CUDA, no driver or GPU here, or the handle
// cannot be opened), kInvalidArgument (a handle of the wrong size).
Result<void*> OpenCudaArena(uint32_t gpu, std::span<const uint8_t> handle);
// cudaIpcCloseMemHandle of what OpenCudaArena returned.
void CloseCudaArena(void* device_ptr);

// Zero-copy maps: `len` bytes of this process's memory at `addr` as a device
// pointer of CUDA device `gpu` (cudaHostRegister, mapped and portable,
// unless `registered` already; then cudaHostGetDevicePointer). Errors:
// kUnavailable (built without CUDA, no driver or GPU, or CUDA refuses).
Result<void*> RegisterCudaHost(uint32_t gpu, void* addr, size_t len, bool registered);
// cudaHostUnregister of what RegisterCudaHost registered.
void UnregisterCudaHost(void* addr);

}  // namespace dsvm::client

#endif  // DSVM_CLIENT_LIB_GPU_IPC_H_
