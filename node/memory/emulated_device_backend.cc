#include "node/memory/emulated_device_backend.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dsvm::node {
namespace {

// Arenas are 2 MiB aligned (like large cudaMalloc blocks in practice), so a
// 2 MiB slot is aligned too and the host may back it with a huge page.
constexpr uint64_t kEmulatedArenaAlignment = 2u << 20;
constexpr uint64_t kStagingAlignment = 4096;

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// One stream: a bounded FIFO of copies and fence marks, executed in order by
// the stream's own copy thread.
//
// Locking: mu_ is a leaf lock; nothing else is taken while it is held, and
// no copy runs under it.
class EmulatedStream {
 public:
  EmulatedStream(uint32_t device, uint32_t depth, std::chrono::microseconds delay)
      : device_(device), depth_(depth), delay_(delay), thread_([this] { Run(); }) {}

  // Lets the copy thread finish what is queued, then joins it.
  ~EmulatedStream() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    work_.notify_one();
    thread_.join();
  }

  uint32_t device() const { return device_; }

  void PushCopy(uint8_t* dst, const uint8_t* src, uint64_t bytes) { Push({dst, src, bytes, 0}); }
  void PushFence(uint64_t seq) { Push({nullptr, nullptr, 0, seq}); }

  bool Done(uint64_t seq) {
    std::lock_guard<std::mutex> l(mu_);
    return fences_done_ >= seq;
  }

  void WaitFor(uint64_t seq) {
    std::unique_lock<std::mutex> l(mu_);
    progress_.wait(l, [&] { return fences_done_ >= seq; });
  }

  bool WaitFor(uint64_t seq, std::chrono::microseconds timeout) {
    std::unique_lock<std::mutex> l(mu_);
    return progress_.wait_for(l, timeout, [&] { return fences_done_ >= seq; });
  }

  // Returns once every queued entry has been executed.
  void Drain() {
    std::unique_lock<std::mutex> l(mu_);
    progress_.wait(l, [&] { return queue_.empty(); });
  }

 private:
  // A copy (fence == 0) or the mark of fence number `fence`.
  struct Entry {
    uint8_t* dst;
    const uint8_t* src;
    uint64_t bytes;
    uint64_t fence;
  };

  // Blocks while the queue holds depth_ entries.
  void Push(Entry e) {
    {
      std::unique_lock<std::mutex> l(mu_);
      progress_.wait(l, [&] { return queue_.size() < depth_; });
      queue_.push_back(e);
      DSVM_CHECK(queue_.size() <= depth_);
    }
    work_.notify_one();
  }

  void Run() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      work_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopped, and nothing left to do
      // The entry stays queued while it runs, so Drain() waits for it.
      const Entry e = queue_.front();
      if (e.fence == 0) {
        l.unlock();
        if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
        std::memmove(e.dst, e.src, e.bytes);
        l.lock();
      } else {
        fences_done_ = e.fence;
      }
      queue_.pop_front();
      progress_.notify_all();
    }
  }

  const uint32_t device_;
  const uint32_t depth_;
  const std::chrono::microseconds delay_;
  std::mutex mu_;
  std::condition_variable work_;      // the copy thread waits for entries
  std::condition_variable progress_;  // the owner waits for room, fences, drain
  std::deque<Entry> queue_;           // GUARDED_BY(mu_)
  uint64_t fences_done_ = 0;          // GUARDED_BY(mu_)
  bool stop_ = false;                 // GUARDED_BY(mu_)
  std::thread thread_;                // last: starts after the fields above
};

class EmulatedDeviceBackend final : public DeviceBackend {
 public:
  explicit EmulatedDeviceBackend(const DeviceBackendOptions& options)
      : DeviceBackend(options.emulated_devices), options_(options) {}
  ~EmulatedDeviceBackend() override { ReleaseAll(); }

  std::string_view name() const override { return "emulated"; }

