#include "bench/cluster.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>

#include "node/fault/uffd_backend.h"

namespace dsvm::bench {
namespace {

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

void RemoveTree(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  if (ec) {
    std::fprintf(stderr, "dsvm-bench: cannot remove %s: %s\n", path.c_str(), ec.message().c_str());
  }
}

// The watcher's whole life; see TempDir.
[[noreturn]] void Watch(int pipe_read, const std::string& path) {
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::signal(sig, SIG_IGN);
  // Holding the bench's stdout would keep a reader of its pipe waiting.
  const int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    ::dup2(null_fd, STDIN_FILENO);
    ::dup2(null_fd, STDOUT_FILENO);
  }
  char byte = 0;
  ssize_t n;
  while ((n = ::read(pipe_read, &byte, 1)) < 0 && errno == EINTR) {
  }
  if (n == 1) ::_exit(0);  // the bench removed it
  // The bench died. Its children were sent SIGKILL with it; one may still
  // finish a system call that creates a file, hence a second pass.
  for (int pass = 0; pass < 2; ++pass) {
    ::usleep(200 * 1000);
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  ::_exit(0);
}

// Sets $TMPDIR for the life of the object, then restores it. Only in a
// single-threaded process.
class ScopedTmpDir {
 public:
  explicit ScopedTmpDir(const std::string& dir) {
    if (const char* old = std::getenv("TMPDIR")) old_ = old;
    ::setenv("TMPDIR", dir.c_str(), 1);
  }
  ~ScopedTmpDir() {
    if (old_) {
      ::setenv("TMPDIR", old_->c_str(), 1);
    } else {
      ::unsetenv("TMPDIR");
    }
  }

 private:
  std::optional<std::string> old_;
};

}  // namespace

TempDir::~TempDir() {
  if (path_.empty()) return;
  RemoveTree(path_);
  if (watcher_fd_ >= 0) {
    const char removed = 'r';
    if (::write(watcher_fd_, &removed, 1) != 1) {
      std::fprintf(stderr, "dsvm-bench: cannot tell the watcher of %s: %s\n", path_.c_str(),
                   std::strerror(errno));
    }
    ::close(watcher_fd_);
  }
  if (watcher_ > 0) ::waitpid(watcher_, nullptr, 0);
}

Status TempDir::Make(std::string_view prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/" +
                        std::string(prefix) + ".XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) return IoError(Errno("mkdtemp"));
  path_ = pattern;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return IoError(Errno("pipe2"));
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return IoError(Errno("fork"));
  }
  if (pid == 0) {
    ::close(fds[1]);
    Watch(fds[0], path_);
  }
  ::close(fds[0]);
  watcher_ = pid;
  watcher_fd_ = fds[1];
  return Status::Ok();
}

void Cluster::PrintLogTails() {
  for (auto& n : nodes) n->PrintLogTail(15);
  if (coordinator) coordinator->PrintLogTail(15);
}

void Cluster::ReportLogProblems() {
  for (size_t i = 0; i < nodes.size(); ++i) {
    std::ifstream in(dir.path() + "/node" + std::to_string(i + 1) + ".log");
    int total = 0;
    for (std::string line; std::getline(in, line);) {
      if (line.find(" WARN ") == std::string::npos && line.find(" ERROR ") == std::string::npos)
        continue;
      if (++total <= 5)
        std::fprintf(stderr, "dsvm-bench: node %zu logged: %s\n", i + 1, line.c_str());
    }
    if (total > 5)
      std::fprintf(stderr, "dsvm-bench: node %zu logged %d such lines in all\n", i + 1, total);
  }
}

Status Cluster::Stop() {
  ReportLogProblems();
  Status first;
  for (auto& n : nodes) {
    Status st = n->Stop();
    if (first.ok()) first = st;
  }
  for (auto& child : clients) {
    Status st = child->Release();
    if (first.ok()) first = st;
  }
  clients.clear();
  if (coordinator) {
    Status st = coordinator->Stop();
    if (first.ok()) first = st;
  }
  return first;
}

Status StartCluster(const ClusterOptions& o, Cluster* c) {
  DSVM_RETURN_IF_ERROR(c->dir.Make(o.dir_prefix));
  std::vector<std::string> poll;
  if (o.busy_poll_us > 0) poll = {"--busy-poll-us", std::to_string(o.busy_poll_us)};
  std::vector<std::string> node_flags = poll;
  if (o.fault_poll_us >= 0) {
    node_flags.push_back("--fault-poll-us");
    node_flags.push_back(std::to_string(o.fault_poll_us));
  }
  if (!o.zero_copy.empty()) {
    node_flags.push_back("--zero-copy");
    node_flags.push_back(o.zero_copy);
  }
  if (!o.direct_reads.empty()) {
    node_flags.push_back("--direct-reads");
    node_flags.push_back(o.direct_reads);
  }
  {
    // The coordinator makes its data directory under $TMPDIR: under ours,
    // the watcher removes it too.
    ScopedTmpDir in_ours(c->dir.path());
    DSVM_ASSIGN_OR_RETURN(c->coordinator, CoordinatorProcess::Start(o.coordinator_binary, poll));
  }
  for (int i = 0; i < o.nodes; ++i) {
    const std::string stem = c->dir.path() + "/node" + std::to_string(i + 1);
    DSVM_ASSIGN_OR_RETURN(
        std::unique_ptr<NodeProcess> n,
        NodeProcess::Start(o.node_binary, c->coordinator->address(), c->coordinator->secret_path(),
                           stem + ".sock", stem + ".log", node_flags));
    c->nodes.push_back(std::move(n));
  }
  return Status::Ok();
}

Status ResolveBinaries(std::string* node_binary, std::string* coordinator_binary) {
  if (node_binary->empty()) *node_binary = DefaultNodeBinary();
  if (coordinator_binary->empty()) *coordinator_binary = DefaultCoordinatorBinary();
  for (const std::string* b : {node_binary, coordinator_binary}) {
    if (::access(b->c_str(), X_OK) != 0) {
      return NotFound(*b +
                      " is missing: build it (cmake --build build --target dsvm-node "
                      "dsvm-coordinator)");
    }
  }
  return Status::Ok();
}

bool UffdUsableOrSaySkip(std::string_view bench) {
  auto probe = node::UffdBackend::Create();
  if (probe.ok()) return true;
  std::fprintf(stderr, "%.*s: SKIP: userfaultfd cannot be used here as dsvm-node needs it: %s\n",
               static_cast<int>(bench.size()), bench.data(), probe.status().ToString().c_str());
  return false;
}

}  // namespace dsvm::bench
