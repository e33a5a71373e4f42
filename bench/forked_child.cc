#include "bench/forked_child.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "bench/child_process.h"

namespace dsvm::bench {
namespace {

constexpr size_t kMaxSeries = 16;
constexpr size_t kMaxSamples = size_t{1} << 24;

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

bool WriteAll(int fd, const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// Wire: u64 byte count of what follows; u64 series; per series u64 count
// and that many doubles.
std::vector<uint8_t> Serialize(const SampleSeries& series) {
  std::vector<uint8_t> out(8);
  auto put = [&](const void* p, size_t n) {
    out.insert(out.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n);
  };
  const uint64_t count = series.size();
  put(&count, 8);
  for (const auto& s : series) {
    const uint64_t n = s.size();
    put(&n, 8);
    put(s.data(), n * sizeof(double));
  }
  const uint64_t body = out.size() - 8;
  std::memcpy(out.data(), &body, 8);
  return out;
}

Result<SampleSeries> Deserialize(const std::vector<uint8_t>& in) {
  size_t at = 8;
  auto get = [&](void* p, size_t n) {
    if (in.size() - at < n) return false;
    std::memcpy(p, in.data() + at, n);
    at += n;
    return true;
  };
  uint64_t count = 0;
  if (!get(&count, 8) || count > kMaxSeries) return Internal("malformed samples from the child");
  SampleSeries series(count);
  for (auto& s : series) {
    uint64_t n = 0;
    if (!get(&n, 8) || n > kMaxSamples) return Internal("malformed samples from the child");
    s.resize(n);
    if (!get(s.data(), n * sizeof(double))) return Internal("truncated samples from the child");
  }
  return series;
}

}  // namespace

Result<std::unique_ptr<ForkedChild>> ForkedChild::Start(const std::string& what, const Body& body) {
  int result[2], release[2];
  if (::pipe2(result, O_CLOEXEC) != 0) return IoError(Errno("pipe2"));
  if (::pipe2(release, O_CLOEXEC) != 0) {
    ::close(result[0]);
    ::close(result[1]);
    return IoError(Errno("pipe2"));
  }
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    for (int fd : {result[0], result[1], release[0], release[1]}) ::close(fd);
    return IoError(Errno("fork"));
  }
  if (pid == 0) {
    ::close(result[0]);
    ::close(release[1]);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(126);
    SampleSeries series;
    const Status st = body(&series);
    if (!st.ok()) {
      std::fprintf(stderr, "dsvm-bench: %s: %s\n", what.c_str(), st.ToString().c_str());
      std::fflush(stderr);
      ::_exit(1);
    }
    bool fits = series.size() <= kMaxSeries;
    for (const auto& s : series) fits = fits && s.size() <= kMaxSamples;
    DSVM_CHECK_MSG(fits, "too many samples for ForkedChild");
    const std::vector<uint8_t> bytes = Serialize(series);
    if (!WriteAll(result[1], bytes.data(), bytes.size())) ::_exit(2);
    // Hold on to everything until released. Other children may hold copies
    // of the pipe's write end, so a byte says "go", not end of file.
    char go;
    while (::read(release[0], &go, 1) < 0 && errno == EINTR) {
    }
    ::_exit(0);
  }
  ::close(result[1]);
  ::close(release[0]);
  std::unique_ptr<ForkedChild> c(new ForkedChild());
  c->what_ = what;
  c->pid_ = pid;
  c->result_fd_ = result[0];
  c->release_fd_ = release[1];
  return c;
}

ForkedChild::~ForkedChild() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  if (result_fd_ >= 0) ::close(result_fd_);
  if (release_fd_ >= 0) ::close(release_fd_);
}

Result<SampleSeries> ForkedChild::Collect(int timeout_s) {
  if (pid_ < 0 || result_fd_ < 0) return Internal(what_ + ": collected twice");
  // Length-prefixed: a grandchild may hold the pipe open, so no end of file.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  auto left_ms = [&] {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    return static_cast<int>(std::max<int64_t>(0, left.count()));
  };
  std::vector<uint8_t> in;
  uint64_t want = UINT64_MAX;
  bool timed_out = false;
  uint8_t buf[1 << 16];
  for (;;) {
    if (in.size() >= 8 && want == UINT64_MAX) std::memcpy(&want, in.data(), 8);
    if (want != UINT64_MAX && in.size() - 8 >= want) break;
    pollfd p{result_fd_, POLLIN, 0};
    const int r = ::poll(&p, 1, left_ms());
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) {
      timed_out = true;
      break;
    }
    const ssize_t n = ::read(result_fd_, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the child closed its end without a complete answer
    in.insert(in.end(), buf, buf + n);
  }
  ::close(result_fd_);
  result_fd_ = -1;
  const bool complete = want != UINT64_MAX && in.size() - 8 >= want;
  if (complete) return Deserialize(in);

  int wstatus = 0;
  ::kill(pid_, SIGKILL);  // no-op when it exited already
  ::waitpid(pid_, &wstatus, 0);
  pid_ = -1;
  if (timed_out) {
    return Unavailable(what_ + " did not finish within " + std::to_string(timeout_s) +
                       " s and was killed (a fault never served?)");
  }
  return Internal(what_ + " " + DescribeExit(wstatus) + " without its samples");
}

Status ForkedChild::Release() {
  if (pid_ < 0) return Status::Ok();
  const char go = 'g';
  [[maybe_unused]] const ssize_t n = ::write(release_fd_, &go, 1);
  ::close(release_fd_);
  release_fd_ = -1;
  const pid_t pid = pid_;
  pid_ = -1;
  DSVM_ASSIGN_OR_RETURN(const Reaped end,
                        ReapWithin(pid, std::chrono::seconds(5), std::chrono::milliseconds(1)));
  if (end.killed) return Internal(what_ + " did not exit within 5 s of its release; killed");
  if (!ExitedCleanly(end.wstatus)) return Internal(what_ + " " + DescribeExit(end.wstatus));
  return Status::Ok();
}

Result<SampleSeries> RunForked(const std::string& what, int timeout_s,
                               const ForkedChild::Body& body) {
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<ForkedChild> child, ForkedChild::Start(what, body));
  DSVM_ASSIGN_OR_RETURN(SampleSeries series, child->Collect(timeout_s));
  DSVM_RETURN_IF_ERROR(child->Release());
  return series;
}

}  // namespace dsvm::bench