 protected:
  Result<DevicePtr> DoAllocateArena(uint32_t device, uint64_t bytes) override {
    const uint64_t used = arena_bytes(device);
    const uint64_t capacity = options_.emulated_device_bytes;
    if (bytes > capacity - used) {
      return ResourceExhausted("emulated device " + std::to_string(device) +
                               " is out of memory: " + std::to_string(bytes) + " bytes asked, " +
                               std::to_string(capacity - used) + " of " + std::to_string(capacity) +
                               " free");
    }
    // A memfd, so that a client process can map the arena too (ExportArena:
    // the emulated counterpart of cudaIpcGetMemHandle), mapped at a 2 MiB
    // aligned address: reserve more, then map the memfd over the aligned part.
    const int fd = ::memfd_create("dsvm-emulated-arena", MFD_CLOEXEC);
    if (fd < 0) return IoError(std::string("memfd_create: ") + std::strerror(errno));
    auto fail = [&](const char* what) {
      const int e = errno;
      ::close(fd);
      return ResourceExhausted("emulated device " + std::to_string(device) + ": " + what +
                               " for an arena of " + std::to_string(bytes) +
                               " bytes: " + std::strerror(e));
    };
    if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate");
    const uint64_t reserve = bytes + kEmulatedArenaAlignment;
    void* r = ::mmap(nullptr, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) return fail("mmap");
    const uintptr_t start = reinterpret_cast<uintptr_t>(r);
    const uintptr_t aligned = RoundUp(start, kEmulatedArenaAlignment);
    void* p = ::mmap(reinterpret_cast<void*>(aligned), bytes, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_FIXED, fd, 0);
    if (p == MAP_FAILED) {
      ::munmap(r, reserve);
      return fail("mmap of the memfd");
    }
    if (aligned > start) ::munmap(r, aligned - start);
    const uintptr_t end = aligned + bytes;
    if (start + reserve > end) ::munmap(reinterpret_cast<void*>(end), start + reserve - end);
    fds_[aligned] = fd;
    return static_cast<DevicePtr>(aligned);
  }

  Status DoFreeArena(uint32_t device, DevicePtr base, uint64_t bytes) override {
    for (auto& [id, s] : streams_) {
      if (s->device() == device) s->Drain();
    }
    ::munmap(reinterpret_cast<void*>(base), bytes);
    auto it = fds_.find(base);
    if (it != fds_.end()) {
      ::close(it->second);
      fds_.erase(it);
    }
    return Status::Ok();
  }

  Result<ArenaExport> DoExportArena(uint32_t, DevicePtr base, uint64_t) override {
    ArenaExport e;
    e.fd = fds_.at(base);
    return e;
  }

  Result<uint8_t*> DoAllocateStaging(uint64_t bytes) override {
    void* p = std::aligned_alloc(kStagingAlignment, RoundUp(bytes, kStagingAlignment));
    if (p == nullptr) {
      return ResourceExhausted("no host memory for a staging buffer of " + std::to_string(bytes) +
                               " bytes");
    }
    return static_cast<uint8_t*>(p);
  }

  Status DoFreeStaging(uint8_t* data, uint64_t bytes) override {
    for (auto& [id, s] : streams_) s->Drain();
    std::free(data);
    return Status::Ok();
  }

  // What cuda would get wrong without a word: registered host memory whose
  // pages left it (a punch in a memfd while registered; the GPU would copy
  // the old, pinned pages). Here the copy goes through the address, which
  // would hide that, so it is refused (kInternal: a bug of the caller).
  Status CheckStillThere(const void* p, uint64_t bytes) const {
    if (!IsRegistered(p, bytes)) return Status::Ok();
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t first = reinterpret_cast<uintptr_t>(p) / page * page;
    const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
    std::vector<unsigned char> vec((end - first + page - 1) / page);
    if (mincore(reinterpret_cast<void*>(first), end - first, vec.data()) != 0) {
      return Internal(std::string("emulated: mincore of registered host memory: ") +
                      std::strerror(errno));
    }
    for (unsigned char v : vec) {
      if ((v & 1) == 0) {
        return Internal("emulated: registered host memory at " +
                        std::to_string(reinterpret_cast<uintptr_t>(p)) +
                        " has pages no longer in memory: they left while registered");
      }
    }
    return Status::Ok();
  }

