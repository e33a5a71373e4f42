#include "proto/framed_socket.h"

#include <arpa/inet.h>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace dsvm::proto {

Status ParseHostPort(const std::string& address, std::string* host, uint16_t* port) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return InvalidArgument("address '" + address + "' is not host:port");
  }
  *host = address.substr(0, colon);
  if (*host == "localhost") *host = "127.0.0.1";
  unsigned long v = 0;
  for (size_t i = colon + 1; i < address.size(); ++i) {
    char c = address[i];
    if (c < '0' || c > '9') return InvalidArgument("port of '" + address + "' is not a number");
    v = v * 10 + static_cast<unsigned long>(c - '0');
    if (v > 65535) return InvalidArgument("port of '" + address + "' is over 65535");
  }
  if (v == 0) return InvalidArgument("port of '" + address + "' is 0");
  *port = static_cast<uint16_t>(v);
  return Status::Ok();
}

FramedSocket::~FramedSocket() { Close(); }

FramedSocket::FramedSocket(FramedSocket&& o) noexcept { *this = std::move(o); }

FramedSocket& FramedSocket::operator=(FramedSocket&& o) noexcept {
  if (this != &o) {
    Close();
    fd_ = o.fd_;
    next_request_id_ = o.next_request_id_;
    out_ = std::move(o.out_);
    packer_ = std::move(o.packer_);
    run_ = std::move(o.run_);
    run_next_ = o.run_next_;
    in_ = std::move(o.in_);
    in_pos_ = o.in_pos_;
    o.fd_ = -1;
    o.ForgetBuffered();
  }
  return *this;
}

void FramedSocket::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ForgetBuffered();
}

void FramedSocket::ForgetBuffered() {
  out_.clear();
  packer_ = RunPacker();
  run_.reset();
  run_next_ = 0;
  in_.clear();
  in_pos_ = 0;
}

Result<FramedSocket> FramedSocket::Connect(const std::string& address, int timeout_ms) {
  std::string host;
  uint16_t port = 0;
  DSVM_RETURN_IF_ERROR(ParseHostPort(address, &host, &port));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1) {
    return InvalidArgument("host '" + host + "' is not a numeric IPv4 address");
  }
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return IoError(std::string("socket: ") + std::strerror(errno));
  if (timeout_ms < 0) {
    if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      int e = errno;
      ::close(fd);
      return Unavailable("connect to " + address + ": " + std::strerror(e));
    }
  } else {
    // Non-blocking connect, waited for with poll; the socket is blocking again after.
    const int flags = ::fcntl(fd, F_GETFL, 0);
    ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int e = 0;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      e = errno;
      if (e == EINPROGRESS) {
        pollfd p{fd, POLLOUT, 0};
        int pr;
        do {
          pr = ::poll(&p, 1, timeout_ms);
        } while (pr < 0 && errno == EINTR);
        socklen_t len = sizeof(e);
        if (pr == 0) {
          e = ETIMEDOUT;
        } else if (pr < 0 || ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len) != 0) {
          e = errno;
        }
      }
    }
    if (e != 0) {
      ::close(fd);
      return Unavailable("connect to " + address + ": " + std::strerror(e));
    }
    ::fcntl(fd, F_SETFL, flags);
  }
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return FramedSocket(fd);
}

void FramedSocket::Queue(const Message& m, uint64_t request_id) {
  packer_.Add(m, request_id, &out_);
}

Status FramedSocket::Flush() {
  packer_.Finish(&out_);
  if (fd_ < 0) return Unavailable("socket closed");
  size_t done = 0;
  while (done < out_.size()) {
    ssize_t n = ::send(fd_, out_.data() + done, out_.size() - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      out_.clear();
      return Unavailable(std::string("send: ") + std::strerror(errno));
    }
    done += static_cast<size_t>(n);
  }
  out_.clear();
  return Status::Ok();
}

