// The "emulated" DeviceBackend: host memory plays device memory, so the GPU
// tier and everything above it run and are tested without a GPU.
//
// It is a real implementation, not a mock: arenas are memfds mapped at
// 2 MiB aligned addresses (so ExportArena can hand one to a client process,
// as cudaIpcGetMemHandle does for a cudaMalloc block), counted against a per-device capacity
// (DeviceBackendOptions::emulated_device_bytes, kResourceExhausted beyond);
// each stream owns a copy thread that executes its queued copies in order and
// marks fences done as it passes them, so copies really complete later than
// they are queued and fences really are pending until then.
#ifndef DSVM_NODE_MEMORY_EMULATED_DEVICE_BACKEND_H_
#define DSVM_NODE_MEMORY_EMULATED_DEVICE_BACKEND_H_

#include <memory>

#include "node/memory/device_backend.h"
#include "proto/status.h"

namespace dsvm::node {

// Errors: kInvalidArgument (0 devices, 0 device bytes, a 0 queue depth).
Result<std::unique_ptr<DeviceBackend>> CreateEmulatedDeviceBackend(
    const DeviceBackendOptions& options);

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_EMULATED_DEVICE_BACKEND_H_
