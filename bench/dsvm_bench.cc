// dsvm-bench: throughput benchmarks. Each subcommand prints JSON lines
// {"name": …, "value": …, "unit": …} on stdout, nothing else; progress and
// errors go to stderr. Figures and how they were taken: docs/PERFORMANCE.md.
//
//   dsvm-bench directory [--quick] [--coordinator-bin PATH | --coordinator HOST:PORT]
//                        [--skip-loopback]
//   dsvm-bench fault-latency [--quick] [--pages N] [--tls UCX_TLS]...
//                            [--direct-reads on|off|both]
//   dsvm-bench fault-latency --backend=kmod [--quick] [--pages N]
//                            [--node-bin PATH] [--coordinator-bin PATH] [--clients-exit]
//                            [--busy-poll-us N] [--fault-poll-us N]
//   dsvm-bench scan [--quick] [--size BYTES] [--fault-size BYTES] [--page-size BYTES]
//                   [--tls UCX_TLS]... [--node-bin PATH] [--coordinator-bin PATH]
//                   [--busy-poll-us N] [--fault-poll-us N] [--zero-copy auto|on|off]
//
//   dsvm-bench gpu [--quick] [--backend auto|cuda|emulated] [--size BYTES]
//                  [--page-size BYTES] [--gpu-budget BYTES] [--chunk BYTES]
//                  [--skip-oversub] [--skip-migration] [--bags N] [--copy-threads N]
//                  [--direct-copies on|off|both]
//                  [--node-bin PATH] [--coordinator-bin PATH]
//
// --busy-poll-us N starts the coordinator and the daemons with that flag
// (they poll for N us after any work before sleeping); the dsvm metrics
// then carry ".poll" after the transport in their names. --fault-poll-us N
// gives the daemons that flag (poll up to N us while a client's fault
// waits on the network; without it, the daemon's default); the metrics
// then carry ".fpoll<N>".
//
// `directory` (issue #2): the page directory in process (PageDirectory driven
// by simulated nodes, against a bare unordered_map update), then through a
// dsvm-coordinator on loopback (against Heartbeat round trips). The
// coordinator is started from ../coordinator/dsvm-coordinator next to this
// binary unless --coordinator names a running one; the loopback part is
// skipped, with a note, when that binary does not exist. --quick runs every
// check on a few rounds (for CI): its figures mean nothing.
//
// `fault-latency` (issue #3): page faults of client processes served by
// three dsvm-node daemons (remote read, remote write that invalidates a
// sharer, local accesses), against a hand-made userfaultfd + UCX floor in
// the same run, once per --tls value (default: tcp, then sm,tcp; always
// with UCX_NET_DEVICES=lo). The binaries are taken from ../node/ and
// ../coordinator/ next to this one. --quick: 64 pages, tcp only, every
// check (for CI). Skipped, exit 0, when userfaultfd cannot be used.
// --clients-exit: each client process exits when done rather than at the
// end (shows what closed client connections cost today's dsvm-node).
// --direct-reads: the daemons' setting (proto/PROTOCOL.md, "Direct reads");
// both (default) runs a cluster with each, off first, and prints the remote
// read's median of one against the other.