Status FramedSocket::FillAtLeast(size_t n, int timeout_ms) {
  if (in_pos_ > 0 && in_pos_ == in_.size()) {
    in_.clear();
    in_pos_ = 0;
  }
  while (in_.size() - in_pos_ < n) {
    if (fd_ < 0) return Unavailable("socket closed");
    pollfd p{fd_, POLLIN, 0};
    int pr = ::poll(&p, 1, timeout_ms);
    if (pr == 0) return Unavailable("timed out waiting for a reply");
    if (pr < 0) {
      if (errno == EINTR) continue;
      return IoError(std::string("poll: ") + std::strerror(errno));
    }
    uint8_t buf[64 << 10];
    ssize_t got = ::recv(fd_, buf, sizeof(buf), 0);
    if (got == 0) return Unavailable("connection closed by the peer");
    if (got < 0) {
      if (errno == EINTR) continue;
      return Unavailable(std::string("recv: ") + std::strerror(errno));
    }
    in_.insert(in_.end(), buf, buf + got);
  }
  return Status::Ok();
}

Result<Frame> FramedSocket::Unpack(Frame f) {
  const auto* run = std::get_if<PageRun>(&f.message);
  if (run == nullptr) return f;
  if (f.header.request_id != 0) {
    return Corruption("a PageRun with request id " + std::to_string(f.header.request_id) +
                      " (runs answer no request)");
  }
  run_ = std::move(f);
  run_next_ = 0;
  return *NextOfRun();
}

std::optional<Frame> FramedSocket::NextOfRun() {
  if (!run_) return std::nullopt;
  const auto& run = std::get<PageRun>(run_->message);
  Frame f{run_->header, PageRunAt(run, run_next_)};
  f.header.type = TypeOf(f.message);
  if (++run_next_ == run.count) run_.reset();
  return f;
}

Result<Frame> FramedSocket::Receive(int timeout_ms) {
  if (auto f = NextOfRun()) return std::move(*f);
  DSVM_RETURN_IF_ERROR(FillAtLeast(kHeaderSize, timeout_ms));
  std::span<const uint8_t> view(in_.data() + in_pos_, kHeaderSize);
  DSVM_ASSIGN_OR_RETURN(Header h, DecodeHeader(view));
  DSVM_RETURN_IF_ERROR(FillAtLeast(kHeaderSize + h.payload_length, timeout_ms));
  std::span<const uint8_t> payload(in_.data() + in_pos_ + kHeaderSize, h.payload_length);
  auto m = DecodePayload(h, payload);
  in_pos_ += kHeaderSize + h.payload_length;
  if (!m.ok()) return m.status();
  return Unpack(Frame{h, std::move(*m)});
}

Status FramedSocket::ReadAvailable() {
  if (fd_ < 0) return Unavailable("socket closed");
  if (in_pos_ > 0 && in_pos_ == in_.size()) {
    in_.clear();
    in_pos_ = 0;
  }
  for (;;) {
    uint8_t buf[64 << 10];
    ssize_t got = ::recv(fd_, buf, sizeof(buf), MSG_DONTWAIT);
    if (got == 0) return Unavailable("connection closed by the peer");
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Status::Ok();
      return Unavailable(std::string("recv: ") + std::strerror(errno));
    }
    in_.insert(in_.end(), buf, buf + got);
    if (static_cast<size_t>(got) < sizeof(buf)) return Status::Ok();
  }
}

Result<std::optional<Frame>> FramedSocket::NextFrame() {
  if (auto f = NextOfRun()) return f;
  if (in_.size() - in_pos_ < kHeaderSize) return std::optional<Frame>();
  DSVM_ASSIGN_OR_RETURN(Header h, DecodeHeader(std::span<const uint8_t>(in_.data() + in_pos_,
                                                                        kHeaderSize)));
  if (in_.size() - in_pos_ - kHeaderSize < h.payload_length) return std::optional<Frame>();
  auto m = DecodePayload(h, std::span<const uint8_t>(in_.data() + in_pos_ + kHeaderSize,
                                                     h.payload_length));
  in_pos_ += kHeaderSize + h.payload_length;
  if (!m.ok()) return m.status();
  DSVM_ASSIGN_OR_RETURN(Frame f, Unpack(Frame{h, std::move(*m)}));
  return std::optional<Frame>(std::move(f));
}

Result<Message> FramedSocket::Call(const Message& m, int timeout_ms) {
  const uint64_t id = next_request_id_++;
  DSVM_RETURN_IF_ERROR(Send(m, id));
  for (;;) {
    DSVM_ASSIGN_OR_RETURN(Frame f, Receive(timeout_ms));
    if (f.header.request_id == id) return std::move(f.message);
    // Unsolicited frames (directory messages) are not for a Call: skip.
  }
}

}  // namespace dsvm::proto
