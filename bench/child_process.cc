#include "bench/child_process.h"

#include <signal.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <thread>

namespace dsvm::bench {

std::string DescribeExit(int wstatus) {
  if (WIFEXITED(wstatus)) return "exited with status " + std::to_string(WEXITSTATUS(wstatus));
  if (WIFSIGNALED(wstatus)) {
    return std::string("was killed by signal ") + strsignal(WTERMSIG(wstatus));
  }
  return "stopped";
}

bool ExitedCleanly(int wstatus) { return WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0; }

Result<Reaped> ReapWithin(pid_t pid, std::chrono::milliseconds grace,
                          std::chrono::milliseconds poll) {
  const auto deadline = std::chrono::steady_clock::now() + grace;
  Reaped out;
  for (;;) {
    const pid_t r = ::waitpid(pid, &out.wstatus, WNOHANG);
    if (r == pid) return out;
    if (r < 0 && errno != EINTR) return IoError(std::string("waitpid: ") + std::strerror(errno));
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &out.wstatus, 0);
      out.killed = true;
      return out;
    }
    std::this_thread::sleep_for(poll);
  }
}

Status StopChild(pid_t pid, const std::string& name, std::chrono::milliseconds poll,
                 const std::function<void()>& print_log) {
  ::kill(pid, SIGTERM);
  DSVM_ASSIGN_OR_RETURN(const Reaped end, ReapWithin(pid, std::chrono::seconds(5), poll));
  if (end.killed) {
    print_log();
    return Internal(name + " ignored SIGTERM for 5 s; killed");
  }
  if (!ExitedCleanly(end.wstatus)) {
    print_log();
    return Internal(name + " " + DescribeExit(end.wstatus) + " on SIGTERM");
  }
  return Status::Ok();
}

void PrintLogTail(const std::string& path, const std::string& title, size_t lines) {
  std::ifstream in(path);
  std::deque<std::string> tail;
  for (std::string line; std::getline(in, line);) {
    tail.push_back(std::move(line));
    if (tail.size() > lines) tail.pop_front();
  }
  std::fprintf(stderr, "--- last %zu lines of %s ---\n", tail.size(), title.c_str());
  for (const std::string& l : tail) std::fprintf(stderr, "  %s\n", l.c_str());
  std::fprintf(stderr, "--- end of log ---\n");
}

}  // namespace dsvm::bench
