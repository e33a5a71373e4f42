// DeviceBackend: one kind of device memory, as the node's GPU tier sees it
// (issue #5). Two implementations sit behind it: "cuda" (NVIDIA GPUs through
// the CUDA runtime; built only when CMake finds the CUDA toolkit) and
// "emulated" (host memory playing devices, with a copy thread per stream), so
// everything above this interface runs and is tested without a GPU.
//
// Objects:
// - device: numbered 0 .. device_count()-1.
// - arena: a block of one device's memory (64 MiB or more in practice) that
//   DevicePagePool carves into page slots. Never managed (unified) memory.
//   Arenas and the slots in them are named by DevicePtr, an address in the
//   devices' address space that host code must never dereference.
// - staging buffer: pinned (page-locked) host memory. Copies from or to it
//   overlap with other work. Copies may also name ordinary host memory; on
//   CUDA the driver then stages them itself and they do not overlap.
// - registered host memory: memory the caller owns and maps (a region's
//   memfd, through the daemon's mapping), pinned in place by RegisterHost
//   so copies from and to it run as DMA, with no staging copy. It must stay
//   mapped, and its pages in place, until UnregisterHost: a page punched out
//   of a file while registered stays pinned, and the device would go on
//   copying that old page.
// - stream: an in-order queue of copies on one device. Copies on one stream
//   complete in the order they were queued; copies on different streams may
//   run concurrently and complete in any order. A caller creates as many
//   streams per device as it wants overlap.
// - fence: a point recorded in a stream's queue. It is done when every copy
//   queued on the stream before it has completed. Fences are plain values
//   (no release); a later fence on a stream is done only if every earlier
//   one is.
//
// Copies: CopyToDevice/CopyToHost validate their whole batch, queue it and
// return; the bytes move later. A batch is all or nothing: one bad entry
// refuses the batch and queues none of it. Until a fence recorded after a
// copy is done, the caller must neither touch the host bytes the copy reads
// or writes nor copy into the same device bytes from another stream. Freeing
// an arena, a staging buffer or a stream first waits for the copies queued
// on it (as cudaFree does), so a free never races a queued copy.
//
// Errors, the same for every backend (tests/unit/device_backend_test.cc runs
// one suite on each):
//   kInvalidArgument   unknown device index, stream, arena or staging buffer;
//                      a zero length; a device range not inside one arena of
//                      the stream's device; a null host pointer, or a host
//                      range that starts in a staging buffer and runs past
//                      its end (or a registered range); a fence not
//                      recorded on its stream; a registration that is
//                      unaligned or overlaps a staging buffer or another.
//   kFailedPrecondition the driver will not pin that host memory
//                      (RegisterHost): copy through staging instead.
//   kResourceExhausted the device has no room for the arena, or the host
//                      cannot pin the staging buffer.
//   kUnavailable       no device: the cuda backend's Create found no GPU or
//                      driver, or the binary was built without CUDA.
//   kInternal          the device or driver reported an error (its text in
//                      the message); the backend should not be used further.
//
// Thread safety: none. One owner (the daemon's GPU strand) calls every
// method; backends run their own threads behind it (emulated copy threads,
// the CUDA driver).
#ifndef DSVM_NODE_MEMORY_DEVICE_BACKEND_H_
#define DSVM_NODE_MEMORY_DEVICE_BACKEND_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "proto/status.h"

namespace dsvm::node {

// An address in device memory. Host code never dereferences it.
using DevicePtr = uint64_t;

// Arena sizes are multiples of this; arena bases are aligned to at least
// kArenaAlignment (cudaMalloc's guarantee).
inline constexpr uint64_t kArenaGranularity = 4096;
inline constexpr uint64_t kArenaAlignment = 256;

struct DeviceArena {
  uint32_t device = 0;
  DevicePtr base = 0;
  uint64_t bytes = 0;
};

// How another process on the host reaches an arena (dsvm_gpu_map hands it to
// the client): exactly one of the two is set.
struct ArenaExport {
  // emulated: a memfd holding the arena's bytes (offset 0 = the arena's
  // base), owned by the backend and valid while the arena lives; the
  // receiver maps it MAP_SHARED.
  int fd = -1;
  // cuda: the cudaIpcMemHandle_t of the arena (cudaIpcGetMemHandle), which
  // the receiver opens with cudaIpcOpenMemHandle.
  std::vector<uint8_t> ipc_handle;
};

struct StagingBuffer {
  uint8_t* data = nullptr;
  uint64_t bytes = 0;
};

// Names a stream of this backend; value 0 is never a stream.
struct StreamId {
  uint64_t value = 0;
  bool operator==(const StreamId&) const = default;
};

// The seq-th fence recorded on `stream` (seq counts from 1).
struct Fence {
  StreamId stream;
  uint64_t seq = 0;
};

// One entry of a host-to-device batch: `bytes` from host `src` to `dst`.
struct HostToDevice {
  const void* src = nullptr;
  DevicePtr dst = 0;
  uint64_t bytes = 0;
};

// One entry of a device-to-host batch: `bytes` from `src` to host `dst`.
struct DeviceToHost {
  DevicePtr src = 0;
  void* dst = nullptr;
  uint64_t bytes = 0;
};

struct DeviceBackendOptions {
  // emulated: how many devices it plays, and each one's memory (the sum of
  // its arenas' sizes), so running out of device memory is testable.
  uint32_t emulated_devices = 1;
  uint64_t emulated_device_bytes = 16ull << 30;
  // emulated: bound on copies queued on one stream; queuing more blocks
  // until the copy thread makes room (CUDA's launch queue behaves alike).
  uint32_t emulated_queue_depth = 4096;
  // Test seam, emulated only: each copy thread sleeps this long before each
  // copy, so a test can observe a copy still in flight. 0 everywhere else.
  std::chrono::microseconds emulated_copy_delay{0};
  // cuda: bound on incomplete fences per stream (each holds a cudaEvent_t);
  // recording one more first waits for the oldest.
  uint32_t max_pending_fences = 1024;
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend();
  DeviceBackend(const DeviceBackend&) = delete;
  DeviceBackend& operator=(const DeviceBackend&) = delete;

