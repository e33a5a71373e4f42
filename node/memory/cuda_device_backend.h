// The "cuda" DeviceBackend: NVIDIA GPUs through the CUDA runtime API.
//
// Arenas come from cudaMalloc (never managed memory), staging buffers from
// cudaHostAlloc (portable pinned memory), copies are cudaMemcpyAsync calls on
// non-blocking cudaStream_t streams, and each fence is a cudaEvent_t recorded
// on the stream (events are recycled once done).
//
// Defined only when the build found the CUDA toolkit (DSVM_HAVE_CUDA); this
// header carries no CUDA types, so it compiles everywhere. Callers go through
// MakeDeviceBackend("cuda"), which reports a build without CUDA.
#ifndef DSVM_NODE_MEMORY_CUDA_DEVICE_BACKEND_H_
#define DSVM_NODE_MEMORY_CUDA_DEVICE_BACKEND_H_

#include <memory>

#include "node/memory/device_backend.h"
#include "proto/status.h"

namespace dsvm::node {

// Errors: kUnavailable (no CUDA driver, or no GPU: cudaGetDeviceCount failed
// or found none), kInvalidArgument (max_pending_fences is 0).
Result<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(const DeviceBackendOptions& options);

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_CUDA_DEVICE_BACKEND_H_
