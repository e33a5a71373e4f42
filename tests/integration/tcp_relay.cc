#include "tests/integration/tcp_relay.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace dsvm::testing {
namespace {

Status Errno(const std::string& what) { return IoError(what + ": " + std::strerror(errno)); }

// Writes all of buf to fd (blocking). False when the peer is gone.
bool WriteAll(int fd, const char* buf, size_t n) {
  while (n > 0) {
    const ssize_t w = ::send(fd, buf, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    buf += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

Result<std::unique_ptr<TcpRelay>> TcpRelay::Start(const std::string& target) {
  const size_t colon = target.rfind(':');
  if (colon == std::string::npos) return InvalidArgument("no port in " + target);
  const std::string host = target.substr(0, colon);
  const int target_port = std::stoi(target.substr(colon + 1));
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno("socket");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || ::listen(fd, 16) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    Status st = Errno("bind/listen");
    ::close(fd);
    return st;
  }
  std::unique_ptr<TcpRelay> r(new TcpRelay(fd, ntohs(a.sin_port), host, target_port));
  r->thread_ = std::thread([p = r.get()] { p->Loop(); });
  return r;
}

TcpRelay::TcpRelay(int listen_fd, int port, std::string target_host, int target_port)
    : listen_fd_(listen_fd), port_(port), target_host_(std::move(target_host)),
      target_port_(target_port) {}

TcpRelay::~TcpRelay() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  ::close(listen_fd_);
}

void TcpRelay::Reset() {
  reset_ = true;
  while (reset_) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

std::string TcpRelay::address() const { return "127.0.0.1:" + std::to_string(port_); }

void TcpRelay::Loop() {
  struct Pair {
    int a;  // the accepted side
    int b;  // the target side
  };
  std::vector<Pair> pairs;
  char buf[65536];
  // shutdown, not only close: a forked test client holds copies of these
  // descriptors, and a close alone would end nothing.
  auto drop = [](const Pair& p) {
    for (int fd : {p.a, p.b}) {
      ::shutdown(fd, SHUT_RDWR);
      ::close(fd);
    }
  };
  while (!stop_) {
    if (reset_) {
      for (const Pair& p : pairs) drop(p);
      pairs.clear();
      reset_ = false;
    }
    if (cut_) {  // nothing moves; connections stay as they are
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    std::vector<pollfd> fds{{listen_fd_, POLLIN, 0}};
    for (const Pair& p : pairs) {
      fds.push_back({p.a, POLLIN, 0});
      fds.push_back({p.b, POLLIN, 0});
    }
    if (::poll(fds.data(), fds.size(), 5) <= 0 || cut_) continue;
    const size_t polled = pairs.size();
    if (fds[0].revents & POLLIN) {
      const int a = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      const int b = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in t{};
      t.sin_family = AF_INET;
      t.sin_port = htons(static_cast<uint16_t>(target_port_));
      ::inet_pton(AF_INET, target_host_.c_str(), &t.sin_addr);
      if (a >= 0 && b >= 0 && ::connect(b, reinterpret_cast<sockaddr*>(&t), sizeof(t)) == 0) {
        pairs.push_back({a, b});
      } else {
        if (a >= 0) ::close(a);
        if (b >= 0) ::close(b);
      }
    }
    std::vector<size_t> dead;
    for (size_t i = 0; i < polled; ++i) {
      const Pair& p = pairs[i];
      bool alive = true;
      for (int dir = 0; dir < 2 && alive; ++dir) {
        const pollfd& f = fds[1 + 2 * i + dir];
        if ((f.revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
        const int from = dir == 0 ? p.a : p.b;
        const int to = dir == 0 ? p.b : p.a;
        const ssize_t n = ::recv(from, buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        alive = n > 0 && WriteAll(to, buf, static_cast<size_t>(n));
      }
      if (!alive) dead.push_back(i);
    }
    for (size_t k = dead.size(); k-- > 0;) {
      drop(pairs[dead[k]]);
      pairs.erase(pairs.begin() + static_cast<ptrdiff_t>(dead[k]));
    }
  }
  for (const Pair& p : pairs) {
    ::close(p.a);
    ::close(p.b);
  }
}

}  // namespace dsvm::testing
