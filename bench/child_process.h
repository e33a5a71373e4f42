// What the bench's child processes (a coordinator, node daemons, forked
// clients) share: how one ended, reaping it within a grace period, and the
// tail of its log for a failure's report.
#ifndef DSVM_BENCH_CHILD_PROCESS_H_
#define DSVM_BENCH_CHILD_PROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>

#include "proto/status.h"

namespace dsvm::bench {

// "exited with status N", "was killed by signal S", or "stopped".
std::string DescribeExit(int wstatus);

// Whether the child exited with status 0.
bool ExitedCleanly(int wstatus);

struct Reaped {
  int wstatus = 0;
  bool killed = false;  // it outlived `grace` and was sent SIGKILL
};

// Waits for child `pid` to end, looking every `poll`; once `grace` has
// passed it is killed (SIGKILL) and reaped. Errors: kIoError (waitpid).
Result<Reaped> ReapWithin(pid_t pid, std::chrono::milliseconds grace,
                          std::chrono::milliseconds poll);

// Sends SIGTERM to child `pid` and reaps it (SIGKILL after 5 s, looking
// every `poll`). Errors: kInternal naming `name` when it had to be killed or
// did not exit 0, after print_log() (its log's tail, say); kIoError
// (waitpid).
Status StopChild(pid_t pid, const std::string& name, std::chrono::milliseconds poll,
                 const std::function<void()>& print_log);

// Prints the last `lines` lines of the file at `path` to stderr, framed by
// "--- last N lines of <title> ---" and "--- end of log ---".
void PrintLogTail(const std::string& path, const std::string& title, size_t lines);

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_CHILD_PROCESS_H_
