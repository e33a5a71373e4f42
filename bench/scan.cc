#include "bench/scan.h"

#include <dsvm/dsvm.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_output.h"
#include "bench/cluster.h"
#include "bench/dsvm_client.h"
#include "bench/forked_child.h"
#include "bench/process_cpu.h"
#include "bench/scan_floor.h"
#include "bench/scan_pattern.h"

namespace dsvm::bench {
namespace {

constexpr int kWriterNode = 0;  // node A: index into Cluster::nodes
constexpr int kReaderNode = 1;  // node B
constexpr uint64_t kRawSeed = 0x5CA7F100;

enum class Variant { kFault, kPrefetch, kReadMostly };
constexpr std::array<Variant, 3> kVariants = {Variant::kFault, Variant::kPrefetch,
                                              Variant::kReadMostly};

const char* Name(Variant v) {
  switch (v) {
    case Variant::kFault:
      return "fault";
    case Variant::kPrefetch:
      return "prefetch";
    case Variant::kReadMostly:
      return "readmostly";
  }
  return "?";
}

// Each variant's region holds its own pattern: a page left over from
// another variant would fail the checksum.
uint64_t Seed(Variant v) { return 0xD5A0 + static_cast<uint64_t>(v); }

double Gbps(uint64_t bytes, double seconds) { return static_cast<double>(bytes) / seconds / 1e9; }

// Bytes of hugetlb pages in use on the whole machine (/proc/meminfo), -1
// when it cannot be read. A node daemon backs a 2 MiB region with hugetlb
// pages when enough are reserved and free, which costs the scan about a
// fifth less CPU per byte (docs/PERFORMANCE.md), so the figures say which
// it was.
double HugetlbBytesInUse() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double total = -1, free = -1, page_kib = -1, value = 0;
  std::string unit;
  while (in >> key >> value) {
    if (key == "HugePages_Total:") total = value;
    if (key == "HugePages_Free:") free = value;
    if (key == "Hugepagesize:") page_kib = value;
    std::getline(in, unit);  // the rest of the line ("kB" or nothing)
  }
  if (total < 0 || free < 0 || page_kib < 0) return -1;
  return (total - free) * page_kib * 1024;
}

uint64_t ProcessFaults() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<uint64_t>(u.ru_minflt + u.ru_majflt);
}

// --- The writer: node A creates the region and fills it ---------------------

struct WriterReport {
  double node = 0;
  double prefetch_s = 0;  // dsvm_prefetch(DSVM_PREFETCH_WRITE) of the region
  double fill_s = 0;      // writing the pattern into pages held Modified

  std::vector<double> ToSeries() const { return {node, prefetch_s, fill_s}; }
  static WriterReport From(const std::vector<double>& s) { return {s.at(0), s.at(1), s.at(2)}; }
};

Status WriteRegion(const std::string& socket, const std::string& name, uint64_t bytes,
                   size_t page_size, uint64_t seed, WriterReport* report) {
  Connection lib;
  DSVM_RETURN_IF_ERROR(lib.Connect(socket));
  uint32_t node = 0;
  DSVM_RETURN_IF_ERROR(Checked(dsvm_node_id(&node), "dsvm_node_id"));
  dsvm_region_attr_t attr{};
  attr.page_size = page_size;
  void* addr = nullptr;
  DSVM_RETURN_IF_ERROR(Checked(dsvm_region_create_attr(name.c_str(), bytes, &attr, &addr),
                               "dsvm_region_create_attr(" + name + ")"));
  // Every page taken Modified at once (dsvm_prefetch keeps many in flight)
  // rather than one write fault per page: the fill is setup, not measured.
  const auto start = Clock::now();
  DSVM_RETURN_IF_ERROR(Checked(dsvm_prefetch(addr, bytes, DSVM_PREFETCH_WRITE),
                               "dsvm_prefetch(DSVM_PREFETCH_WRITE)"));
  const auto prefetched = Clock::now();
  FillWords(static_cast<uint64_t*>(addr), bytes / 8, seed);
  const auto filled = Clock::now();
  DSVM_RETURN_IF_ERROR(Checked(dsvm_region_close(addr), "dsvm_region_close"));
  *report = WriterReport{static_cast<double>(node), SecondsBetween(start, prefetched),
                         SecondsBetween(prefetched, filled)};
  return Status::Ok();
}

