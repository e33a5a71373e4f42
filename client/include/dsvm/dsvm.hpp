// libdsvm's C++ API: a thin, header-only RAII layer over dsvm.h.
//
//   auto client = dsvm::Client::Init();           // dsvm_init(NULL)
//   if (!client) { std::cerr << client.error().ToString(); ... }
//   auto grid = dsvm::Region::Create("grid", n * sizeof(double));
//   if (!grid) ...
//   double* g = grid->as<double>();               // same address on every node
//   ...                                           // ~Region closes, ~Client finalizes
//
// Errors are values, never exceptions: a call returns dsvm::Expected<T>, a
// T or the dsvm::Error (DSVM_E* code and message) that explains why not.
// Taking the value of a failed Expected is a programmer error and aborts.
//
// Lifetimes: a Region must not outlive the Client (dsvm_finalize closes
// every region; a Region destroyed after that does nothing). Threads and
// fork(): as dsvm.h says. Needs C++17.
#ifndef DSVM_DSVM_HPP_
#define DSVM_DSVM_HPP_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include "dsvm.h"

namespace dsvm {

// A DSVM_E* code and what dsvm_last_error() said about it.
struct Error {
  int code = DSVM_OK;
  std::string message;

  const char* code_name() const { return dsvm_strerror(code); }
  // "invalid argument: dsvm_region_create('x'): size is 0"
  std::string ToString() const { return std::string(dsvm_strerror(code)) + ": " + message; }

  // The calling thread's last error, after a dsvm_ call returned `code`.
  static Error Last(int code) { return Error{code, dsvm_last_error()}; }
};

namespace detail {
[[noreturn]] inline void BadAccess(const Error& e) {
  std::fprintf(stderr, "dsvm: value of a failed dsvm::Expected: %s\n", e.ToString().c_str());
  std::abort();
}
}  // namespace detail

// A T, or the Error that explains why there is none.
template <typename T>
class [[nodiscard]] Expected {
 public:
  Expected(T value) : value_(std::move(value)) {}      // NOLINT: implicit by design
  Expected(Error error) : error_(std::move(error)) {}  // NOLINT: implicit by design

  bool ok() const { return value_.has_value(); }
  explicit operator bool() const { return ok(); }
  // REQUIRES: !ok(). Empty Error (DSVM_OK) when ok().
  const Error& error() const { return error_; }

  // REQUIRES: ok(); aborts otherwise.
  T& value() & { return Get(); }
  const T& value() const& { return const_cast<Expected*>(this)->Get(); }
  T&& value() && { return std::move(Get()); }
  T* operator->() { return &Get(); }
  const T* operator->() const { return &const_cast<Expected*>(this)->Get(); }
  T& operator*() & { return Get(); }
  const T& operator*() const& { return const_cast<Expected*>(this)->Get(); }

  // Marks a result as deliberately ignored.
  void IgnoreError() const {}

 private:
  T& Get() {
    if (!value_) detail::BadAccess(error_);
    return *value_;
  }
  std::optional<T> value_;
  Error error_;
};

// Success, or the Error.
template <>
class [[nodiscard]] Expected<void> {
 public:
  Expected() = default;
  Expected(Error error) : error_(std::move(error)) {}  // NOLINT: implicit by design
  // 0 is success; anything else is the calling thread's last error.
  static Expected FromCode(int code) {
    if (code == DSVM_OK) return Expected();
    return Expected(Error::Last(code));
  }

  bool ok() const { return error_.code == DSVM_OK; }
  explicit operator bool() const { return ok(); }
  const Error& error() const { return error_; }
  void IgnoreError() const {}

 private:
  Error error_;
};

// This process's connection to its node daemon (dsvm_init / dsvm_finalize).
// One per process at a time. Move-only.
class Client {
 public:
  // dsvm_init(socket_path): nullptr means $DSVM_SOCKET, then
  // DSVM_DEFAULT_SOCKET. Errors: those of dsvm_init.
  static Expected<Client> Init(const char* socket_path = nullptr) {
    if (int rc = dsvm_init(socket_path); rc != DSVM_OK) return Error::Last(rc);
    return Client(true);
  }
  static Expected<Client> Init(const std::string& socket_path) { return Init(socket_path.c_str()); }

  Client() = default;  // not connected
  Client(Client&& other) noexcept : active_(std::exchange(other.active_, false)) {}
  Client& operator=(Client&& other) noexcept {
    if (this != &other) {
      Finalize().IgnoreError();
      active_ = std::exchange(other.active_, false);
    }
    return *this;
  }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client() { Finalize().IgnoreError(); }

  bool connected() const { return active_; }

  // dsvm_finalize: closes every open region, then the connection. Does
  // nothing on a Client that is not connected.
  Expected<void> Finalize() {
    if (!std::exchange(active_, false)) return {};
    return Expected<void>::FromCode(dsvm_finalize());
  }