  // Host memory needs no pinning here; the base class keeps the ranges, so
  // the rules on them are the same as cuda's.
  Status DoRegisterHost(void*, uint64_t) override { return Status::Ok(); }

  Status DoUnregisterHost(void*, uint64_t) override {
    for (auto& [id, s] : streams_) s->Drain();  // as DoFreeStaging
    return Status::Ok();
  }

  Status DoCreateStream(StreamId stream, uint32_t device) override {
    streams_.emplace(stream.value,
                     std::make_unique<EmulatedStream>(device, options_.emulated_queue_depth,
                                                      options_.emulated_copy_delay));
    return Status::Ok();
  }

  Status DoDestroyStream(StreamId stream) override {
    streams_.erase(stream.value);  // the destructor drains and joins
    return Status::Ok();
  }

  Status DoCopyToDevice(StreamId stream, std::span<const HostToDevice> batch) override {
    for (const HostToDevice& c : batch) DSVM_RETURN_IF_ERROR(CheckStillThere(c.src, c.bytes));
    EmulatedStream& s = *streams_.at(stream.value);
    for (const HostToDevice& c : batch) {
      s.PushCopy(reinterpret_cast<uint8_t*>(c.dst), static_cast<const uint8_t*>(c.src), c.bytes);
    }
    return Status::Ok();
  }

  Status DoCopyToHost(StreamId stream, std::span<const DeviceToHost> batch) override {
    for (const DeviceToHost& c : batch) DSVM_RETURN_IF_ERROR(CheckStillThere(c.dst, c.bytes));
    EmulatedStream& s = *streams_.at(stream.value);
    for (const DeviceToHost& c : batch) {
      s.PushCopy(static_cast<uint8_t*>(c.dst), reinterpret_cast<const uint8_t*>(c.src), c.bytes);
    }
    return Status::Ok();
  }

  Status DoCopyOnDevice(StreamId stream, DevicePtr src, DevicePtr dst, uint64_t bytes) override {
    streams_.at(stream.value)
        ->PushCopy(reinterpret_cast<uint8_t*>(dst), reinterpret_cast<const uint8_t*>(src), bytes);
    return Status::Ok();
  }

  Status DoRecordFence(StreamId stream, uint64_t seq) override {
    streams_.at(stream.value)->PushFence(seq);
    return Status::Ok();
  }

  Result<bool> DoIsDone(StreamId stream, uint64_t seq) override {
    return streams_.at(stream.value)->Done(seq);
  }

  Status DoWait(StreamId stream, uint64_t seq) override {
    streams_.at(stream.value)->WaitFor(seq);
    return Status::Ok();
  }

  Result<bool> DoWaitFor(StreamId stream, uint64_t seq,
                         std::chrono::microseconds timeout) override {
    return streams_.at(stream.value)->WaitFor(seq, timeout);
  }

 private:
  const DeviceBackendOptions options_;
  std::unordered_map<uint64_t, std::unique_ptr<EmulatedStream>> streams_;
  std::unordered_map<DevicePtr, int> fds_;  // arena base -> its memfd
};

}  // namespace

Result<std::unique_ptr<DeviceBackend>> CreateEmulatedDeviceBackend(
    const DeviceBackendOptions& options) {
  if (options.emulated_devices == 0) return InvalidArgument("emulated backend with 0 devices");
  if (options.emulated_device_bytes == 0) {
    return InvalidArgument("emulated devices of 0 bytes");
  }
  if (options.emulated_queue_depth == 0) {
    return InvalidArgument("emulated stream queue depth of 0");
  }
  return std::unique_ptr<DeviceBackend>(new EmulatedDeviceBackend(options));
}

}  // namespace dsvm::node