// --- The reader: node B reads it, timed ---------------------------------------

struct ReaderReport {
  double node = 0;
  double seconds = 0;     // the timed part: advice or prefetch included
  double prefetch_s = 0;  // the prefetch call alone (prefetch variant)
  double reread_s = 0;    // a second read of the same pages (fault variant)
  // What the reader's node and the process counted during the timed part.
  double read_faults = 0;  // dsvm_stats: reads of pages not valid on the node
  double pages_fetched = 0;
  double prefetched_pages = 0;
  double process_faults = 0;  // getrusage: minor + major page faults
  // CPU seconds used during the timed part by each process on the path.
  double coordinator_cpu_s = 0;
  double owner_cpu_s = 0;      // node A's daemon, which holds the pages
  double requester_cpu_s = 0;  // node B's daemon, which fetches them
  double reader_cpu_s = 0;     // this process
  // Hugetlb pages in use on the machine while both nodes held the region.
  double hugetlb_bytes = 0;

  std::vector<double> ToSeries() const {
    return {node,           seconds,           prefetch_s,        reread_s,
            read_faults,    pages_fetched,     prefetched_pages,  process_faults,
            coordinator_cpu_s, owner_cpu_s,    requester_cpu_s,   reader_cpu_s,
            hugetlb_bytes};
  }
  static ReaderReport From(const std::vector<double>& s) {
    return {s.at(0), s.at(1), s.at(2),  s.at(3),  s.at(4),  s.at(5), s.at(6),
            s.at(7), s.at(8), s.at(9), s.at(10), s.at(11), s.at(12)};
  }
};

// The processes whose CPU time a reader's timed part is charged with.
struct Watched {
  pid_t coordinator = -1;
  pid_t owner = -1;
  pid_t requester = -1;
};

// CPU seconds of the watched processes and this one, in ReaderReport's order.
std::array<double, 4> CpuNow(const Watched& w) {
  return {ProcessCpuSeconds(w.coordinator), ProcessCpuSeconds(w.owner),
          ProcessCpuSeconds(w.requester), ProcessCpuSeconds(::getpid())};
}

Status CheckedSum(const uint64_t* words, size_t n, uint64_t seed, const ScanSum& sum,
                  const char* what) {
  if (sum == ExpectedSum(seed, n)) return Status::Ok();
  const size_t at = FirstWrongWord(words, n, seed);
  char text[200];
  if (at == n) {
    std::snprintf(text, sizeof(text), "%s: wrong checksum, though every word reads right now",
                  what);
  } else {
    std::snprintf(text, sizeof(text), "%s: wrong bytes at offset %zu (%p): %#llx, expected %#llx",
                  what, at * 8, static_cast<const void*>(words + at),
                  static_cast<unsigned long long>(words[at]),
                  static_cast<unsigned long long>(ScanWord(seed, at)));
  }
  return Internal(text);
}