// `fault-latency --backend=kmod` (issue #4): the node's local fault paths
// instead, where dsvm.ko is loaded: a fault the module resolves itself
// against a native anonymous fault and the uffd backend's local minor
// fault, same run (bench/kmod_fault.h; 2048 pages, --quick 256).
//
// `scan` (issue #3): a sequential read of a region node A holds, by a
// client of node B, in GB/s: faulting every page, after dsvm_prefetch, and
// with read-mostly advice; against raw UCX bandwidth between two processes
// in the same run (bench/scan.h). Per --tls value (default tcp). --size:
// bytes per variant (default 1G; K, M and G suffixes are powers of 2);
// --fault-size: a smaller size for the fault variant alone; --page-size
// 4096 (default), 65536 or 2097152. --quick: 64M, for CI. Skipped, exit 0,
// when userfaultfd cannot be used.
//
// `gpu` (issue #5): page migration through the GPU tier against raw copies
// (--size, --page-size), then the oversubscribed embedding gather through a
// dsvm-node of its own (--gpu-budget, default 256M; the table is three
// budgets; --chunk, default 64M, per dsvm_gpu_map) against zero-copy and a
// hand-written staging loop (bench/gpu.h). --backend auto takes cuda where a
// GPU answers, else emulated. --quick: 32M migrated, an 8M budget, for CI.
// --skip-oversub: the migration part alone; --skip-migration: the other
// alone. --bags N: bags of 64 lookups per batch (default 8192; the
// "reuse" metric says what share of the table's bytes a batch looks up).
// The oversubscribed part is skipped, with a note, where userfaultfd
// cannot be used.
//
// `fence` (leases, proto/PROTOCOL.md): what a node's fence costs, the
// bytes of a region's pages moved out of its memfd (--size, default 1G;
// --page-size) against moving them page by page and against a plain copy
// into fresh memory, same run; then, unless --store-only, the fence of a
// dsvm-node whose client maps the region, its coordinator stopped until
// the lease lapses (bench/fence.h). --quick: 64M.
//
// Exit status: 0 when every check passed (or the run was skipped), 1 when
// one failed, 2 on bad usage.
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/directory_inprocess.h"
#include "bench/directory_loopback.h"
#include "bench/fence.h"
#include "bench/fault_latency.h"
#include "bench/gpu.h"
#include "bench/kmod_fault.h"
#include "bench/scan.h"

