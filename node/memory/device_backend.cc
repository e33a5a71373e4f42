#include "node/memory/device_backend.h"

#include <chrono>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "node/memory/cuda_device_backend.h"
#include "node/memory/emulated_device_backend.h"
#include "proto/text.h"

namespace dsvm::node {
namespace {

std::string Range(uint64_t base, uint64_t bytes) {
  return "[" + Hex(base) + ", " + Hex(base + bytes) + ")";
}

// Host ranges by base -> bytes (staging buffers, registrations).
using HostRanges = std::map<uintptr_t, uint64_t>;

// The range of `ranges` that holds address a; end() when none does.
HostRanges::const_iterator Holding(const HostRanges& ranges, uintptr_t a) {
  auto it = ranges.upper_bound(a);
  if (it == ranges.begin()) return ranges.end();
  --it;
  return a - it->first < it->second ? it : ranges.end();
}

// True when [a, a + bytes) overlaps a range of `ranges`.
bool Overlaps(const HostRanges& ranges, uintptr_t a, uint64_t bytes) {
  auto it = ranges.lower_bound(a + bytes);  // the first range starting at or past the end
  if (it == ranges.begin()) return false;
  --it;
  return it->first + it->second > a;
}

}  // namespace

DeviceBackend::DeviceBackend(uint32_t device_count)
    : device_count_(device_count), arena_bytes_(device_count, 0) {}

DeviceBackend::~DeviceBackend() {
  // An implementation that forgot ReleaseAll() would leak device memory.
  DSVM_CHECK_MSG(arenas_.empty() && staging_.empty() && streams_.empty() && registered_.empty(),
                 "a DeviceBackend implementation's destructor must call ReleaseAll()");
}

void DeviceBackend::ReleaseAll() {
  // Streams first: their queued copies may still use arenas and buffers.
  while (!streams_.empty()) {
    DestroyStream(StreamId{streams_.begin()->first}).IgnoreError();
    // DestroyStream forgets the stream even when the device reports an error.
  }
  while (!arenas_.empty()) FreeArena(arenas_.begin()->first).IgnoreError();
  while (!staging_.empty()) {
    FreeStaging(reinterpret_cast<const void*>(staging_.begin()->first)).IgnoreError();
  }
  while (!registered_.empty()) {
    UnregisterHost(reinterpret_cast<const void*>(registered_.begin()->first)).IgnoreError();
  }
}

uint64_t DeviceBackend::arena_bytes(uint32_t device) const {
  DSVM_CHECK(device < device_count_);
  return arena_bytes_[device];
}

Status DeviceBackend::CheckDevice(uint32_t device) const {
  if (device >= device_count_) {
    return InvalidArgument("device " + std::to_string(device) + " does not exist: the " +
                           std::string(name()) + " backend has " + std::to_string(device_count_) +
                           " device(s)");
  }
  return Status::Ok();
}

Result<DeviceBackend::StreamInfo*> DeviceBackend::FindStream(StreamId stream) {
  auto it = streams_.find(stream.value);
  if (it == streams_.end()) {
    return InvalidArgument("stream " + std::to_string(stream.value) + " does not exist");
  }
  return &it->second;
}

Status DeviceBackend::CheckFence(const Fence& fence) {
  DSVM_ASSIGN_OR_RETURN(StreamInfo * info, FindStream(fence.stream));
  if (fence.seq == 0 || fence.seq > info->fences_recorded) {
    return InvalidArgument("fence " + std::to_string(fence.seq) + " was never recorded on stream " +
                           std::to_string(fence.stream.value) + " (" +
                           std::to_string(info->fences_recorded) + " recorded)");
  }
  return Status::Ok();
}

Status DeviceBackend::CheckDeviceRange(uint32_t device, DevicePtr p, uint64_t bytes) const {
  if (bytes == 0) return InvalidArgument("copy of 0 bytes at device address " + Hex(p));
  auto it = arenas_.upper_bound(p);
  if (it == arenas_.begin()) return InvalidArgument("device address " + Hex(p) + " is in no arena");
  --it;
  const DevicePtr base = it->first;
  const ArenaInfo& arena = it->second;
  const uint64_t offset = p - base;
  if (offset >= arena.bytes) {
    return InvalidArgument("device address " + Hex(p) + " is in no arena");
  }
  if (bytes > arena.bytes - offset) {
    return InvalidArgument("device range " + Range(p, bytes) + " runs past the end of arena " +
                           Range(base, arena.bytes));
  }
  if (arena.device != device) {
    return InvalidArgument("device range " + Range(p, bytes) + " is on device " +
                           std::to_string(arena.device) + ", the stream on device " +
                           std::to_string(device));
  }
  return Status::Ok();
}

Status DeviceBackend::CheckHostRange(const void* p, uint64_t bytes) const {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (p == nullptr) return InvalidArgument("null host pointer");
  if (bytes == 0) return InvalidArgument("copy of 0 bytes at host address " + Hex(a));
  if (bytes > UINTPTR_MAX - a) {
    return InvalidArgument("host range of " + std::to_string(bytes) + " bytes at " + Hex(a) +
                           " wraps around");
  }
  // A copy that starts in pinned memory must end there: the driver treats
  // the whole copy as one or the other.
  auto runs_past = [&](const HostRanges& ranges, const char* what) {
    auto it = Holding(ranges, a);
    if (it != ranges.end() && bytes > it->second - (a - it->first)) {
      return InvalidArgument("host range " + Range(a, bytes) + " runs past the end of " + what +
                             " " + Range(it->first, it->second));
    }
    return Status::Ok();
  };
  DSVM_RETURN_IF_ERROR(runs_past(staging_, "staging buffer"));
  return runs_past(registered_, "registered range");
}

Status DeviceBackend::RegisterHost(void* data, uint64_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(data);
  if (data == nullptr) return InvalidArgument("registration of a null host pointer");
  if (bytes == 0 || a % 4096 != 0 || bytes % 4096 != 0 || bytes > UINTPTR_MAX - a) {
    return InvalidArgument("host range of " + std::to_string(bytes) + " bytes at " + Hex(a) +
                           " is not whole 4 KiB pages");
  }
  if (Overlaps(staging_, a, bytes) || Overlaps(registered_, a, bytes)) {
    return InvalidArgument("host range " + Range(a, bytes) +
                           " overlaps a staging buffer or a registered range");
  }
  DSVM_RETURN_IF_ERROR(DoRegisterHost(data, bytes));
  registered_.emplace(a, bytes);
  registered_bytes_ += bytes;
  return Status::Ok();
}

bool DeviceBackend::IsRegistered(const void* p, uint64_t bytes) const {
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto it = Holding(registered_, a);
  return it != registered_.end() && bytes <= it->second - (a - it->first);
}

Status DeviceBackend::UnregisterHost(const void* data) {
  auto it = registered_.find(reinterpret_cast<uintptr_t>(data));
  if (it == registered_.end()) {
    return InvalidArgument("no registered host range starts at " +
                           Hex(reinterpret_cast<uintptr_t>(data)));
  }
  const uint64_t bytes = it->second;
  registered_.erase(it);
  registered_bytes_ -= bytes;
  return DoUnregisterHost(const_cast<void*>(data), bytes);
}

Result<DeviceArena> DeviceBackend::AllocateArena(uint32_t device, uint64_t bytes) {
  DSVM_RETURN_IF_ERROR(CheckDevice(device));
  if (bytes == 0 || bytes % kArenaGranularity != 0) {
    return InvalidArgument("arena size " + std::to_string(bytes) +
                           " is not a positive multiple of " + std::to_string(kArenaGranularity));
  }
  DSVM_ASSIGN_OR_RETURN(DevicePtr base, DoAllocateArena(device, bytes));
  DSVM_CHECK(base % kArenaAlignment == 0);
  arenas_.emplace(base, ArenaInfo{device, bytes});
  arena_bytes_[device] += bytes;
  return DeviceArena{device, base, bytes};
}

Status DeviceBackend::FreeArena(DevicePtr base) {
  auto it = arenas_.find(base);
  if (it == arenas_.end()) return InvalidArgument("no arena starts at device address " + Hex(base));
  const ArenaInfo arena = it->second;
  arenas_.erase(it);
  arena_bytes_[arena.device] -= arena.bytes;
  return DoFreeArena(arena.device, base, arena.bytes);
}

Result<ArenaExport> DeviceBackend::ExportArena(DevicePtr base) {
  auto it = arenas_.find(base);
  if (it == arenas_.end()) return InvalidArgument("no arena starts at device address " + Hex(base));
  return DoExportArena(it->second.device, base, it->second.bytes);
}

Result<StagingBuffer> DeviceBackend::AllocateStaging(uint64_t bytes) {
  if (bytes == 0) return InvalidArgument("staging buffer of 0 bytes");
  DSVM_ASSIGN_OR_RETURN(uint8_t * data, DoAllocateStaging(bytes));
  staging_.emplace(reinterpret_cast<uintptr_t>(data), bytes);
  return StagingBuffer{data, bytes};
}

Status DeviceBackend::FreeStaging(const void* data) {
  auto it = staging_.find(reinterpret_cast<uintptr_t>(data));
  if (it == staging_.end()) {
    return InvalidArgument("no staging buffer starts at host address " +
                           Hex(reinterpret_cast<uintptr_t>(data)));
  }
  const uint64_t bytes = it->second;
  staging_.erase(it);
  return DoFreeStaging(const_cast<uint8_t*>(static_cast<const uint8_t*>(data)), bytes);
}

Result<StreamId> DeviceBackend::CreateStream(uint32_t device) {
  DSVM_RETURN_IF_ERROR(CheckDevice(device));
  const StreamId id{next_stream_++};
  DSVM_RETURN_IF_ERROR(DoCreateStream(id, device));
  streams_.emplace(id.value, StreamInfo{device, 0});
  return id;
}

Status DeviceBackend::DestroyStream(StreamId stream) {
  DSVM_RETURN_IF_ERROR(FindStream(stream).status());
  streams_.erase(stream.value);
  return DoDestroyStream(stream);
}

Status DeviceBackend::CopyToDevice(StreamId stream, std::span<const HostToDevice> batch) {
  DSVM_ASSIGN_OR_RETURN(StreamInfo * info, FindStream(stream));
  for (const HostToDevice& c : batch) {
    DSVM_RETURN_IF_ERROR(CheckHostRange(c.src, c.bytes));
    DSVM_RETURN_IF_ERROR(CheckDeviceRange(info->device, c.dst, c.bytes));
  }
  if (batch.empty()) return Status::Ok();
  return DoCopyToDevice(stream, batch);
}

Status DeviceBackend::CopyToHost(StreamId stream, std::span<const DeviceToHost> batch) {
  DSVM_ASSIGN_OR_RETURN(StreamInfo * info, FindStream(stream));
  for (const DeviceToHost& c : batch) {
    DSVM_RETURN_IF_ERROR(CheckDeviceRange(info->device, c.src, c.bytes));
    DSVM_RETURN_IF_ERROR(CheckHostRange(c.dst, c.bytes));
  }
  if (batch.empty()) return Status::Ok();
  return DoCopyToHost(stream, batch);
}

Status DeviceBackend::CopyOnDevice(StreamId stream, DevicePtr src, DevicePtr dst, uint64_t bytes) {
  DSVM_ASSIGN_OR_RETURN(StreamInfo * info, FindStream(stream));
  DSVM_RETURN_IF_ERROR(CheckDeviceRange(info->device, src, bytes));
  DSVM_RETURN_IF_ERROR(CheckDeviceRange(info->device, dst, bytes));
  if (src < dst + bytes && dst < src + bytes) {
    return InvalidArgument("device backend: a copy on the device between overlapping ranges");
  }
  return DoCopyOnDevice(stream, src, dst, bytes);
}

Result<Fence> DeviceBackend::RecordFence(StreamId stream) {
  DSVM_ASSIGN_OR_RETURN(StreamInfo * info, FindStream(stream));
  const uint64_t seq = info->fences_recorded + 1;
  DSVM_RETURN_IF_ERROR(DoRecordFence(stream, seq));
  info->fences_recorded = seq;
  return Fence{stream, seq};
}

Result<bool> DeviceBackend::IsDone(const Fence& fence) {
  DSVM_RETURN_IF_ERROR(CheckFence(fence));
  return DoIsDone(fence.stream, fence.seq);
}

Status DeviceBackend::Wait(const Fence& fence) {
  DSVM_RETURN_IF_ERROR(CheckFence(fence));
  return DoWait(fence.stream, fence.seq);
}

Result<bool> DeviceBackend::WaitFor(const Fence& fence, std::chrono::microseconds timeout) {
  DSVM_RETURN_IF_ERROR(CheckFence(fence));
  return DoWaitFor(fence.stream, fence.seq, timeout);
}

Result<bool> DeviceBackend::DoWaitFor(StreamId stream, uint64_t seq,
                                      std::chrono::microseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    DSVM_ASSIGN_OR_RETURN(const bool done, DoIsDone(stream, seq));
    if (done || std::chrono::steady_clock::now() >= until) return done;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

bool CudaBackendBuilt() {
#ifdef DSVM_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

Result<std::unique_ptr<DeviceBackend>> MakeDeviceBackend(std::string_view name,
                                                         const DeviceBackendOptions& options) {
  if (name == "emulated") return CreateEmulatedDeviceBackend(options);
  if (name == "cuda") {
#ifdef DSVM_HAVE_CUDA
    return CreateCudaDeviceBackend(options);
#else
    return Unavailable(
        "device backend \"cuda\" is not available: this binary was built without CUDA "
        "(configure with -DDSVM_WITH_CUDA=ON or auto on a machine with the CUDA toolkit)");
#endif
  }
  return InvalidArgument("unknown device backend \"" + std::string(name) +
                         "\" (known: emulated, cuda)");
}

}  // namespace dsvm::node