Status ReadRegion(const std::string& socket, const std::string& name, Variant variant,
                  uint64_t bytes, size_t page_size, uint64_t seed, const Watched& watched,
                  ReaderReport* report) {
  Connection lib;
  DSVM_RETURN_IF_ERROR(lib.Connect(socket));
  uint32_t node = 0;
  DSVM_RETURN_IF_ERROR(Checked(dsvm_node_id(&node), "dsvm_node_id"));
  void* addr = nullptr;
  size_t size = 0;
  DSVM_RETURN_IF_ERROR(
      Checked(dsvm_region_open(name.c_str(), &addr, &size), "dsvm_region_open(" + name + ")"));
  if (size != bytes) {
    return Internal("region " + name + " has " + std::to_string(size) + " bytes, not " +
                    std::to_string(bytes));
  }
  const auto* words = static_cast<const uint64_t*>(addr);
  const size_t n = bytes / 8;
  dsvm_node_stats_t before{}, after{};
  DSVM_RETURN_IF_ERROR(Checked(dsvm_stats(&before), "dsvm_stats"));
  const uint64_t faults_before = ProcessFaults();

  const std::array<double, 4> cpu_before = CpuNow(watched);
  const auto start = Clock::now();
  auto prefetched = start;
  if (variant == Variant::kPrefetch) {
    DSVM_RETURN_IF_ERROR(Checked(dsvm_prefetch(addr, bytes, 0), "dsvm_prefetch"));
    prefetched = Clock::now();
  } else if (variant == Variant::kReadMostly) {
    DSVM_RETURN_IF_ERROR(Checked(dsvm_advise(addr, bytes, DSVM_ADVICE_READ_MOSTLY, 0),
                                 "dsvm_advise(DSVM_ADVICE_READ_MOSTLY)"));
  }
  const ScanSum sum = SumWords(words, n);
  const auto end = Clock::now();
  const std::array<double, 4> cpu_after = CpuNow(watched);
  for (size_t i = 0; i < cpu_after.size(); ++i) {
    if (cpu_before[i] < 0 || cpu_after[i] < 0) return Internal("a process's CPU time is unreadable");
  }

  const uint64_t faults = ProcessFaults() - faults_before;
  const double hugetlb_bytes = HugetlbBytesInUse();
  DSVM_RETURN_IF_ERROR(Checked(dsvm_stats(&after), "dsvm_stats"));
  DSVM_RETURN_IF_ERROR(CheckedSum(words, n, seed, sum, "reader"));
  const uint64_t pages = bytes / page_size;
  const uint64_t fetched = after.pages_fetched - before.pages_fetched;
  if (fetched < pages) {
    // Pages valid on node B before the clock started would make this a
    // local read: the bench would measure the wrong thing.
    return Internal("node B fetched " + std::to_string(fetched) + " pages during the read of " +
                    std::to_string(pages));
  }

  double reread_s = 0;
  if (variant == Variant::kFault) {
    const auto again = Clock::now();
    const ScanSum second = SumWords(words, n);
    reread_s = SecondsBetween(again, Clock::now());
    DSVM_RETURN_IF_ERROR(CheckedSum(words, n, seed, second, "reader, second read"));
  }

  DSVM_RETURN_IF_ERROR(Checked(dsvm_region_close(addr), "dsvm_region_close"));
  // Frees the address range for the next variant's region; each daemon
  // drops its copy when a new region opens there.
  DSVM_RETURN_IF_ERROR(
      Checked(dsvm_region_destroy(name.c_str()), "dsvm_region_destroy(" + name + ")"));

  *report = ReaderReport{
      .node = static_cast<double>(node),
      .seconds = SecondsBetween(start, end),
      .prefetch_s = variant == Variant::kPrefetch ? SecondsBetween(start, prefetched) : 0,
      .reread_s = reread_s,
      .read_faults = static_cast<double>(after.read_faults - before.read_faults),
      .pages_fetched = static_cast<double>(fetched),
      .prefetched_pages = static_cast<double>(after.prefetched_pages - before.prefetched_pages),
      .process_faults = static_cast<double>(faults),
      .coordinator_cpu_s = cpu_after[0] - cpu_before[0],
      .owner_cpu_s = cpu_after[1] - cpu_before[1],
      .requester_cpu_s = cpu_after[2] - cpu_before[2],
      .reader_cpu_s = cpu_after[3] - cpu_before[3],
      .hugetlb_bytes = hugetlb_bytes,
  };
  return Status::Ok();
}

// --- One run ----------------------------------------------------------------

