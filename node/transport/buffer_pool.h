// BufferPool: large byte buffers kept for reuse.
//
// Page bytes leave a node from a buffer (a batch's, or a page's own when it
// is too large to batch, 2 MiB) and a large page arrives by rendezvous into
// one, each held until UCX (or the install) is done with it. Fresh from
// malloc, a buffer that large is fresh memory: glibc maps it anew, and the
// kernel faults in and zeroes every 4 KiB of it at first touch, which cost
// more than the copies the buffer is for (docs/PERFORMANCE.md, Scan, stop
// 20). Buffers given back here keep their pages, so the next one of the
// same size lands in memory already resident. The pool never shrinks below
// what it keeps: up to its bound stays resident for the process's life.
//
// Thread safety: Take and the release of its buffers may run on any thread.
#ifndef DSVM_NODE_TRANSPORT_BUFFER_POOL_H_
#define DSVM_NODE_TRANSPORT_BUFFER_POOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace dsvm::node {

struct BufferPoolStats {
  uint64_t allocated = 0;  // buffers Take made anew
  uint64_t reused = 0;     // buffers Take handed out again
  uint64_t freed = 0;      // buffers given back beyond the bound, freed
};

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  // Keeps at most `max_kept_bytes` of given-back buffers (0: none).
  static std::shared_ptr<BufferPool> Create(size_t max_kept_bytes);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A buffer of `size` bytes (at least 1), aligned to 4 KiB, its contents
  // unspecified. A new one has had its pages faulted in. It comes back to
  // the pool when the last copy of the pointer goes (the pool lives until
  // then).
  std::shared_ptr<uint8_t> Take(size_t size);

  size_t kept_bytes() const;
  BufferPoolStats stats() const;

 private:
  explicit BufferPool(size_t max_kept_bytes) : max_kept_bytes_(max_kept_bytes) {}
  void GiveBack(uint8_t* buffer, size_t size);

  const size_t max_kept_bytes_;
  mutable std::mutex mu_;
  std::unordered_map<size_t, std::vector<uint8_t*>> kept_;  // by size
  size_t kept_bytes_ = 0;
  BufferPoolStats stats_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_TRANSPORT_BUFFER_POOL_H_
