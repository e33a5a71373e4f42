#include "node/fault/fd_passing.h"

#include <errno.h>
#include <sys/socket.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace dsvm::node {
namespace {

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// Control buffer with room for kMaxPassedFds descriptors, aligned for cmsghdr.
union ControlBuffer {
  char buf[CMSG_SPACE(sizeof(int) * kMaxPassedFds)];
  cmsghdr align;
};

}  // namespace

Status SendFds(int socket, std::span<const uint8_t> payload, std::span<const int> fds) {
  if (payload.empty()) return InvalidArgument("descriptors need at least one byte of payload");
  if (fds.size() > kMaxPassedFds) {
    return InvalidArgument(std::to_string(fds.size()) + " descriptors, more than " +
                           std::to_string(kMaxPassedFds));
  }
  for (int fd : fds) {
    if (fd < 0) return InvalidArgument("negative descriptor " + std::to_string(fd));
  }
  ControlBuffer control;
  std::memset(&control, 0, sizeof(control));
  iovec iov{const_cast<uint8_t*>(payload.data()), payload.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  size_t sent = 0;
  while (sent < payload.size()) {
    iov.iov_base = const_cast<uint8_t*>(payload.data()) + sent;
    iov.iov_len = payload.size() - sent;
    ssize_t n = sendmsg(socket, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 &&
        (errno == EPIPE || errno == ECONNRESET || errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (sent > 0) return IoError(Errno("sendmsg after a partial send"));
      return Unavailable(Errno("sendmsg"));
    }
    if (n < 0) return IoError(Errno("sendmsg"));
    sent += static_cast<size_t>(n);
    // The descriptors went with the first bytes.
    msg.msg_control = nullptr;
    msg.msg_controllen = 0;
  }
  return Status::Ok();
}

Result<ReceivedFds> ReceiveFds(int socket, std::span<uint8_t> payload) {
  if (payload.empty()) return InvalidArgument("empty receive buffer");
  ControlBuffer control;
  std::memset(&control, 0, sizeof(control));
  iovec iov{payload.data(), payload.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof(control.buf);
  ssize_t n;
  do {
    n = recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNRESET)) {
    return Unavailable(Errno("recvmsg"));
  }
  if (n < 0) return IoError(Errno("recvmsg"));

  // Take ownership of every descriptor first, so each is closed on any
  // refusal below.
  ReceivedFds r;
  r.bytes = static_cast<size_t>(n);
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      r.fds.emplace_back(fd);
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    return InvalidArgument("the peer passed more than " + std::to_string(kMaxPassedFds) +
                           " descriptors; refused");
  }
  if (msg.msg_flags & MSG_TRUNC) {
    return InvalidArgument("message longer than the " + std::to_string(payload.size()) +
                           "-byte buffer; refused");
  }
  if (n == 0 && r.fds.empty()) return Unavailable("recvmsg: the peer closed the socket");
  return r;
}

namespace {

// The pid a pidfd refers to, from /proc/self/fdinfo: 0 when `fd` is no
// pidfd, -1 when its process has exited.
pid_t PidOfPidfd(int fd) {
  std::ifstream in("/proc/self/fdinfo/" + std::to_string(fd));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Pid:", 0) == 0) return static_cast<pid_t>(std::atoi(line.c_str() + 4));
  }
  return 0;
}

}  // namespace

Result<pid_t> CheckClientPidfd(int pidfd, pid_t claimed) {
  // /proc shows a "Pid:" line for pidfds only (-1 once the process exited).
  const pid_t named = PidOfPidfd(pidfd);
  if (named == 0) return InvalidArgument("the client's process descriptor is not a pidfd");
  if (named < 0) return Unavailable("the client's process is gone");
  if (claimed != 0 && claimed != named) {
    return InvalidArgument("the client's pidfd names process " + std::to_string(named) + ", not " +
                           std::to_string(claimed));
  }
  return named;
}

}  // namespace dsvm::node
