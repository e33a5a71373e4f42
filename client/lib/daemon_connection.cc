#include "client/lib/daemon_connection.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

#include <cstring>
#include <utility>

#include "node/fault/fd_passing.h"

namespace dsvm::client {
namespace {

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

using Clock = std::chrono::steady_clock;

}  // namespace

DaemonConnection::DaemonConnection(node::UniqueFd sock, std::chrono::milliseconds timeout)
    : sock_(std::move(sock)),
      timeout_(timeout),
      broken_(false),
      buffer_(proto::kHeaderSize + proto::kMaxControlPayload) {}

Result<DaemonConnection> DaemonConnection::Connect(const std::string& path,
                                                   std::chrono::milliseconds timeout) {
  sockaddr_un sa{};
  if (path.empty()) return InvalidArgument("the daemon's socket path is empty");
  if (path.size() >= sizeof(sa.sun_path)) {
    return InvalidArgument("the daemon's socket path '" + path + "' is longer than " +
                           std::to_string(sizeof(sa.sun_path) - 1) + " bytes");
  }
  if (path.find('\0') != std::string::npos) {
    return InvalidArgument("the daemon's socket path contains a NUL byte");
  }
  node::UniqueFd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!sock) return IoError(Errno("socket(AF_UNIX, SOCK_SEQPACKET)"));
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path.data(), path.size());
  int rc;
  do {
    rc = ::connect(sock.get(), reinterpret_cast<const sockaddr*>(&sa), sizeof(sa));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    const std::string why = Errno("no node daemon at " + path + " (connect");
    switch (errno) {
      case ENOENT:
      case ECONNREFUSED:
      case ENOTDIR:
      case EAGAIN:  // the listener's backlog is full
        return Unavailable(why + ")");
      case EACCES:
      case EPERM:
        return PermissionDenied(why + ")");
      default:
        return IoError(why + ")");
    }
  }
  // Bounds a send to a daemon that stopped reading: sendmsg fails with
  // EAGAIN, which SendFds reports as kUnavailable.
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
  if (::setsockopt(sock.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
    return IoError(Errno("setsockopt(SO_SNDTIMEO)"));
  }
  return DaemonConnection(std::move(sock), timeout);
}

Result<DaemonReply> DaemonConnection::Call(const proto::Message& request,
                                           std::span<const int> fds) {
  if (broken_) return Unavailable("the connection to the node daemon is closed");
  auto reply = Exchange(request, fds);
  if (!reply.ok()) Shutdown();
  return reply;
}

Result<DaemonReply> DaemonConnection::Exchange(const proto::Message& request,
                                               std::span<const int> fds) {
  const uint64_t id = next_request_id_++;
  const std::vector<uint8_t> bytes = proto::Encode(request, id);
  Status sent = node::SendFds(sock_.get(), bytes, fds);
  if (!sent.ok()) {
    if (sent.code() == StatusCode::kUnavailable) {
      return Unavailable("the node daemon is gone or not reading (" + sent.message() + ")");
    }
    return sent;
  }

  const auto deadline = Clock::now() + timeout_;
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      return Unavailable("the node daemon did not answer " +
                         std::string(proto::TypeName(proto::TypeOf(request))) + " within " +
                         std::to_string(timeout_.count()) + " ms");
    }
    pollfd p{sock_.get(), POLLIN, 0};
    const int n = ::poll(&p, 1, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return IoError(Errno("poll of the daemon connection"));
    if (n > 0) break;
  }

  auto got = node::ReceiveFds(sock_.get(), buffer_);
  if (!got.ok()) {
    switch (got.status().code()) {
      case StatusCode::kUnavailable:
        return Unavailable("the node daemon closed the connection");
      case StatusCode::kInvalidArgument:  // too many descriptors, or an oversized record
        return Internal("the node daemon sent a malformed reply: " + got.status().message());
      default:
        return got.status();
    }
  }
  auto frame = proto::Decode(std::span<const uint8_t>(buffer_.data(), got->bytes));
  if (!frame.ok()) {
    return Internal("the node daemon sent a malformed reply: " + frame.status().ToString());
  }
  if (frame->header.request_id != id) {
    return Internal("the node daemon answered request " + std::to_string(frame->header.request_id) +
                    " while " + std::to_string(id) + " was the one in flight");
  }
  return DaemonReply{std::move(frame->message), std::move(got->fds)};
}

void DaemonConnection::Shutdown() {
  if (sock_ && !broken_) ::shutdown(sock_.get(), SHUT_RDWR);
  broken_ = true;
}

}  // namespace dsvm::client
