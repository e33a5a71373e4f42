#include "bench/node_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "bench/child_process.h"

namespace dsvm::bench {
namespace {

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// A connection to the daemon's client socket, or -1.
int Connect(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

std::string DefaultNodeBinary() {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  return (self.parent_path().parent_path() / "node" / "dsvm-node").string();
}

Result<std::unique_ptr<NodeProcess>> NodeProcess::Start(const std::string& binary,
                                                        const std::string& coordinator,
                                                        const std::string& secret_file,
                                                        const std::string& socket_path,
                                                        const std::string& log_path,
                                                        const std::vector<std::string>& extra_args) {
  if (::access(binary.c_str(), X_OK) != 0) {
    return NotFound("node binary " + binary + ": " + std::strerror(errno));
  }
  sockaddr_un probe;
  if (socket_path.size() >= sizeof(probe.sun_path)) {
    return InvalidArgument("socket path " + socket_path + " is too long for AF_UNIX");
  }
  std::unique_ptr<NodeProcess> n(new NodeProcess());
  n->socket_path_ = socket_path;
  n->log_path_ = log_path;
  const int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (log_fd < 0) return IoError(Errno("open node log"));

  std::vector<std::string> args = {binary,        "--coordinator", coordinator,
                                   "--listen",    "127.0.0.1:0",   "--socket",
                                   socket_path,   "--secret-file", secret_file};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(log_fd);
    return IoError(Errno("fork"));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(log_fd);
  n->pid_ = pid;

  // The daemon binds its socket after joining, then runs its loop; a
  // connection accepted before the loop starts waits in the backlog.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (;;) {
    if (!n->Running()) {
      n->PrintLogTail(40);
      return Unavailable("dsvm-node (socket " + socket_path + ") exited before serving clients");
    }
    n->probe_fd_ = Connect(socket_path);
    if (n->probe_fd_ >= 0) return n;
    if (std::chrono::steady_clock::now() > deadline) {
      n->PrintLogTail(40);
      return Unavailable("dsvm-node did not listen on " + socket_path + " within 20 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

NodeProcess::~NodeProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  if (probe_fd_ >= 0) ::close(probe_fd_);
}

bool NodeProcess::Running() {
  if (pid_ < 0) return false;
  int wstatus = 0;
  if (::waitpid(pid_, &wstatus, WNOHANG) == pid_) {
    std::fprintf(stderr, "dsvm-bench: dsvm-node %s\n", DescribeExit(wstatus).c_str());
    pid_ = -1;
    return false;
  }
  return true;
}

Status NodeProcess::Stop() {
  if (pid_ < 0) return Internal("dsvm-node had exited before it was stopped");
  const pid_t pid = pid_;
  pid_ = -1;
  return StopChild(pid, "dsvm-node", std::chrono::milliseconds(2),
                   [this] { PrintLogTail(40); });
}

void NodeProcess::PrintLogTail(size_t lines) const {
  bench::PrintLogTail(log_path_, log_path_, lines);
}

}  // namespace dsvm::bench