  // "emulated" or "cuda".
  virtual std::string_view name() const = 0;
  uint32_t device_count() const { return device_count_; }

  // A new arena of `bytes` on `device`. Errors: kInvalidArgument (unknown
  // device; bytes 0 or not a multiple of kArenaGranularity),
  // kResourceExhausted (the device has no room), kInternal.
  Result<DeviceArena> AllocateArena(uint32_t device, uint64_t bytes);
  // Frees the arena whose base is `base`, after the copies queued on its
  // device's streams. Errors: kInvalidArgument (no arena has that base),
  // kInternal.
  Status FreeArena(DevicePtr base);

  // What another process needs to reach the arena whose base is `base`.
  // Errors: kInvalidArgument (no arena has that base), kInternal.
  Result<ArenaExport> ExportArena(DevicePtr base);

  // A new pinned host buffer of `bytes` (> 0). Errors: kInvalidArgument,
  // kResourceExhausted, kInternal.
  Result<StagingBuffer> AllocateStaging(uint64_t bytes);
  // Frees the staging buffer that starts at `data`, after every queued copy.
  // Errors: kInvalidArgument (no staging buffer starts there), kInternal.
  Status FreeStaging(const void* data);

  // Pins [data, data + bytes) of this process's memory for copies (see
  // "registered host memory" above): cuda cudaHostRegister, emulated
  // records the range. Every page of it must be mapped and present (pinning
  // faults in what is not). Errors: kInvalidArgument (null, 0 bytes, data or
  // bytes not a multiple of 4 KiB, the range overlaps a staging buffer or a
  // registered range), kFailedPrecondition (the driver refuses to pin this
  // memory), kResourceExhausted (the host cannot pin more), kInternal.
  Status RegisterHost(void* data, uint64_t bytes);
  // Unpins the range RegisterHost(data, ...) pinned, after every queued
  // copy. Errors: kInvalidArgument (no registered range starts at data),
  // kInternal.
  Status UnregisterHost(const void* data);
  size_t registered_count() const { return registered_.size(); }
  uint64_t registered_bytes() const { return registered_bytes_; }

  // A new stream on `device`. Errors: kInvalidArgument (unknown device),
  // kInternal.
  Result<StreamId> CreateStream(uint32_t device);
  // Waits for the stream's queued copies, then destroys it; its fences become
  // unknown. Errors: kInvalidArgument (unknown stream), kInternal.
  Status DestroyStream(StreamId stream);

  // Queues a batch of copies on `stream` (see "Copies" above). An empty
  // batch does nothing. Errors: kInvalidArgument (unknown stream; an entry
  // with 0 bytes, a null host pointer, a host range running past its staging
  // buffer, or a device range not inside one arena of the stream's device),
  // kInternal.
  Status CopyToDevice(StreamId stream, std::span<const HostToDevice> batch);
  Status CopyToHost(StreamId stream, std::span<const DeviceToHost> batch);
  // One copy; as the batch forms.
  Status CopyToDevice(StreamId stream, const void* src, DevicePtr dst, uint64_t bytes) {
    const HostToDevice one{src, dst, bytes};
    return CopyToDevice(stream, std::span<const HostToDevice>(&one, 1));
  }
  Status CopyToHost(StreamId stream, DevicePtr src, void* dst, uint64_t bytes) {
    const DeviceToHost one{src, dst, bytes};
    return CopyToHost(stream, std::span<const DeviceToHost>(&one, 1));
  }
  // Queues a copy between two ranges of the stream's device (a page moving
  // to another slot without crossing the bus). Errors: kInvalidArgument
  // (unknown stream; 0 bytes; a range not inside one arena of the stream's
  // device; the ranges overlap), kInternal.
  Status CopyOnDevice(StreamId stream, DevicePtr src, DevicePtr dst, uint64_t bytes);