namespace {

int Usage() {
  std::fprintf(stderr,
               "usage: dsvm-bench directory [--quick] [--skip-loopback]\n"
               "                            [--coordinator-bin PATH | --coordinator HOST:PORT]\n"
               "       dsvm-bench fault-latency [--quick] [--pages N] [--tls UCX_TLS]...\n"
               "                                [--node-bin PATH] [--coordinator-bin PATH]\n"
               "                                [--busy-poll-us N] [--fault-poll-us N]\n"
               "                                [--clients-exit] [--direct-reads on|off|both]\n"
               "       dsvm-bench fault-latency --backend=kmod [--quick] [--pages N]\n"
               "       dsvm-bench scan [--quick] [--size BYTES] [--fault-size BYTES]\n"
               "                       [--page-size 4096|65536|2097152] [--tls UCX_TLS]...\n"
               "                       [--node-bin PATH] [--coordinator-bin PATH]\n"
               "                       [--busy-poll-us N] [--fault-poll-us N]\n"
               "                       [--zero-copy auto|on|off]\n"
               "       dsvm-bench gpu [--quick] [--backend auto|cuda|emulated] [--size BYTES]\n"
               "                      [--page-size 4096|65536|2097152] [--gpu-budget BYTES]\n"
               "                      [--chunk BYTES] [--skip-oversub] [--skip-migration]\n"
               "                      [--bags N] [--copy-threads N] [--direct-copies on|off|both]\n"
               "                      [--node-bin PATH] [--coordinator-bin PATH]\n"
               "       dsvm-bench fence [--quick] [--size BYTES]\n"
               "                        [--page-size 4096|65536|2097152] [--store-only]\n"
               "                        [--node-bin PATH] [--coordinator-bin PATH]\n");
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

// The flags of the subcommands that start a cluster: --tls UCX_TLS (again
// for more), --node-bin PATH, --coordinator-bin PATH, --busy-poll-us N,
// --fault-poll-us N. True when argv[*i] is one of them (and valid); *i is
// then left on its value.
bool ClusterFlag(int argc, char** argv, int* i, std::vector<std::string>* transports,
                 std::string* node_binary, std::string* coordinator_binary,
                 uint32_t* busy_poll_us, int64_t* fault_poll_us) {
  const std::string a = argv[*i];
  const char* next = *i + 1 < argc ? argv[*i + 1] : nullptr;
  if (next == nullptr) return false;
  if (a == "--tls" && *next != '\0') {
    transports->push_back(next);
  } else if (a == "--node-bin") {
    *node_binary = next;
  } else if (a == "--coordinator-bin") {
    *coordinator_binary = next;
  } else if (a == "--busy-poll-us") {
    char* end = nullptr;
    const unsigned long v = std::strtoul(next, &end, 10);
    if (*next == '\0' || *end != '\0' || v > 1000000) return false;
    *busy_poll_us = static_cast<uint32_t>(v);
  } else if (a == "--fault-poll-us") {
    char* end = nullptr;
    const unsigned long v = std::strtoul(next, &end, 10);
    if (*next == '\0' || *end != '\0' || v > 1000000) return false;
    *fault_poll_us = static_cast<int64_t>(v);
  } else {
    return false;
  }
  ++*i;
  return true;
}

int RunFaultLatency(int argc, char** argv) {
  dsvm::bench::FaultLatencyOptions o;
  bool quick = false, kmod = false;
  size_t pages = 0;
  std::vector<std::string> transports;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--quick") {
      quick = true;
    } else if (a == "--pages" && next != nullptr) {
      char* end = nullptr;
      const unsigned long long v = std::strtoull(next, &end, 10);
      if (*next == '\0' || *end != '\0' || v == 0 || v > 100000) return Usage();
      pages = static_cast<size_t>(v);
      ++i;
    } else if (a == "--clients-exit") {
      o.clients_exit = true;
    } else if (a == "--direct-reads" && next != nullptr &&
               (std::string(next) == "on" || std::string(next) == "off" ||
                std::string(next) == "both")) {
      if (std::string(next) != "both") o.direct_reads = {next};
      ++i;
    } else if (a == "--backend=kmod" || (a == "--backend" && next != nullptr &&
                                         std::string(next) == "kmod")) {
      kmod = true;
      if (a == "--backend") ++i;
    } else if (ClusterFlag(argc, argv, &i, &transports, &o.node_binary, &o.coordinator_binary,
                           &o.busy_poll_us, &o.fault_poll_us)) {
      continue;
    } else {
      return Usage();
    }
  }
  // The local fault paths of dsvm.ko (issue #4): needs the module loaded.
  if (kmod) return dsvm::bench::RunKmodFaultBench(pages != 0 ? pages : quick ? 256 : 2048);
  if (quick) {
    o.pages = 64;
    o.warmup_pages = 4;
    o.transports = {"tcp"};
    o.child_timeout_s = 20;
  }
  if (pages != 0) o.pages = pages;
  if (!transports.empty()) o.transports = transports;
  bool skipped = false;
  const dsvm::Status s = dsvm::bench::RunFaultLatency(o, &skipped);
  if (!s.ok()) {
    std::fprintf(stderr, "dsvm-bench fault-latency: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

// "1073741824", "1G", "64M", "4K" (powers of 2). False when it is none of
// these, or 0, or above 2^40.
bool ParseBytes(const char* text, uint64_t* bytes) {
  char* end = nullptr;
  errno = 0;
  uint64_t v = std::strtoull(text, &end, 10);
  if (end == text || errno != 0 || *text == '-') return false;
  const std::string unit = end;
  int shift = 0;
  if (unit == "K") {
    shift = 10;
  } else if (unit == "M") {
    shift = 20;
  } else if (unit == "G") {
    shift = 30;
  } else if (!unit.empty()) {
    return false;
  }
  if (v == 0 || v > (uint64_t{1} << (40 - shift))) return false;
  *bytes = v << shift;
  return true;
}

int RunScan(int argc, char** argv) {
  dsvm::bench::ScanOptions o;
  bool quick = false;
  uint64_t size = 0, fault_size = 0, page_size = 0;
  std::vector<std::string> transports;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--quick") {
      quick = true;
    } else if ((a == "--size" || a == "--fault-size" || a == "--page-size") && next != nullptr) {
      uint64_t* out = a == "--size" ? &size : a == "--fault-size" ? &fault_size : &page_size;
      if (!ParseBytes(next, out)) return Usage();
      ++i;
    } else if (a == "--zero-copy" && next != nullptr) {
      o.zero_copy = next;
      if (o.zero_copy != "auto" && o.zero_copy != "on" && o.zero_copy != "off") return Usage();
      ++i;
    } else if (ClusterFlag(argc, argv, &i, &transports, &o.node_binary, &o.coordinator_binary,
                           &o.busy_poll_us, &o.fault_poll_us)) {
      continue;
    } else {
      return Usage();
    }
  }
  if (quick) {
    o.bytes = uint64_t{64} << 20;
    o.child_timeout_s = 60;
  }
  if (size != 0) o.bytes = size;
  if (fault_size != 0) o.fault_bytes = fault_size;
  if (page_size != 0) o.page_size = page_size;
  if (!transports.empty()) o.transports = transports;
  bool skipped = false;
  const dsvm::Status s = dsvm::bench::RunScan(o, &skipped);
  if (s.code() == dsvm::StatusCode::kInvalidArgument) {
    std::fprintf(stderr, "dsvm-bench scan: %s\n", s.message().c_str());
    return Usage();
  }
  if (!s.ok()) {
    std::fprintf(stderr, "dsvm-bench scan: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int RunGpuBench(int argc, char** argv) {
  dsvm::bench::GpuBenchOptions o;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    uint64_t v = 0;
    if (a == "--quick") {
      o.bytes = uint64_t{32} << 20;
      o.passes = 1;
      o.gpu_budget = uint64_t{8} << 20;
      o.chunk_bytes = uint64_t{2} << 20;
      o.region_page_size = 65536;
      o.dim = 64;
      o.batches = 2;
      o.bags = 1024;
      o.bag_size = 16;
    } else if (a == "--skip-oversub") {
      o.oversub = false;
    } else if (a == "--skip-migration") {
      o.migration = false;
    } else if (a == "--bags" && next != nullptr && ParseBytes(next, &v) && v >= 1 &&
               v <= (1u << 20)) {
      o.bags = static_cast<uint32_t>(v);
      ++i;
    } else if (a == "--copy-threads" && next != nullptr && ParseBytes(next, &v) && v >= 1 &&
               v <= 64) {
      o.copy_threads = static_cast<uint32_t>(v);
      ++i;
    } else if (a == "--direct-copies" && next != nullptr &&
               (std::strcmp(next, "on") == 0 || std::strcmp(next, "off") == 0 ||
                std::strcmp(next, "both") == 0)) {
      o.direct_copies = next;
      ++i;
    } else if (a == "--backend" && next != nullptr) {
      o.backend = next;
      ++i;
    } else if ((a == "--node-bin" || a == "--coordinator-bin") && next != nullptr) {
      (a == "--node-bin" ? o.node_binary : o.coordinator_binary) = next;
      ++i;
    } else if ((a == "--size" || a == "--page-size" || a == "--gpu-budget" || a == "--chunk") &&
               next != nullptr && ParseBytes(next, &v)) {
      if (a == "--size") {
        o.bytes = v;
      } else if (a == "--gpu-budget") {
        o.gpu_budget = v;
      } else if (a == "--chunk") {
        o.chunk_bytes = v;
      } else {
        if (v > (2u << 20)) return Usage();
        o.page_size = static_cast<uint32_t>(v);
      }
      ++i;
    } else {
      return Usage();
    }
  }
  const dsvm::Status s = dsvm::bench::RunGpu(o);
  if (!s.ok()) {
    std::fprintf(stderr, "dsvm-bench gpu: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

int RunFenceBench(int argc, char** argv) {
  dsvm::bench::FenceOptions o;
  uint64_t size = 0, page_size = 0;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    const char* next = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--quick") {
      o.bytes = uint64_t{64} << 20;
    } else if (a == "--store-only") {
      o.store_only = true;
    } else if ((a == "--size" || a == "--page-size") && next != nullptr) {
      if (!ParseBytes(next, a == "--size" ? &size : &page_size)) return Usage();
      ++i;
    } else if ((a == "--node-bin" || a == "--coordinator-bin") && next != nullptr) {
      (a == "--node-bin" ? o.node_binary : o.coordinator_binary) = next;
      ++i;
    } else {
      return Usage();
    }
  }
  if (size != 0) o.bytes = size;
  if (page_size != 0) {
    if (page_size > 2097152) return Usage();
    o.page_size = static_cast<uint32_t>(page_size);
  }
  const dsvm::Status s = dsvm::bench::RunFence(o);
  if (s.code() == dsvm::StatusCode::kInvalidArgument) {
    std::fprintf(stderr, "dsvm-bench fence: %s\n", s.message().c_str());
    return Usage();
  }
  if (!s.ok()) {
    std::fprintf(stderr, "dsvm-bench fence: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  const std::string command = argv[1];
  if (command == "directory") return RunDirectory(argc, argv);
  if (command == "fault-latency") return RunFaultLatency(argc, argv);
  if (command == "scan") return RunScan(argc, argv);
  if (command == "gpu") return RunGpuBench(argc, argv);
  if (command == "fence") return RunFenceBench(argc, argv);
  return Usage();
}
