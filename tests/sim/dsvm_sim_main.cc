// dsvm-sim: runs the deterministic protocol simulation.
//
//   dsvm-sim --seed N          one run; replays a failure exactly
//   dsvm-sim --seeds A-B       every seed from A to B
//   dsvm-sim --random K        K fresh seeds (printed, so a failure replays)
//   --steps S                  steps per run (default 20000)
//   --verbose                  print every delivered message
//   --harsh                    every run loses nodes, more drops and evictions
//
// Ends with "N passed, M failed"; exits non-zero on any failure.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tests/sim/simulation.h"

namespace {

bool ParseU64(const char* s, uint64_t* out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0') return false;
  *out = v;
  return true;
}

int Usage() {
  std::fprintf(stderr,
               "usage: dsvm-sim (--seed N | --seeds A-B | --random K) [--steps S] [--verbose] "
               "[--harsh] [--expect-direct-reads]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<uint64_t> seeds;
  uint64_t steps = 20000;
  bool verbose = false;
  bool harsh = false;
  bool expect_direct = false;  // fail when no direct read was installed in all the runs
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    uint64_t v = 0;
    if (a == "--seed" && next && ParseU64(next, &v)) {
      seeds.push_back(v);
      ++i;
    } else if (a == "--seeds" && next) {
      std::string r = next;
      size_t dash = r.find('-');
      uint64_t lo = 0, hi = 0;
      if (dash == std::string::npos || !ParseU64(r.substr(0, dash).c_str(), &lo) ||
          !ParseU64(r.substr(dash + 1).c_str(), &hi) || hi < lo || hi - lo > 1000000) {
        return Usage();
      }
      for (uint64_t s = lo; s <= hi; ++s) seeds.push_back(s);
      ++i;
    } else if (a == "--random" && next && ParseU64(next, &v) && v <= 1000000) {
      std::random_device rd;
      uint64_t base = (uint64_t{rd()} << 32) ^ rd() ^
                      static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
      std::mt19937_64 g(base);
      for (uint64_t k = 0; k < v; ++k) seeds.push_back(g() >> 1);
      ++i;
    } else if (a == "--steps" && next && ParseU64(next, &v) && v > 0) {
      steps = v;
      ++i;
    } else if (a == "--verbose") {
      verbose = true;
    } else if (a == "--harsh") {
      harsh = true;
    } else if (a == "--expect-direct-reads") {
      expect_direct = true;
    } else {
      return Usage();
    }
  }
  if (seeds.empty()) return Usage();

  uint64_t passed = 0, failed = 0, messages = 0, runs = 0, transactions = 0, crashes = 0;
  uint64_t direct_asks = 0, direct_served = 0, direct_installs = 0, fetch_sends_skipped = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (uint64_t seed : seeds) {
    dsvm::sim::SimConfig c = dsvm::sim::ConfigForSeed(seed, harsh);
    c.steps = steps;
    c.verbose = verbose;
    dsvm::sim::SimResult r = dsvm::sim::RunSimulation(c);
    messages += r.messages;
    runs += r.runs;
    transactions += r.transactions;
    crashes += r.crashes;
    direct_asks += r.direct_asks;
    direct_served += r.direct_served;
    direct_installs += r.direct_installs;
    fetch_sends_skipped += r.fetch_sends_skipped;
    if (r.ok) {
      ++passed;
    } else {
      ++failed;
      std::printf("FAIL seed=%llu nodes=%u shards=%u pages=%u: %s\n  replay: dsvm-sim --seed %llu --steps %llu%s\n",
                  static_cast<unsigned long long>(seed), c.nodes, c.shards, c.pages,
                  r.failure.c_str(), static_cast<unsigned long long>(seed),
                  static_cast<unsigned long long>(steps), harsh ? " --harsh" : "");
    }
    if (seeds.size() == 1) {
      std::printf("seed=%llu nodes=%u shards=%u pages=%u reads=%llu writes=%llu messages=%llu "
                  "dropped=%llu duplicated=%llu runs=%llu crashes=%llu evictions=%llu transactions=%llu "
                  "direct_asks=%llu direct_installs=%llu\n",
                  static_cast<unsigned long long>(seed), c.nodes, c.shards, c.pages,
                  (unsigned long long)r.reads, (unsigned long long)r.writes,
                  (unsigned long long)r.messages, (unsigned long long)r.dropped,
                  (unsigned long long)r.duplicated, (unsigned long long)r.runs,
                  (unsigned long long)r.crashes,
                  (unsigned long long)r.evictions, (unsigned long long)r.transactions,
                  (unsigned long long)r.direct_asks, (unsigned long long)r.direct_installs);
    }
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("dsvm-sim: %llu runs in %.1f s, %llu messages (%llu PageRuns), %llu transactions, "
              "%llu directory crashes, direct reads: %llu asked, %llu served, %llu installed, "
              "%llu Fetch sends skipped\n",
              (unsigned long long)seeds.size(), secs, (unsigned long long)messages,
              (unsigned long long)runs,
              (unsigned long long)transactions, (unsigned long long)crashes,
              (unsigned long long)direct_asks, (unsigned long long)direct_served,
              (unsigned long long)direct_installs, (unsigned long long)fetch_sends_skipped);
  std::printf("%llu passed, %llu failed\n", (unsigned long long)passed, (unsigned long long)failed);
  if (expect_direct && direct_installs == 0) {
    std::printf("FAIL: no grant was installed from a direct read's bytes\n");
    return 1;
  }
  if (expect_direct && fetch_sends_skipped == 0) {
    std::printf("FAIL: no Fetch was answered by a direct read's copy\n");
    return 1;
  }
  return failed == 0 ? 0 : 1;
}