  // dsvm_node_id. Errors: DSVM_ENOT_INITIALIZED.
  Expected<uint32_t> NodeId() const {
    uint32_t id = 0;
    if (int rc = dsvm_node_id(&id); rc != DSVM_OK) return Error::Last(rc);
    return id;
  }

  // dsvm_stats: the counters of this process's node. Errors: those of
  // dsvm_stats.
  Expected<dsvm_node_stats_t> Stats() const {
    dsvm_node_stats_t s{};
    if (int rc = dsvm_stats(&s); rc != DSVM_OK) return Error::Last(rc);
    return s;
  }

 private:
  explicit Client(bool active) : active_(active) {}
  bool active_ = false;
};

// A region mapped in this process; closed (dsvm_region_close) when
// destroyed. Move-only.
class Region {
 public:
  // dsvm_region_create. page_size 0 means 4096. Errors: those of
  // dsvm_region_create.
  static Expected<Region> Create(const std::string& name, size_t size, size_t page_size = 0) {
    void* addr = nullptr;
    if (int rc = dsvm_region_create(name.c_str(), size, page_size, &addr); rc != DSVM_OK) {
      return Error::Last(rc);
    }
    return Region(name, addr, size);
  }

  // dsvm_region_create_attr: with who may open it (mode, token).
  static Expected<Region> Create(const std::string& name, size_t size,
                                 const dsvm_region_attr_t& attr) {
    void* addr = nullptr;
    if (int rc = dsvm_region_create_attr(name.c_str(), size, &attr, &addr); rc != DSVM_OK) {
      return Error::Last(rc);
    }
    return Region(name, addr, size);
  }

  // dsvm_region_open. Errors: those of dsvm_region_open.
  static Expected<Region> Open(const std::string& name) {
    void* addr = nullptr;
    size_t size = 0;
    if (int rc = dsvm_region_open(name.c_str(), &addr, &size); rc != DSVM_OK) {
      return Error::Last(rc);
    }
    return Region(name, addr, size);
  }

  // dsvm_region_open_token: presenting the region's token.
  static Expected<Region> Open(const std::string& name, const std::string& token) {
    void* addr = nullptr;
    size_t size = 0;
    if (int rc = dsvm_region_open_token(name.c_str(), token.c_str(), &addr, &size);
        rc != DSVM_OK) {
      return Error::Last(rc);
    }
    return Region(name, addr, size);
  }

  // dsvm_region_destroy: deletes region `name` in the whole cluster.
  static Expected<void> Destroy(const std::string& name) {
    return Expected<void>::FromCode(dsvm_region_destroy(name.c_str()));
  }

