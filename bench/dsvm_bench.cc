// dsvm-bench: throughput benchmarks. Each subcommand prints JSON lines
// {"name": …, "value": …, "unit": …} on stdout, nothing else; progress and
// errors go to stderr. Figures and how they were taken: docs/PERFORMANCE.md.
//
//   dsvm-bench directory [--quick] [--coordinator-bin PATH | --coordinator HOST:PORT]
//                        [--skip-loopback]
//
// `directory` (issue #2): the page directory in process (PageDirectory driven
// by simulated nodes, against a bare unordered_map update), then through a
// dsvm-coordinator on loopback (against Heartbeat round trips). The
// coordinator is started from ../coordinator/dsvm-coordinator next to this
// binary unless --coordinator names a running one; the loopback part is
// skipped, with a note, when that binary does not exist. --quick runs every
// check on a few rounds (for CI): its figures mean nothing.
//
// Exit status: 0 when every check passed, 1 when one failed, 2 on bad usage.
#include <cstdio>
#include <string>

#include "bench/directory_inprocess.h"
#include "bench/directory_loopback.h"

namespace {

int Usage() {
  std::fprintf(stderr,
               "usage: dsvm-bench directory [--quick] [--skip-loopback]\n"
               "                            [--coordinator-bin PATH | --coordinator HOST:PORT]\n");
  return 2;
}

int RunDirectory(int argc, char** argv) {
  dsvm::bench::InProcessOptions inprocess;
  dsvm::bench::LoopbackOptions loopback;
  bool quick = false;
  bool skip_loopback = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--quick") {
      quick = true;
    } else if (a == "--skip-loopback") {
      skip_loopback = true;
    } else if (a == "--coordinator-bin" && next != nullptr) {
      loopback.coordinator_binary = next;
      ++i;
    } else if (a == "--coordinator" && next != nullptr) {
      loopback.coordinator_address = next;
      ++i;
    } else {
      return Usage();
    }
  }
  if (!loopback.coordinator_binary.empty() && !loopback.coordinator_address.empty()) {
    return Usage();
  }
  if (quick) {
    inprocess.quick = true;
    inprocess.pages = 512;
    inprocess.batch_pages = 64;
    loopback.pages = 256;
    loopback.warmup_seconds = 0.02;
    loopback.seconds = 0.15;
  }

  dsvm::Status s = dsvm::bench::RunDirectoryInProcess(inprocess);
  if (!s.ok()) {
    std::fprintf(stderr, "dsvm-bench directory: in-process part failed: %s\n",
                 s.ToString().c_str());
    return 1;
  }
  if (skip_loopback) return 0;
  bool skipped = false;
  s = dsvm::bench::RunDirectoryLoopback(loopback, &skipped);
  if (!s.ok()) {
    std::fprintf(stderr, "dsvm-bench directory: loopback part failed: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  const std::string command = argv[1];
  if (command == "directory") return RunDirectory(argc, argv);
  return Usage();
}
