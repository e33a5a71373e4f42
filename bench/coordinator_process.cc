#include "bench/coordinator_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "bench/child_process.h"

namespace dsvm::bench {
namespace {

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

}  // namespace

std::string DefaultCoordinatorBinary() {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  return (self.parent_path().parent_path() / "coordinator" / "dsvm-coordinator").string();
}

Result<std::unique_ptr<CoordinatorProcess>> CoordinatorProcess::Start(
    const std::string& binary, const std::vector<std::string>& extra_args) {
  if (::access(binary.c_str(), X_OK) != 0) {
    return NotFound("coordinator binary " + binary + ": " + std::strerror(errno));
  }
  std::unique_ptr<CoordinatorProcess> c(new CoordinatorProcess());
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern =
      std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/dsvm-bench.XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) return IoError(Errno("mkdtemp"));
  c->root_ = pattern;
  const std::string data_dir = c->root_ + "/data";
  const std::string port_file = c->root_ + "/port";
  const std::string log_file = c->root_ + "/coordinator.log";
  if (::mkdir(data_dir.c_str(), 0700) != 0) return IoError(Errno("mkdir"));
  const int log_fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (log_fd < 0) return IoError(Errno("open coordinator log"));

  c->secret_path_ = c->root_ + "/secret";
  DSVM_ASSIGN_OR_RETURN(proto::ClusterSecret secret, proto::ClusterSecret::Generate(c->secret_path_));
  c->secret_ = std::move(secret);
  std::vector<std::string> args = {binary,   "--listen",    "127.0.0.1:0",    "--data-dir",
                                   data_dir, "--port-file", port_file,        "--secret-file",
                                   c->secret_path_};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

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
  c->pid_ = pid;

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (;;) {
    int wstatus = 0;
    if (::waitpid(pid, &wstatus, WNOHANG) == pid) {
      c->pid_ = -1;
      c->PrintLogTail(40);
      return Unavailable("coordinator " + DescribeExit(wstatus) + " before writing its port");
    }
    std::ifstream in(port_file);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // Written as "PORT\n": only a complete line counts.
    if (!text.empty() && text.back() == '\n') {
      text.pop_back();
      char* end = nullptr;
      const unsigned long port = std::strtoul(text.c_str(), &end, 10);
      if (text.empty() || *end != '\0' || port == 0 || port > 65535) {
        return Unavailable("coordinator wrote port file '" + text + "', not a port number");
      }
      c->address_ = "127.0.0.1:" + std::to_string(port);
      return c;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      c->PrintLogTail(40);
      return Unavailable("coordinator did not write " + port_file + " within 20 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

CoordinatorProcess::~CoordinatorProcess() {
  Stop().IgnoreError();  // Stop() reported it already; nothing more to do here
  if (!root_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
    if (ec)
      std::fprintf(stderr, "dsvm-bench: cannot remove %s: %s\n", root_.c_str(),
                   ec.message().c_str());
  }
}

Status CoordinatorProcess::Signal(int sig) {
  if (pid_ < 0) return FailedPrecondition("the coordinator is not running");
  if (::kill(pid_, sig) != 0) return IoError(std::string("kill: ") + std::strerror(errno));
  return Status::Ok();
}

Status CoordinatorProcess::Stop() {
  if (pid_ < 0) return Status::Ok();
  const pid_t pid = pid_;
  pid_ = -1;
  return StopChild(pid, "coordinator", std::chrono::milliseconds(5),
                   [this] { PrintLogTail(40); });
}

void CoordinatorProcess::PrintLogTail(size_t lines) const {
  bench::PrintLogTail(root_ + "/coordinator.log", "the coordinator's log", lines);
}

}  // namespace dsvm::bench