  Region() = default;  // holds nothing
  Region(Region&& other) noexcept
      : name_(std::move(other.name_)),
        data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)) {}
  Region& operator=(Region&& other) noexcept {
    if (this != &other) {
      Close().IgnoreError();
      name_ = std::move(other.name_);
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  ~Region() { Close().IgnoreError(); }

  // The region's address (the same on every node); nullptr once closed.
  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  // Bytes usable from data(): the size asked for (Create) or the region's
  // size (Open); 0 once closed.
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  bool is_open() const { return data_ != nullptr; }

  // dsvm_prefetch of `len` bytes from `offset` (DSVM_PREFETCH_WRITE in
  // flags: for writing). Errors: those of dsvm_prefetch.
  Expected<void> Prefetch(size_t offset, size_t len, unsigned flags = 0) const {
    return Expected<void>::FromCode(dsvm_prefetch(static_cast<char*>(data_) + offset, len, flags));
  }

  // dsvm_gpu_map of `len` bytes from `offset` on `gpu` (mode DSVM_GPU_READ
  // or DSVM_GPU_WRITE): the device pointer. End it with GpuUnmap, or hold a
  // GpuMapping. Errors: those of dsvm_gpu_map.
  Expected<void*> GpuMap(size_t offset, size_t len, int gpu, unsigned mode) const {
    void* p = nullptr;
    if (int rc = dsvm_gpu_map(static_cast<char*>(data_) + offset, len, gpu, mode, &p); rc != DSVM_OK) {
      return Error::Last(rc);
    }
    return p;
  }
  // dsvm_gpu_prefetch of `len` bytes from `offset` to `gpu`
  // (DSVM_PREFETCH_WRITE in flags: for writing). Errors: those of
  // dsvm_gpu_prefetch.
  Expected<void> GpuPrefetch(size_t offset, size_t len, int gpu, unsigned flags = 0) const {
    return Expected<void>::FromCode(
        dsvm_gpu_prefetch(static_cast<char*>(data_) + offset, len, gpu, flags));
  }
  // dsvm_gpu_unmap of the map of `len` bytes from `offset`.
  Expected<void> GpuUnmap(size_t offset, size_t len) const {
    return Expected<void>::FromCode(dsvm_gpu_unmap(static_cast<char*>(data_) + offset, len));
  }

  // dsvm_advise for `len` bytes from `offset`. Errors: those of dsvm_advise.
  Expected<void> Advise(size_t offset, size_t len, int advice, uint32_t node = 0) const {
    return Expected<void>::FromCode(
        dsvm_advise(static_cast<char*>(data_) + offset, len, advice, node));
  }

  // dsvm_region_close. The region is released whatever the result (see
  // dsvm.h); does nothing on a Region that holds nothing.
  Expected<void> Close() {
    void* addr = std::exchange(data_, nullptr);
    size_ = 0;
    if (addr == nullptr) return {};
    return Expected<void>::FromCode(dsvm_region_close(addr));
  }

 private:
  Region(std::string name, void* data, size_t size)
      : name_(std::move(name)), data_(data), size_(size) {}

  std::string name_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Holds a dsvm_lock_t (which lives in region memory) for its lifetime:
//
//   auto held = dsvm::LockGuard::Acquire(&shared->lock);
//   if (!held) ...held.error()...
//   ...                                   // released when `held` goes
//
// Move-only. Errors: those of dsvm_lock_acquire.
// A dsvm_gpu_map held for a scope: unmapped when destroyed.
//
//   auto m = dsvm::GpuMapping::Map(grid->data(), bytes, 0, DSVM_GPU_WRITE);
//   if (!m) ...; launch(static_cast<double*>(m->device_ptr()));
class GpuMapping {
 public:
  // Errors: those of dsvm_gpu_map.
  static Expected<GpuMapping> Map(const void* addr, size_t len, int gpu, unsigned mode) {
    void* p = nullptr;
    if (int rc = dsvm_gpu_map(addr, len, gpu, mode, &p); rc != DSVM_OK) return Error::Last(rc);
    return GpuMapping(addr, len, p);
  }
  GpuMapping(GpuMapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), len_(o.len_), device_(o.device_) {}
  GpuMapping& operator=(GpuMapping&& o) noexcept {
    if (this != &o) {
      Unmap().IgnoreError();
      addr_ = std::exchange(o.addr_, nullptr);
      len_ = o.len_;
      device_ = o.device_;
    }
    return *this;
  }
  ~GpuMapping() { Unmap().IgnoreError(); }

  void* device_ptr() const { return device_; }
  size_t size() const { return len_; }
  // Ends the map now; does nothing when already ended. Errors: those of
  // dsvm_gpu_unmap.
  Expected<void> Unmap() {
    if (addr_ == nullptr) return Expected<void>();
    const void* a = std::exchange(addr_, nullptr);
    return Expected<void>::FromCode(dsvm_gpu_unmap(a, len_));
  }

 private:
  GpuMapping(const void* addr, size_t len, void* device) : addr_(addr), len_(len), device_(device) {}
  const void* addr_;
  size_t len_;
  void* device_;
};

class LockGuard {
 public:
  static Expected<LockGuard> Acquire(dsvm_lock_t* lock) {
    if (int rc = dsvm_lock_acquire(lock); rc != DSVM_OK) return Error::Last(rc);
    return LockGuard(lock);
  }

  LockGuard() = default;  // holds nothing
  LockGuard(LockGuard&& other) noexcept : lock_(std::exchange(other.lock_, nullptr)) {}
  LockGuard& operator=(LockGuard&& other) noexcept {
    if (this != &other) {
      Release().IgnoreError();
      lock_ = std::exchange(other.lock_, nullptr);
    }
    return *this;
  }
  LockGuard(const LockGuard&) = delete;
  LockGuard& operator=(const LockGuard&) = delete;
  ~LockGuard() { Release().IgnoreError(); }

  bool holds() const { return lock_ != nullptr; }

  // dsvm_lock_release; does nothing when it holds nothing.
  Expected<void> Release() {
    dsvm_lock_t* lock = std::exchange(lock_, nullptr);
    if (lock == nullptr) return {};
    return Expected<void>::FromCode(dsvm_lock_release(lock));
  }

 private:
  explicit LockGuard(dsvm_lock_t* lock) : lock_(lock) {}
  dsvm_lock_t* lock_ = nullptr;
};

// dsvm_barrier_wait: true in the one party that arrived last.
// Errors: those of dsvm_barrier_wait.
inline Expected<bool> BarrierWait(dsvm_barrier_t* barrier) {
  const int rc = dsvm_barrier_wait(barrier);
  if (rc == DSVM_BARRIER_LAST) return true;
  if (rc != DSVM_OK) return Error::Last(rc);
  return false;
}

}  // namespace dsvm

#endif  // DSVM_DSVM_HPP_
