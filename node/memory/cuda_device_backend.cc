// Built only with DSVM_HAVE_CUDA: the one file of dsvm that includes CUDA
// headers. Runtime API only (CUDA::cudart); no kernels.
#include "node/memory/cuda_device_backend.h"

#include <cuda_runtime_api.h>

#include <deque>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dsvm::node {
namespace {

std::string CudaText(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

Status CudaError(const char* what, cudaError_t err) { return Internal(CudaText(what, err)); }

// Out-of-memory is not sticky: clear it so the next call does not see it.
Status OutOfMemory(const std::string& what, cudaError_t err) {
  (void)cudaGetLastError();
  return ResourceExhausted(what + ": " + cudaGetErrorString(err));
}

class CudaDeviceBackend final : public DeviceBackend {
 public:
  CudaDeviceBackend(uint32_t device_count, const DeviceBackendOptions& options)
      : DeviceBackend(device_count), options_(options) {}
  ~CudaDeviceBackend() override { ReleaseAll(); }

  std::string_view name() const override { return "cuda"; }

 protected:
  Result<DevicePtr> DoAllocateArena(uint32_t device, uint64_t bytes) override {
    DSVM_RETURN_IF_ERROR(SetDevice(device));
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err == cudaErrorMemoryAllocation) {
      return OutOfMemory("GPU " + std::to_string(device) + " has no room for an arena of " +
                             std::to_string(bytes) + " bytes",
                         err);
    }
    if (err != cudaSuccess) return CudaError("cudaMalloc", err);
    return reinterpret_cast<DevicePtr>(p);
  }

  Status DoFreeArena(uint32_t device, DevicePtr base, uint64_t bytes) override {
    DSVM_RETURN_IF_ERROR(SetDevice(device));
    // cudaFree waits for the device's queued work first.
    const cudaError_t err = cudaFree(reinterpret_cast<void*>(base));
    if (err != cudaSuccess) return CudaError("cudaFree", err);
    return Status::Ok();
  }

  Result<ArenaExport> DoExportArena(uint32_t device, DevicePtr base, uint64_t) override {
    DSVM_RETURN_IF_ERROR(SetDevice(device));
    cudaIpcMemHandle_t handle;
    const cudaError_t err = cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base));
    if (err != cudaSuccess) return CudaError("cudaIpcGetMemHandle", err);
    ArenaExport e;
    const auto* b = reinterpret_cast<const uint8_t*>(&handle);
    e.ipc_handle.assign(b, b + sizeof(handle));
    return e;
  }

  Result<uint8_t*> DoAllocateStaging(uint64_t bytes) override {
    void* p = nullptr;
    // Portable: pinned for every device, not only the current one.
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocPortable);
    if (err == cudaErrorMemoryAllocation) {
      return OutOfMemory("cannot pin a staging buffer of " + std::to_string(bytes) + " bytes", err);
    }
    if (err != cudaSuccess) return CudaError("cudaHostAlloc", err);
    return static_cast<uint8_t*>(p);
  }

  Status DoFreeStaging(uint8_t* data, uint64_t bytes) override {
    // The contract says queued copies finish first; cudaFreeHost alone does
    // not promise that for copies on non-blocking streams.
    DSVM_RETURN_IF_ERROR(SynchronizeStreams());
    const cudaError_t err = cudaFreeHost(data);
    if (err != cudaSuccess) return CudaError("cudaFreeHost", err);
    return Status::Ok();
  }

  Status DoRegisterHost(void* data, uint64_t bytes) override {
    // Portable: pinned for every device, as the staging buffers are.
    const cudaError_t err = cudaHostRegister(data, bytes, cudaHostRegisterPortable);
    if (err == cudaSuccess) return Status::Ok();
    if (err == cudaErrorMemoryAllocation) {
      return OutOfMemory("cannot pin " + std::to_string(bytes) + " bytes of host memory", err);
    }
    // This memory cannot be pinned (the platform, or the kind of mapping).
    // Neither error is sticky.
    if (err == cudaErrorNotSupported || err == cudaErrorInvalidValue) {
      (void)cudaGetLastError();
      return FailedPrecondition(CudaText("cudaHostRegister", err));
    }
    return CudaError("cudaHostRegister", err);
  }

  Status DoUnregisterHost(void* data, uint64_t) override {
    // As DoFreeStaging; unpinned whatever the streams say, or the pin
    // would outlive the range the base class has forgotten.
    Status synced = SynchronizeStreams();
    const cudaError_t err = cudaHostUnregister(data);
    if (err != cudaSuccess) return CudaError("cudaHostUnregister", err);
    return synced;
  }

  Status DoCreateStream(StreamId stream, uint32_t device) override {
    DSVM_RETURN_IF_ERROR(SetDevice(device));
    cudaStream_t s = nullptr;
    // Non-blocking: no implicit synchronization with the legacy default
    // stream, so copies overlap with work others queue there.
    const cudaError_t err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (err != cudaSuccess) return CudaError("cudaStreamCreateWithFlags", err);
    Stream st;
    st.device = device;
    st.stream = s;
    streams_.emplace(stream.value, std::move(st));
    return Status::Ok();
  }

  Status DoDestroyStream(StreamId stream) override {
    auto node = streams_.extract(stream.value);
    Stream& s = node.mapped();
    Status status = SetDevice(s.device);
    cudaError_t err = cudaStreamSynchronize(s.stream);
    if (status.ok() && err != cudaSuccess) status = CudaError("cudaStreamSynchronize", err);
    for (auto& [seq, ev] : s.pending) s.free_events.push_back(ev);
    for (cudaEvent_t ev : s.free_events) cudaEventDestroy(ev);
    err = cudaStreamDestroy(s.stream);
    if (status.ok() && err != cudaSuccess) status = CudaError("cudaStreamDestroy", err);
    return status;
  }

  Status DoCopyToDevice(StreamId stream, std::span<const HostToDevice> batch) override {
    Stream& s = streams_.at(stream.value);
    DSVM_RETURN_IF_ERROR(SetDevice(s.device));
    for (const HostToDevice& c : batch) {
      const cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(c.dst), c.src, c.bytes,
                                              cudaMemcpyHostToDevice, s.stream);
      if (err != cudaSuccess) return CudaError("cudaMemcpyAsync (host to device)", err);
    }
    return Status::Ok();
  }

  Status DoCopyToHost(StreamId stream, std::span<const DeviceToHost> batch) override {
    Stream& s = streams_.at(stream.value);
    DSVM_RETURN_IF_ERROR(SetDevice(s.device));
    for (const DeviceToHost& c : batch) {
      const cudaError_t err = cudaMemcpyAsync(c.dst, reinterpret_cast<const void*>(c.src), c.bytes,
                                              cudaMemcpyDeviceToHost, s.stream);
      if (err != cudaSuccess) return CudaError("cudaMemcpyAsync (device to host)", err);
    }
    return Status::Ok();
  }

  Status DoCopyOnDevice(StreamId stream, DevicePtr src, DevicePtr dst, uint64_t bytes) override {
    Stream& s = streams_.at(stream.value);
    DSVM_RETURN_IF_ERROR(SetDevice(s.device));
    const cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(dst),
                                            reinterpret_cast<const void*>(src), bytes,
                                            cudaMemcpyDeviceToDevice, s.stream);
    if (err != cudaSuccess) return CudaError("cudaMemcpyAsync (device to device)", err);
    return Status::Ok();
  }

  Status DoRecordFence(StreamId stream, uint64_t seq) override {
    Stream& s = streams_.at(stream.value);
    DSVM_RETURN_IF_ERROR(SetDevice(s.device));
    DSVM_RETURN_IF_ERROR(Retire(s, /*wait_for=*/0));
    if (s.pending.size() >= options_.max_pending_fences) {
      // The bound: wait for the oldest pending fence to free its event.
      DSVM_RETURN_IF_ERROR(Retire(s, s.pending.front().first));
    }
    DSVM_CHECK(s.pending.size() < options_.max_pending_fences);
    cudaEvent_t ev = nullptr;
    if (!s.free_events.empty()) {
      ev = s.free_events.back();
      s.free_events.pop_back();
    } else {
      const cudaError_t err = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
      if (err != cudaSuccess) return CudaError("cudaEventCreateWithFlags", err);
    }
    const cudaError_t err = cudaEventRecord(ev, s.stream);
    if (err != cudaSuccess) {
      s.free_events.push_back(ev);
      return CudaError("cudaEventRecord", err);
    }
    s.pending.emplace_back(seq, ev);
    return Status::Ok();
  }

  Result<bool> DoIsDone(StreamId stream, uint64_t seq) override {
    Stream& s = streams_.at(stream.value);
    if (seq <= s.done) return true;
    DSVM_RETURN_IF_ERROR(SetDevice(s.device));
    DSVM_RETURN_IF_ERROR(Retire(s, 0));
    return seq <= s.done;
  }

  Status DoWait(StreamId stream, uint64_t seq) override {
    Stream& s = streams_.at(stream.value);
    if (seq <= s.done) return Status::Ok();
    DSVM_RETURN_IF_ERROR(SetDevice(s.device));
    return Retire(s, seq);
  }

 private:
  struct Stream {
    uint32_t device = 0;
    cudaStream_t stream = nullptr;
    // Recorded fences not yet seen done, oldest first. Events on one stream
    // complete in recording order, so `done` is the last retired seq.
    std::deque<std::pair<uint64_t, cudaEvent_t>> pending;
    std::vector<cudaEvent_t> free_events;
    uint64_t done = 0;
  };

  // The current device is per thread; every call names its own.
  static Status SetDevice(uint32_t device) {
    const cudaError_t err = cudaSetDevice(static_cast<int>(device));
    if (err != cudaSuccess) return CudaError("cudaSetDevice", err);
    return Status::Ok();
  }

  // Waits for the copies queued on every stream.
  Status SynchronizeStreams() {
    for (auto& [id, s] : streams_) {
      DSVM_RETURN_IF_ERROR(SetDevice(s.device));
      const cudaError_t err = cudaStreamSynchronize(s.stream);
      if (err != cudaSuccess) return CudaError("cudaStreamSynchronize", err);
    }
    return Status::Ok();
  }

  // Retires the pending fences that are done, oldest first; with
  // wait_for != 0, blocks until fence wait_for is done.
  static Status Retire(Stream& s, uint64_t wait_for) {
    while (!s.pending.empty()) {
      auto [seq, ev] = s.pending.front();
      cudaError_t err;
      if (wait_for != 0 && seq <= wait_for) {
        err = cudaEventSynchronize(ev);
      } else {
        err = cudaEventQuery(ev);
        if (err == cudaErrorNotReady) break;
      }
      if (err != cudaSuccess) return CudaError("a copy before the fence failed", err);
      s.pending.pop_front();
      s.free_events.push_back(ev);
      s.done = seq;
    }
    return Status::Ok();
  }

  const DeviceBackendOptions options_;
  std::unordered_map<uint64_t, Stream> streams_;
};

}  // namespace

Result<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(
    const DeviceBackendOptions& options) {
  if (options.max_pending_fences == 0) return InvalidArgument("max_pending_fences of 0");
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return Unavailable("the CUDA runtime found no usable GPU or driver (" +
                       CudaText("cudaGetDeviceCount", err) + ")");
  }
  if (count <= 0) return Unavailable("cudaGetDeviceCount found 0 GPUs");
  return std::unique_ptr<DeviceBackend>(
      new CudaDeviceBackend(static_cast<uint32_t>(count), options));
}

}  // namespace dsvm::node
