// UniqueFd: sole ownership of a file descriptor, closed on destruction.
//
// Lives in node/memory/ because PageStore is its first user; node/fault/
// (which depends on node/memory/) uses it too. Move it to a shared utility
// folder when a layer that must not depend on node/memory/ needs it.
#ifndef DSVM_NODE_MEMORY_UNIQUE_FD_H_
#define DSVM_NODE_MEMORY_UNIQUE_FD_H_

#include <unistd.h>

#include <utility>

namespace dsvm::node {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  // Gives up ownership without closing.
  int release() { return std::exchange(fd_, -1); }
  // Closes the descriptor held (if any) and takes `fd`. close(2) errors are
  // ignored on purpose: Linux releases the descriptor even when close fails,
  // so a retry could close an unrelated one.
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_MEMORY_UNIQUE_FD_H_
