#include "bench/fence.h"

#include <signal.h>
#include <sys/uio.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_output.h"
#include "bench/cluster.h"
#include "bench/dsvm_client.h"
#include "bench/forked_child.h"
#include "node/memory/page_store.h"

namespace dsvm::bench {
namespace {

constexpr node::PageAddr kBase = 0x200000000000;

uint64_t Word(uint64_t page, uint64_t i) { return (page * 0x9e3779b97f4a7c15ull) ^ i; }

Status Fill(node::PageStore& s) {
  const uint32_t ps = s.page_size();
  std::vector<uint8_t> buf(ps);
  for (uint64_t p = 0; p < s.page_count(); ++p) {
    auto* w = reinterpret_cast<uint64_t*>(buf.data());
    for (uint64_t i = 0; i < ps / 8; ++i) w[i] = Word(p, i);
    DSVM_RETURN_IF_ERROR(s.WritePage(kBase + p * ps, buf));
  }
  return Status::Ok();
}

// Restores every page and checks its bytes.
Status RestoreAndCheck(node::PageStore& s) {
  const uint32_t ps = s.page_size();
  std::vector<uint8_t> buf(ps);
  for (uint64_t p = 0; p < s.page_count(); ++p) {
    const node::PageAddr page = kBase + p * ps;
    if (!s.IsRetained(page)) return DataLoss("page " + std::to_string(p) + " was not retained");
    DSVM_RETURN_IF_ERROR(s.Restore(page));
    DSVM_RETURN_IF_ERROR(s.ReadPage(page, buf));
    const auto* w = reinterpret_cast<const uint64_t*>(buf.data());
    for (uint64_t i = 0; i < ps / 8; ++i) {
      if (w[i] != Word(p, i)) {
        return DataLoss("page " + std::to_string(p) + " word " + std::to_string(i) + " changed");
      }
    }
  }
  return Status::Ok();
}

std::string Tag(uint32_t page_size) {
  return page_size == 4096 ? "page4k" : page_size == 65536 ? "page64k" : "page2m";
}

// What a daemon's log says its fences did (NodeDaemon::Fence's lines).
struct FenceLines {
  uint64_t pages = 0;
  uint64_t ms = 0;
  int early = 0;     // "... taken from local processes now (in ...": before the lapse
  bool lapse = false;  // the fence at the lapse was logged
};

// The number that ends just before `at` in `line` (0 if none).
uint64_t NumberBefore(const std::string& line, size_t at) {
  size_t b = at;
  while (b > 0 && line[b - 1] >= '0' && line[b - 1] <= '9') --b;
  return b == at ? 0 : std::stoull(line.substr(b, at - b));
}

// Reads the fence lines logged in `path` past byte `from`.
FenceLines ReadFenceLines(const std::string& path, std::streamoff from) {
  FenceLines f;
  std::ifstream in(path);
  in.seekg(from);
  const std::string taken = " pages were taken from local processes";
  for (std::string line; std::getline(in, line);) {
    const size_t at = line.find(taken);
    if (at == std::string::npos) continue;
    const size_t in_at = line.find("(in ", at);
    const size_t ms_at = in_at == std::string::npos ? std::string::npos : line.find(" ms)", in_at);
    if (ms_at == std::string::npos) continue;
    f.pages += NumberBefore(line, at);
    f.ms += NumberBefore(line, ms_at);
    if (line.compare(at + taken.size(), 4, " now") == 0) {
      ++f.early;
    } else {
      f.lapse = true;
    }
  }
  return f;
}

std::streamoff FileSize(const std::string& path) {
  std::ifstream in(path, std::ios::ate);
  return in ? static_cast<std::streamoff>(in.tellg()) : 0;
}

// A client process writes (or, `check`, reads back and checks) every word
// of region "fence", created when writing.
Status WriteOrCheckRegion(const std::string& socket, const FenceOptions& o, bool check) {
  Connection lib;
  DSVM_RETURN_IF_ERROR(lib.Connect(socket));
  void* addr = nullptr;
  if (check) {
    DSVM_RETURN_IF_ERROR(Checked(dsvm_region_open("fence", &addr, nullptr), "dsvm_region_open"));
  } else {
    dsvm_region_attr_t attr{};
    attr.page_size = o.page_size;
    DSVM_RETURN_IF_ERROR(
        Checked(dsvm_region_create_attr("fence", o.bytes, &attr, &addr), "dsvm_region_create_attr"));
    // Every page Modified at once; then the writes map them writable.
    DSVM_RETURN_IF_ERROR(
        Checked(dsvm_prefetch(addr, o.bytes, DSVM_PREFETCH_WRITE), "dsvm_prefetch(WRITE)"));
  }
  auto* w = static_cast<uint64_t*>(addr);
  const uint64_t per_page = o.page_size / 8;
  for (uint64_t p = 0; p < o.bytes / o.page_size; ++p) {
    for (uint64_t i = 0; i < per_page; ++i) {
      if (!check) {
        w[p * per_page + i] = Word(p, i);
      } else if (w[p * per_page + i] != Word(p, i)) {
        return DataLoss("after the fence, page " + std::to_string(p) + " word " +
                        std::to_string(i) + " is wrong");
      }
    }
  }
  return Status::Ok();  // the writer stays, its pages mapped, until released
}

Status RunDaemonFence(FenceOptions o, double retain_range_gbps) {
  if (!UffdUsableOrSaySkip("dsvm-bench fence")) return Status::Ok();
  DSVM_RETURN_IF_ERROR(ResolveBinaries(&o.node_binary, &o.coordinator_binary));
  ClusterOptions co;
  co.nodes = 1;
  co.node_binary = o.node_binary;
  co.coordinator_binary = o.coordinator_binary;
  co.dir_prefix = "dsvm-bench-fence";
  Cluster c;
  Status run = [&]() -> Status {
    DSVM_RETURN_IF_ERROR(StartCluster(co, &c));
    const std::string socket = c.nodes[0]->socket_path();
    DSVM_ASSIGN_OR_RETURN(std::unique_ptr<ForkedChild> writer,
                          ForkedChild::Start("fence writer", [&](SampleSeries*) {
                            return WriteOrCheckRegion(socket, o, /*check=*/false);
                          }));
    DSVM_RETURN_IF_ERROR(writer->Collect(300).status());
    c.clients.push_back(std::move(writer));  // its pages stay mapped

    // The coordinator stands still: no heartbeat is answered, the node's
    // lease lapses, and it fences (early too, if it holds much).
    const std::string log = c.dir.path() + "/node1.log";
    const std::streamoff from = FileSize(log);
    DSVM_RETURN_IF_ERROR(c.coordinator->Signal(SIGSTOP));
    FenceLines f;
    for (int i = 0; i < 400 && !f.lapse; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      f = ReadFenceLines(log, from);
    }
    DSVM_RETURN_IF_ERROR(c.coordinator->Signal(SIGCONT));
    if (!f.lapse) return Unavailable("the node logged no fence within 20 s of its coordinator stopping");

    // The accesses the fence held go on once the coordinator answers.
    DSVM_ASSIGN_OR_RETURN(std::unique_ptr<ForkedChild> reader,
                          ForkedChild::Start("fence reader", [&](SampleSeries*) {
                            return WriteOrCheckRegion(socket, o, /*check=*/true);
                          }));
    DSVM_RETURN_IF_ERROR(reader->Collect(300).status());
    c.clients.push_back(std::move(reader));

    const std::string tag = Tag(o.page_size);
    const double bytes = static_cast<double>(f.pages) * o.page_size;
    const double seconds = std::max<double>(static_cast<double>(f.ms), 1.0) / 1e3;  // ms resolution
    EmitMetric("fence.daemon." + tag + ".gbps", bytes / 1e9 / seconds, "GB/s");
    EmitMetric("fence.daemon." + tag + ".ms_per_gib",
               seconds * 1e3 * static_cast<double>(uint64_t{1} << 30) / std::max(bytes, 1.0), "ms");
    EmitMetric("fence.daemon." + tag + ".vs_retain_range", bytes / 1e9 / seconds / retain_range_gbps,
               "ratio");
    EmitMetric("fence.daemon." + tag + ".pages", static_cast<double>(f.pages), "pages");
    EmitMetric("fence.daemon." + tag + ".early_fences", f.early, "count");
    if (f.pages < o.bytes / o.page_size) {
      return DataLoss("the fences took " + std::to_string(f.pages) + " pages of " +
                      std::to_string(o.bytes / o.page_size) + " mapped");
    }
    return Status::Ok();
  }();
  if (!run.ok()) c.PrintLogTails();
  Status stopped = c.Stop();
  return run.ok() ? stopped : run;
}

}  // namespace

Status RunFence(const FenceOptions& o) {
  if (o.page_size != 4096 && o.page_size != 65536 && o.page_size != 2097152) {
    return InvalidArgument("page size " + std::to_string(o.page_size) +
                           " is none of 4096, 65536 and 2097152");
  }
  if (o.bytes == 0 || o.bytes % o.page_size != 0) {
    return InvalidArgument(std::to_string(o.bytes) + " bytes are not a positive multiple of " +
                           std::to_string(o.page_size));
  }
  // A plain memfd, as a node without reserved hugetlb pages has.
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<node::PageStore> s,
                        node::PageStore::Create(kBase, o.bytes, o.page_size, {.try_hugetlb = false}));
  const uint64_t pages = s->page_count();
  double range_s = 1e30, each_s = 1e30, copy_s = 1e30;
  for (int round = 0; round < o.rounds; ++round) {
    DSVM_RETURN_IF_ERROR(Fill(*s));
    Clock::time_point t0 = Clock::now();
    DSVM_RETURN_IF_ERROR(s->RetainRange(kBase, pages));
    range_s = std::min(range_s, SecondsBetween(t0, Clock::now()));
    for (uint64_t p = 0; p < pages; p += 61) {  // moved, not copied: the memfd has holes
      DSVM_ASSIGN_OR_RETURN(const bool present, s->IsPresent(kBase + p * o.page_size));
      if (present) return DataLoss("page " + std::to_string(p) + " is still in the memfd");
    }
    DSVM_RETURN_IF_ERROR(RestoreAndCheck(*s));

    t0 = Clock::now();
    for (uint64_t p = 0; p < pages; ++p) DSVM_RETURN_IF_ERROR(s->Retain(kBase + p * o.page_size));
    each_s = std::min(each_s, SecondsBetween(t0, Clock::now()));
    DSVM_RETURN_IF_ERROR(RestoreAndCheck(*s));

    // The floor: the same bytes read into fresh buffers of a page each as
    // RetainRange reads them (one preadv per run of up to 16 MiB), without
    // the punch that makes it a move.
    std::vector<std::unique_ptr<uint8_t[]>> copies(pages);
    const uint64_t run_pages = std::max<uint64_t>(1, std::min<uint64_t>(IOV_MAX, (16u << 20) / o.page_size));
    t0 = Clock::now();
    for (uint64_t p = 0; p < pages; p += run_pages) {
      const uint64_t n = std::min(run_pages, pages - p);
      std::vector<iovec> iov(n);
      for (uint64_t k = 0; k < n; ++k) {
        copies[p + k].reset(new uint8_t[o.page_size]);
        iov[k] = {copies[p + k].get(), o.page_size};
      }
      const ssize_t got = ::preadv(s->fd(), iov.data(), static_cast<int>(n),
                                   static_cast<off_t>(p * o.page_size));
      if (got != static_cast<ssize_t>(n * o.page_size)) return IoError("preadv of the memfd");
    }
    copy_s = std::min(copy_s, SecondsBetween(t0, Clock::now()));
    for (uint64_t p = 0; p < pages; ++p) {
      const auto* w = reinterpret_cast<const uint64_t*>(copies[p].get());
      for (uint64_t i = 0; i < o.page_size / 8; ++i) {
        if (w[i] != Word(p, i)) return DataLoss("the floor's copy of page " + std::to_string(p) + " is wrong");
      }
    }
  }
  const std::string tag = Tag(o.page_size);
  const double gb = static_cast<double>(o.bytes) / 1e9;
  EmitMetric("fence.retain_range." + tag + ".gbps", gb / range_s, "GB/s");
  EmitMetric("fence.retain_each." + tag + ".gbps", gb / each_s, "GB/s");
  EmitMetric("fence.copy_floor." + tag + ".gbps", gb / copy_s, "GB/s");
  EmitMetric("fence.retain_range." + tag + ".vs_retain_each", each_s / range_s, "ratio");
  EmitMetric("fence.retain_range." + tag + ".vs_copy_floor", copy_s / range_s, "ratio");
  EmitMetric("fence.retain_range." + tag + ".ms_per_gib",
             range_s * 1e3 * static_cast<double>(uint64_t{1} << 30) / static_cast<double>(o.bytes),
             "ms");
  EmitMetric("fence." + tag + ".bytes", static_cast<double>(o.bytes), "bytes");
  if (o.store_only) return Status::Ok();
  s.reset();  // its memory back before the daemon's region takes as much
  return RunDaemonFence(o, gb / range_s);
}

}  // namespace dsvm::bench
