// dsvm-bench-kmod: bench/kmod_fault.h as a program of its own, built static
// by tests/kmod/run.sh for a guest without the build's shared libraries.
//
//   dsvm-bench-kmod [--pages N]
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "bench/kmod_fault.h"

int main(int argc, char** argv) {
  uint64_t pages = 2048;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--pages") == 0 && i + 1 < argc) {
      pages = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: dsvm-bench-kmod [--pages N]\n");
      return 2;
    }
  }
  return dsvm::bench::RunKmodFaultBench(pages);
}