// Runs `body` in a client process of node `node_index` (it exits when
// done) and returns what it reported: a WriterReport or a ReaderReport.
template <typename Report>
Result<Report> RunClient(const ScanOptions& o, Cluster& c, int node_index, const std::string& what,
                         const std::function<Status(const std::string& socket, Report*)>& body) {
  const std::string socket = c.nodes[node_index]->socket_path();
  const std::string label = what + " (node " + std::string(1, "AB"[node_index]) + ")";
  const auto start = Clock::now();
  auto r = RunForked(label, o.child_timeout_s, [&](SampleSeries* out) -> Status {
    Report report;
    DSVM_RETURN_IF_ERROR(body(socket, &report));
    out->push_back(report.ToSeries());
    return Status::Ok();
  });
  std::fprintf(stderr, "dsvm-bench: scan: %s: %.2f s\n", label.c_str(),
               SecondsBetween(start, Clock::now()));
  if (!r.ok()) {
    c.PrintLogTails();
    return r.status();
  }
  if (r->size() != 1 || (*r)[0].size() != Report{}.ToSeries().size()) {
    return Internal(label + ": reported the wrong number of figures");
  }
  return Report::From((*r)[0]);
}

Result<ReaderReport> RunVariant(const ScanOptions& o, Cluster& c, Variant v, uint64_t bytes) {
  const std::string region = std::string("bench-scan-") + Name(v);
  const Watched watched{c.coordinator->pid(), c.nodes[kWriterNode]->pid(),
                        c.nodes[kReaderNode]->pid()};
  const uint64_t seed = Seed(v);
  DSVM_ASSIGN_OR_RETURN(WriterReport writer,
                        RunClient<WriterReport>(
                            o, c, kWriterNode, std::string(Name(v)) + ": writer",
                            [&](const std::string& socket, WriterReport* report) {
                              return WriteRegion(socket, region, bytes, o.page_size, seed, report);
                            }));
  std::fprintf(stderr,
               "dsvm-bench: scan: %s: writer took the pages for writing at %.3f GB/s "
               "(dsvm_prefetch), filled them at %.3f GB/s\n",
               Name(v), Gbps(bytes, writer.prefetch_s), Gbps(bytes, writer.fill_s));

  DSVM_ASSIGN_OR_RETURN(
      ReaderReport reader,
      RunClient<ReaderReport>(o, c, kReaderNode, std::string(Name(v)) + ": reader",
                              [&](const std::string& socket, ReaderReport* report) {
                                return ReadRegion(socket, region, v, bytes, o.page_size, seed,
                                                  watched, report);
                              }));
  if (reader.node == writer.node) {
    return Internal(std::string(Name(v)) + ": the writer and the reader ran on the same node");
  }
  const double pages = static_cast<double>(bytes / o.page_size);
  std::fprintf(stderr,
               "dsvm-bench: scan: %s: %.3f s for %.1f MiB, %.3f GB/s; per page: %.3f read "
               "faults at the node, %.3f in the process, %.3f fetched (%.3f by prefetch or "
               "read-ahead)\n",
               Name(v), reader.seconds, static_cast<double>(bytes) / (1 << 20),
               Gbps(bytes, reader.seconds), reader.read_faults / pages,
               reader.process_faults / pages, reader.pages_fetched / pages,
               reader.prefetched_pages / pages);
  std::fprintf(stderr,
               "dsvm-bench: scan: %s: CPU seconds in the timed part: coordinator %.2f, owner "
               "daemon %.2f, requester daemon %.2f, reader %.2f (the timed part: %.2f s)\n",
               Name(v), reader.coordinator_cpu_s, reader.owner_cpu_s, reader.requester_cpu_s,
               reader.reader_cpu_s, reader.seconds);
  if (o.page_size == DSVM_PAGE_SIZE_2M && reader.hugetlb_bytes < 0) {
    std::fprintf(stderr, "dsvm-bench: scan: %s: hugetlb use unknown (/proc/meminfo)\n", Name(v));
  } else if (o.page_size == DSVM_PAGE_SIZE_2M) {
    std::fprintf(stderr,
                 "dsvm-bench: scan: %s: %.1f MiB of hugetlb pages in use on the machine while "
                 "both nodes held the region: %s\n",
                 Name(v), reader.hugetlb_bytes / (1 << 20),
                 reader.hugetlb_bytes >= 2.0 * static_cast<double>(bytes)
                     ? "both copies were hugetlb-backed"
                     : "at least one copy was a plain memfd of 4 KiB pages");
  }
  return reader;
}