  // Records a fence after everything queued on `stream` so far. Errors:
  // kInvalidArgument (unknown stream), kInternal.
  Result<Fence> RecordFence(StreamId stream);
  // Polls: true when the fence is done. Never blocks. Errors:
  // kInvalidArgument (unknown stream, or a fence never recorded on it),
  // kInternal (a copy before the fence failed on the device).
  Result<bool> IsDone(const Fence& fence);
  // Blocks until the fence is done. Errors: as IsDone.
  Status Wait(const Fence& fence);
  // Blocks until the fence is done or `timeout` has passed: true when done.
  // Errors: as IsDone.
  Result<bool> WaitFor(const Fence& fence, std::chrono::microseconds timeout);

  size_t arena_count() const { return arenas_.size(); }
  // Bytes of the device's memory held in arenas. REQUIRES: device < device_count().
  uint64_t arena_bytes(uint32_t device) const;
  size_t staging_count() const { return staging_.size(); }
  size_t stream_count() const { return streams_.size(); }

 protected:
  explicit DeviceBackend(uint32_t device_count);

  // The implementation's half. The base class has validated every argument
  // (devices, streams, ranges, fence numbers) before calling one of these.
  virtual Result<DevicePtr> DoAllocateArena(uint32_t device, uint64_t bytes) = 0;
  virtual Status DoFreeArena(uint32_t device, DevicePtr base, uint64_t bytes) = 0;
  virtual Result<ArenaExport> DoExportArena(uint32_t device, DevicePtr base, uint64_t bytes) = 0;
  virtual Result<uint8_t*> DoAllocateStaging(uint64_t bytes) = 0;
  virtual Status DoFreeStaging(uint8_t* data, uint64_t bytes) = 0;
  virtual Status DoRegisterHost(void* data, uint64_t bytes) = 0;
  // Waits for every queued copy first.
  virtual Status DoUnregisterHost(void* data, uint64_t bytes) = 0;
  virtual Status DoCreateStream(StreamId stream, uint32_t device) = 0;
  virtual Status DoDestroyStream(StreamId stream) = 0;
  virtual Status DoCopyToDevice(StreamId stream, std::span<const HostToDevice> batch) = 0;
  virtual Status DoCopyToHost(StreamId stream, std::span<const DeviceToHost> batch) = 0;
  virtual Status DoCopyOnDevice(StreamId stream, DevicePtr src, DevicePtr dst, uint64_t bytes) = 0;
  // Records fence number `seq` (1, 2, ... per stream) on the stream.
  virtual Status DoRecordFence(StreamId stream, uint64_t seq) = 0;
  virtual Result<bool> DoIsDone(StreamId stream, uint64_t seq) = 0;
  virtual Status DoWait(StreamId stream, uint64_t seq) = 0;
  // By default polls DoIsDone, sleeping 50 us between polls.
  virtual Result<bool> DoWaitFor(StreamId stream, uint64_t seq, std::chrono::microseconds timeout);

  // True when [p, p + bytes) lies in a registered range.
  bool IsRegistered(const void* p, uint64_t bytes) const;

  // Destroys every stream, frees every arena and staging buffer and
  // unregisters every host range still held. Each implementation's destructor calls it first, while its Do*
  // functions can still run.
  void ReleaseAll();

 private:
  struct ArenaInfo {
    uint32_t device;
    uint64_t bytes;
  };
  struct StreamInfo {
    uint32_t device;
    uint64_t fences_recorded;
  };

  Status CheckDevice(uint32_t device) const;
  Result<StreamInfo*> FindStream(StreamId stream);
  Status CheckFence(const Fence& fence);
  Status CheckDeviceRange(uint32_t device, DevicePtr p, uint64_t bytes) const;
  Status CheckHostRange(const void* p, uint64_t bytes) const;

  const uint32_t device_count_;
  std::map<DevicePtr, ArenaInfo> arenas_;  // by base
  std::map<uintptr_t, uint64_t> staging_;  // base address -> bytes
  std::map<uintptr_t, uint64_t> registered_;  // base address -> bytes
  uint64_t registered_bytes_ = 0;
  std::unordered_map<uint64_t, StreamInfo> streams_;
  std::vector<uint64_t> arena_bytes_;  // per device
  uint64_t next_stream_ = 1;
};

// The backend called `name` ("emulated" or "cuda"). Errors: kInvalidArgument
// (unknown name; for "emulated", 0 devices, 0 bytes or a 0 queue depth),
// kUnavailable ("cuda" in a binary built without CUDA, or no GPU or driver
// present).
Result<std::unique_ptr<DeviceBackend>> MakeDeviceBackend(std::string_view name,
                                                         const DeviceBackendOptions& options = {});

// True when this binary was built with the cuda backend.
bool CudaBackendBuilt();

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_DEVICE_BACKEND_H_
