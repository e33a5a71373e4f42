#include "node/transport/buffer_pool.h"

#include <cstring>
#include <new>

namespace dsvm::node {
namespace {

constexpr std::align_val_t kAlign{4096};

}  // namespace

std::shared_ptr<BufferPool> BufferPool::Create(size_t max_kept_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(max_kept_bytes));
}

BufferPool::~BufferPool() {
  for (auto& [size, buffers] : kept_) {
    for (uint8_t* b : buffers) ::operator delete(b, kAlign);
  }
}

std::shared_ptr<uint8_t> BufferPool::Take(size_t size) {
  if (size == 0) size = 1;
  uint8_t* buffer = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = kept_.find(size);
    if (it != kept_.end() && !it->second.empty()) {
      buffer = it->second.back();
      it->second.pop_back();
      kept_bytes_ -= size;
      ++stats_.reused;
    } else {
      ++stats_.allocated;
    }
  }
  if (buffer == nullptr) {
    buffer = static_cast<uint8_t*>(::operator new(size, kAlign));
    // Fault its pages in now, not inside whatever writes it first (a socket
    // receive, which measured slower for it).
    std::memset(buffer, 0, size);
  }
  return std::shared_ptr<uint8_t>(
      buffer, [pool = shared_from_this(), size](uint8_t* b) { pool->GiveBack(b, size); });
}

void BufferPool::GiveBack(uint8_t* buffer, size_t size) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (kept_bytes_ + size <= max_kept_bytes_) {
      try {
        kept_[size].push_back(buffer);
        kept_bytes_ += size;
        return;
      } catch (const std::bad_alloc&) {
        // No room to keep it (this runs in a deleter): free it instead.
      }
    }
    ++stats_.freed;
  }
  ::operator delete(buffer, kAlign);
}

size_t BufferPool::kept_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return kept_bytes_;
}

BufferPoolStats BufferPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace dsvm::node