std::string PageTag(size_t page_size) {
  switch (page_size) {
    case 4096:
      return "";
    case 65536:
      return ".page64k";
    default:
      return ".page2m";
  }
}

Status RunOneTransport(const ScanOptions& o, const std::string& tls) {
  ::setenv("UCX_TLS", tls.c_str(), 1);
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  std::string tls_tag = tls;
  std::replace(tls_tag.begin(), tls_tag.end(), ',', '_');
  const std::string tag = tls_tag + PageTag(o.page_size) + (o.busy_poll_us > 0 ? ".poll" : "") +
                          (o.fault_poll_us >= 0 ? ".fpoll" + std::to_string(o.fault_poll_us) : "") +
                          (o.zero_copy.empty() ? "" : ".zc_" + o.zero_copy);
  const uint64_t fault_bytes = o.fault_bytes != 0 ? o.fault_bytes : o.bytes;
  auto bytes_of = [&](Variant v) { return v == Variant::kFault ? fault_bytes : o.bytes; };
  std::fprintf(stderr,
               "dsvm-bench: scan: UCX_TLS=%s UCX_NET_DEVICES=lo, %.1f MiB per variant "
               "(fault: %.1f MiB), pages of %zu bytes\n",
               tls.c_str(), static_cast<double>(o.bytes) / (1 << 20),
               static_cast<double>(fault_bytes) / (1 << 20), o.page_size);

  Cluster cluster;
  auto fail = [&](Status st) {
    cluster.Stop().IgnoreError();  // `st` is the error to report
    return st;
  };
  Status st = StartCluster(ClusterOptions{.nodes = 2,
                                          .node_binary = o.node_binary,
                                          .coordinator_binary = o.coordinator_binary,
                                          .dir_prefix = "dsvm-scan",
                                          .busy_poll_us = o.busy_poll_us,
                                          .fault_poll_us = o.fault_poll_us,
                                          .zero_copy = o.zero_copy},
                           &cluster);
  if (!st.ok()) return fail(st);

  // The floor first, with the cluster idle beside it (same background).
  RawBandwidthOptions raw;
  raw.bytes = o.bytes;
  raw.passes = o.raw_passes;
  raw.seed = kRawSeed;
  const std::string raw_what = "raw UCX floor (UCX_TLS=" + tls + ")";
  const auto raw_start = Clock::now();
  auto floor = RunForked(raw_what, o.child_timeout_s, [&](SampleSeries* out) -> Status {
    std::vector<double> seconds;
    DSVM_RETURN_IF_ERROR(MeasureRawBandwidth(raw, &seconds));
    out->push_back(std::move(seconds));
    return Status::Ok();
  });
  std::fprintf(stderr, "dsvm-bench: scan: %s: %.2f s\n", raw_what.c_str(),
               SecondsBetween(raw_start, Clock::now()));
  if (!floor.ok()) return fail(floor.status());
  const std::vector<double>& passes = (*floor)[0];
  if (passes.empty()) return fail(Internal("the floor reported no pass"));
  for (double s : passes) {
    std::fprintf(stderr, "dsvm-bench: scan: raw UCX pass: %.3f s, %.3f GB/s\n", s,
                 Gbps(o.bytes, s));
  }
  const double raw_gbps = Gbps(o.bytes, *std::min_element(passes.begin(), passes.end()));

  std::array<ReaderReport, kVariants.size()> results;
  for (size_t i = 0; i < kVariants.size(); ++i) {
    auto r = RunVariant(o, cluster, kVariants[i], bytes_of(kVariants[i]));
    if (!r.ok()) return fail(r.status());
    results[i] = *r;
  }
  DSVM_RETURN_IF_ERROR(cluster.Stop());

  EmitMetric("raw_ucx." + tls_tag + ".bytes", static_cast<double>(o.bytes), "bytes");
  EmitMetric("raw_ucx." + tls_tag + ".gbps", raw_gbps, "GB/s");
  for (size_t i = 0; i < kVariants.size(); ++i) {
    const std::string prefix = std::string("scan.") + Name(kVariants[i]) + "." + tag;
    const uint64_t bytes = bytes_of(kVariants[i]);
    const double gbps = Gbps(bytes, results[i].seconds);
    EmitMetric(prefix + ".bytes", static_cast<double>(bytes), "bytes");
    EmitMetric(prefix + ".gbps", gbps, "GB/s");
    EmitMetric(prefix + ".vs_raw_ucx", gbps / raw_gbps, "ratio");
    if (kVariants[i] == Variant::kPrefetch) {
      EmitMetric(prefix + ".prefetch_call_gbps", Gbps(bytes, results[i].prefetch_s), "GB/s");
    }
    // CPU per byte moved: what the path costs whatever the scheduler does.
    const ReaderReport& r = results[i];
    const double gb = static_cast<double>(bytes) / 1e9;
    EmitMetric(prefix + ".cpu_s_per_gb",
               (r.coordinator_cpu_s + r.owner_cpu_s + r.requester_cpu_s + r.reader_cpu_s) / gb,
               "s/GB");
    EmitMetric(prefix + ".coordinator_cpu_s_per_gb", r.coordinator_cpu_s / gb, "s/GB");
    EmitMetric(prefix + ".owner_cpu_s_per_gb", r.owner_cpu_s / gb, "s/GB");
    EmitMetric(prefix + ".requester_cpu_s_per_gb", r.requester_cpu_s / gb, "s/GB");
    EmitMetric(prefix + ".reader_cpu_s_per_gb", r.reader_cpu_s / gb, "s/GB");
    if (kVariants[i] == Variant::kFault) {
      EmitMetric("scan.local_reread." + tag + ".gbps", Gbps(bytes, results[i].reread_s), "GB/s");
    }
    if (o.page_size == DSVM_PAGE_SIZE_2M) {
      EmitMetric(prefix + ".hugetlb_bytes", r.hugetlb_bytes, "bytes");
    }
  }
  return Status::Ok();
}

}  // namespace

Status RunScan(const ScanOptions& options, bool* skipped) {
  *skipped = false;
  ScanOptions o = options;
  const size_t ps = o.page_size;
  if (ps != DSVM_PAGE_SIZE_4K && ps != DSVM_PAGE_SIZE_64K && ps != DSVM_PAGE_SIZE_2M) {
    return InvalidArgument("page size " + std::to_string(ps) + ": 4096, 65536 or 2097152");
  }
  if (o.bytes == 0 || o.bytes % ps != 0 || o.fault_bytes % ps != 0) {
    return InvalidArgument("sizes must be whole pages of " + std::to_string(ps) + " bytes");
  }
  if (o.transports.empty() || o.raw_passes <= 0) return InvalidArgument("nothing to measure");
  if (!UffdUsableOrSaySkip("dsvm-bench scan")) {
    *skipped = true;
    return Status::Ok();
  }
  DSVM_RETURN_IF_ERROR(ResolveBinaries(&o.node_binary, &o.coordinator_binary));
  for (const std::string& tls : o.transports) DSVM_RETURN_IF_ERROR(RunOneTransport(o, tls));
  return Status::Ok();
}

}  // namespace dsvm::bench
