#include "bench/fault_latency.h"

#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "bench/bench_output.h"
#include "bench/cluster.h"
#include "bench/fault_floor.h"
#include "bench/fault_timing.h"
#include "bench/forked_child.h"
#include "node/fault/client_mapping.h"
#include "node/fault/fd_passing.h"
#include "proto/auth.h"
#include "proto/framed_socket.h"
#include "proto/messages.h"

namespace dsvm::bench {
namespace {

constexpr int kNodes = 3;
constexpr const char* kRegionName = "bench-fault-latency";

std::string Str(uint64_t v) { return std::to_string(v); }

// --- A client process on the raw client plane ------------------------------

// One request on the client plane; the reply and the descriptors riding on it.
Result<proto::Message> ClientCall(int sock, const proto::Message& m, uint64_t request_id,
                                  std::vector<node::UniqueFd>* fds,
                                  const std::vector<int>& attach = {}) {
  const std::vector<uint8_t> bytes = proto::Encode(m, request_id);
  DSVM_RETURN_IF_ERROR(node::SendFds(sock, bytes, attach));
  std::vector<uint8_t> buf(proto::kHeaderSize + proto::kMaxControlPayload);
  DSVM_ASSIGN_OR_RETURN(node::ReceivedFds got, node::ReceiveFds(sock, buf));
  DSVM_ASSIGN_OR_RETURN(proto::Frame f,
                        proto::Decode(std::span<const uint8_t>(buf.data(), got.bytes)));
  if (f.header.request_id != request_id) return Internal("client plane: reply to another request");
  if (fds != nullptr) *fds = std::move(got.fds);
  return std::move(f.message);
}

// The status a StatusReply carries (OK included), or why there is none.
Status FromStatusReply(const Result<proto::Message>& reply, const std::string& what) {
  if (!reply.ok()) return Unavailable(what + ": " + reply.status().ToString());
  const auto* s = std::get_if<proto::StatusReply>(&*reply);
  if (s == nullptr) {
    return Internal(what + " answered with " + proto::TypeName(proto::TypeOf(*reply)));
  }
  Status st = proto::FromReply(*s);
  return st.ok() ? st : Status(st.code(), what + ": " + st.message());
}

// A reply that should have been of type T: why it is not (never OK).
template <typename T>
Status Unexpected(const Result<proto::Message>& reply, const std::string& what) {
  Status st = FromStatusReply(reply, what);
  return st.ok() ? Internal(what + " answered OK without a " + proto::TypeName(T::kType)) : st;
}

// A client process's mapping of the bench region, its faults served by the
// daemon behind `socket_path`. Lives in a forked child, which keeps the
// mapping and the connection until the daemons have stopped.
struct ClientSession {
  int sock = -1;  // the client-plane connection
  uint8_t* base = nullptr;
  size_t pages = 0;
  proto::NodeId node = proto::kNoNode;

  uint8_t* Page(size_t p) const { return base + p * kFaultPageSize; }
};

Result<ClientSession> OpenSession(const std::string& socket_path) {
  ClientSession s;
  s.sock = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (s.sock < 0) return IoError(std::string("socket: ") + std::strerror(errno));
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", socket_path.c_str());
  if (::connect(s.sock, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    return Unavailable("connect to " + socket_path + ": " + std::strerror(errno));
  }
  auto hello = ClientCall(s.sock, proto::ClientHello{}, 1, nullptr);
  const auto* h = hello.ok() ? std::get_if<proto::ClientHelloReply>(&*hello) : nullptr;
  if (h == nullptr) return Unexpected<proto::ClientHelloReply>(hello, "ClientHello");
  s.node = h->node;
  std::vector<node::UniqueFd> fds;
  auto open = ClientCall(s.sock, proto::RegionOpen{.name = kRegionName}, 2, &fds);
  const auto* region = open.ok() ? std::get_if<proto::RegionReply>(&*open) : nullptr;
  if (region == nullptr) return Unexpected<proto::RegionReply>(open, "RegionOpen");
  if (fds.size() != 1) {
    return Internal("RegionOpen's reply carried " + Str(fds.size()) + " descriptors, not 1");
  }
  if (region->page_size != kFaultPageSize) {
    return Internal("the region's page size is " + Str(region->page_size));
  }
  DSVM_ASSIGN_OR_RETURN(node::ClientMapping mapping,
                        node::ClientMapRegion(std::move(fds[0]), region->base, region->size));
  DSVM_RETURN_IF_ERROR(FromStatusReply(
      ClientCall(s.sock, proto::MapRegion{region->base}, 3, nullptr, mapping.attach()),
      "MapRegion"));
  // `mapping` goes: the daemon holds the only userfaultfd from here on
  // (uffd_client.h); the mapping stays until the process exits.
  s.base = static_cast<uint8_t*>(mapping.addr);
  s.pages = mapping.size / kFaultPageSize;
  return s;
}

// The node's counters now (NodeStats).
Result<proto::NodeCounters> CountersOf(const ClientSession& s, uint64_t request_id) {
  auto reply = ClientCall(s.sock, proto::NodeStats{}, request_id, nullptr);
  const auto* stats = reply.ok() ? std::get_if<proto::NodeStatsReply>(&*reply) : nullptr;
  if (stats == nullptr) return Unexpected<proto::NodeStatsReply>(reply, "NodeStats");
  return stats->counters;
}

// Checks every word of page `p`: the first writer's pattern, and in word 0
// the overwrite when `overwritten`.
Status CheckPage(const ClientSession& s, size_t p, bool overwritten, const char* who) {
  const auto* w = reinterpret_cast<const volatile uint64_t*>(s.Page(p));
  for (size_t i = 0; i < kWordsPerPage; ++i) {
    const uint64_t want = i == 0 && overwritten ? OverwriteWord(p) : PatternWord(p, i);
    const uint64_t got = w[i];
    if (got != want) {
      char text[160];
      std::snprintf(text, sizeof(text), "%s (node %u): page %zu word %zu is %#llx, expected %#llx",
                    who, s.node, p, i, static_cast<unsigned long long>(got),
                    static_cast<unsigned long long>(want));
      return Internal(text);
    }
  }
  return Status::Ok();
}

// One timed pass over pages: a latency per page, and the page faults the
// kernel counted for the process meanwhile (getrusage, minor and major: a
// fault served through userfaultfd counts as one, as does one the kernel
// resolved alone). Nothing else in the pass faults: `micros` is written
// before the pass starts.
struct Pass {
  std::vector<double> micros;
  double faults = 0;
};

class FaultCount {
 public:
  FaultCount() { ::getrusage(RUSAGE_SELF, &start_); }
  void Into(Pass* pass) const {
    rusage now;
    ::getrusage(RUSAGE_SELF, &now);
    pass->faults = static_cast<double>(now.ru_majflt - start_.ru_majflt) +
                   static_cast<double>(now.ru_minflt - start_.ru_minflt);
  }

 private:
  rusage start_;
};

// A pass travels as two series: the latencies, then {faults}.
void PushPass(SampleSeries* out, Pass pass) {
  out->push_back(std::move(pass.micros));
  out->push_back({pass.faults});
}

Pass TakePass(SampleSeries& in, size_t index) {
  Pass p;
  p.micros = std::move(in[2 * index]);
  if (in[2 * index + 1].size() == 1) p.faults = in[2 * index + 1][0];
  return p;
}

// Reads word 0 of pages [from, to), timing each load, and checks the values.
// A stride through [0, n) that is coprime with n and never steps to a
// neighbouring page: scattered misses leave the daemon's sequential
// read-ahead off, so each timed read is one fault of its own rather than a
// hit on a page read ahead. 1 where n has none (n < 5, n = 6).
size_t ScatterStride(size_t n) {
  for (size_t stride = 2; stride + 2 <= n; ++stride) {
    if (std::gcd(stride, n) == 1) return stride;
  }
  return 1;
}

Status TimedReads(const ClientSession& s, size_t from, size_t to, bool overwritten, const char* who,
                  Pass* pass) {
  const size_t n = to - from, stride = ScatterStride(n);
  pass->micros.assign(n, 0);
  FaultCount count;
  for (size_t k = 0; k < n; ++k) {
    const size_t p = from + k * stride % n;
    const uint64_t v = TimedLoad(s.Page(p), &pass->micros[p - from]);
    const uint64_t want = overwritten ? OverwriteWord(p) : PatternWord(p, 0);
    if (v != want) {
      char text[160];
      std::snprintf(text, sizeof(text), "%s (node %u): page %zu word 0 reads %#llx, expected %#llx",
                    who, s.node, p, static_cast<unsigned long long>(v),
                    static_cast<unsigned long long>(want));
      return Internal(text);
    }
  }
  count.Into(pass);
  return Status::Ok();
}

Status CheckPages(const ClientSession& s, size_t from, size_t to, bool overwritten,
                  const char* who) {
  for (size_t p = from; p < to; ++p) DSVM_RETURN_IF_ERROR(CheckPage(s, p, overwritten, who));
  return Status::Ok();
}

// --- The cluster of one run ---------------------------------------------------

Status StartCluster(const FaultLatencyOptions& o, const std::string& direct_reads, Cluster* c,
                    uint64_t region_bytes) {
  DSVM_RETURN_IF_ERROR(StartCluster(ClusterOptions{.nodes = kNodes,
                                                   .node_binary = o.node_binary,
                                                   .coordinator_binary = o.coordinator_binary,
                                                   .dir_prefix = "dsvm-fault",
                                                   .busy_poll_us = o.busy_poll_us,
                                                   .fault_poll_us = o.fault_poll_us,
                                                   .direct_reads = direct_reads},
                                    c));
  DSVM_ASSIGN_OR_RETURN(proto::FramedSocket tool,
                        proto::ConnectToCoordinator(c->coordinator->address(),
                                                    &c->coordinator->secret()));
  auto reply = tool.Call(proto::RegionCreate{.name = kRegionName, .size = region_bytes, .page_size = kFaultPageSize});
  if (!reply.ok() || std::get_if<proto::RegionReply>(&*reply) == nullptr) {
    return Unexpected<proto::RegionReply>(reply, "RegionCreate");
  }
  return Status::Ok();
}

// What one run of the dsvm path measured.
struct DsvmSeries {
  Pass first_touch_write;
  Pass remote_read;
  double direct_reads = 0;  // of remote_read's faults, those a direct read answered
  double pages_fetched = 0;  // pages that reached the reader's node during remote_read
  Pass local_reread;
  Pass local_minor;
  Pass local_valid;
  Pass remote_write_invalidate;
};

// Each client returns its node id as its last series: a "remote" read must
// really have run on another node than the writer.
Result<SampleSeries> RunClient(
    const FaultLatencyOptions& o, Cluster& c, int node_index, const std::string& what,
    const std::function<Status(const ClientSession&, SampleSeries*)>& body) {
  const std::string socket = c.nodes[node_index]->socket_path();
  const std::string label = what + " (node " + Str(node_index + 1) + ")";
  const auto start = Clock::now();
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<ForkedChild> child,
                        ForkedChild::Start(label, [&](SampleSeries* out) -> Status {
                          DSVM_ASSIGN_OR_RETURN(ClientSession s, OpenSession(socket));
                          DSVM_RETURN_IF_ERROR(body(s, out));
                          out->push_back({static_cast<double>(s.node)});
                          return Status::Ok();
                        }));
  auto r = child->Collect(o.child_timeout_s);
  if (r.ok() && o.clients_exit) {
    Status st = child->Release();
    if (!st.ok()) r = st;
  } else if (r.ok()) {
    c.clients.push_back(std::move(child));  // released when the daemons are gone
  }
  std::fprintf(stderr, "dsvm-bench: fault-latency: %s: %.2f s\n", label.c_str(),
               SecondsBetween(start, Clock::now()));
  if (!r.ok()) {
    c.PrintLogTails();
    return r.status();
  }
  if (r->empty() || r->back().size() != 1) return Internal(label + ": no node id reported");
  return r;
}

Status RunDsvmPath(const FaultLatencyOptions& o, Cluster& c, DsvmSeries* out) {
  const size_t n = o.pages;
  const size_t warm_from = 2 * n, total = 2 * n + o.warmup_pages;
  proto::NodeId ids[kNodes] = {};

  // Node 1 writes every page once; pages [0, N) go to the read test, [N, 2N)
  // to the write test, the rest warm up the UCX connections untimed.
  DSVM_ASSIGN_OR_RETURN(
      SampleSeries w,
      RunClient(o, c, 0, "writer", [&](const ClientSession& s, SampleSeries* series) {
        if (s.pages < total) return Internal("region too small");
        auto fill = [&](size_t p, double* us) {
          auto* words = reinterpret_cast<uint64_t*>(s.Page(p));
          TimedStore(words, PatternWord(p, 0), us);
          for (size_t i = 1; i < kWordsPerPage; ++i) words[i] = PatternWord(p, i);
        };
        double unused;
        for (size_t p = warm_from; p < total; ++p) fill(p, &unused);
        Pass first;
        first.micros.assign(2 * n, 0);
        FaultCount count;
        for (size_t p = 0; p < 2 * n; ++p) fill(p, &first.micros[p]);
        count.Into(&first);
        DSVM_RETURN_IF_ERROR(CheckPages(s, 0, total, false, "writer"));
        PushPass(series, std::move(first));
        return Status::Ok();
      }));
  ids[0] = static_cast<proto::NodeId>(w.back()[0]);
  out->first_touch_write = TakePass(w, 0);

  // Node 2 reads pages node 1 holds Modified: every first touch is a remote
  // fault. Then again (valid, mapped), then after dropping its PTEs.
  DSVM_ASSIGN_OR_RETURN(
      SampleSeries r,
      RunClient(o, c, 1, "reader", [&](const ClientSession& s, SampleSeries* series) {
        Pass unused, remote, reread, minor;
        DSVM_RETURN_IF_ERROR(TimedReads(s, warm_from, total, false, "reader warm-up", &unused));
        DSVM_ASSIGN_OR_RETURN(const proto::NodeCounters before, CountersOf(s, 10));
        DSVM_RETURN_IF_ERROR(TimedReads(s, 0, n, false, "reader", &remote));
        DSVM_ASSIGN_OR_RETURN(const proto::NodeCounters after, CountersOf(s, 11));
        DSVM_RETURN_IF_ERROR(CheckPages(s, 0, n, false, "reader"));
        DSVM_RETURN_IF_ERROR(TimedReads(s, 0, n, false, "reader, second read", &reread));
        // Sharers for the write test.
        DSVM_RETURN_IF_ERROR(
            TimedReads(s, n, 2 * n, false, "reader of the write-test pages", &unused));
        DSVM_RETURN_IF_ERROR(CheckPages(s, n, 2 * n, false, "reader of the write-test pages"));
        // Drop this process's page-table entries; the memfd keeps the pages,
        // so each next access is a minor fault the daemon serves locally.
        if (::madvise(s.Page(0), n * kFaultPageSize, MADV_DONTNEED) != 0) {
          return IoError(std::string("madvise(MADV_DONTNEED): ") + std::strerror(errno));
        }
        DSVM_RETURN_IF_ERROR(TimedReads(s, 0, n, false, "reader after MADV_DONTNEED", &minor));
        DSVM_RETURN_IF_ERROR(CheckPages(s, 0, n, false, "reader after MADV_DONTNEED"));
        PushPass(series, std::move(remote));
        PushPass(series, std::move(reread));
        PushPass(series, std::move(minor));
        series->push_back({static_cast<double>(after.direct_reads - before.direct_reads),
                           static_cast<double>(after.pages_fetched - before.pages_fetched)});
        return Status::Ok();
      }));
  ids[1] = static_cast<proto::NodeId>(r.back()[0]);
  out->remote_read = TakePass(r, 0);
  out->local_reread = TakePass(r, 1);
  out->local_minor = TakePass(r, 2);
  out->direct_reads = r.at(2 * 3).at(0);  // after the reader's three passes
  out->pages_fetched = r.at(2 * 3).at(1);

  // A second process on node 2: the pages are valid on its node already.
  DSVM_ASSIGN_OR_RETURN(
      SampleSeries v,
      RunClient(o, c, 1, "second process", [&](const ClientSession& s, SampleSeries* series) {
        Pass valid;
        DSVM_RETURN_IF_ERROR(TimedReads(s, 0, n, false, "second process", &valid));
        DSVM_RETURN_IF_ERROR(CheckPages(s, 0, 2 * n, false, "second process"));
        PushPass(series, std::move(valid));
        return Status::Ok();
      }));
  if (static_cast<proto::NodeId>(v.back()[0]) != ids[1]) {
    return Internal("the second process on node 2 reported another node");
  }
  out->local_valid = TakePass(v, 0);

  // Node 3 writes pages held Shared by nodes 1 (owner) and 2.
  DSVM_ASSIGN_OR_RETURN(
      SampleSeries x,
      RunClient(
          o, c, 2, "writer of shared pages", [&](const ClientSession& s, SampleSeries* series) {
            double unused;
            for (size_t p = warm_from; p < total; ++p)
              TimedStore(s.Page(p), OverwriteWord(p), &unused);
            Pass write;
            write.micros.assign(n, 0);
            FaultCount count;
            for (size_t p = n; p < 2 * n; ++p) {
              TimedStore(s.Page(p), OverwriteWord(p), &write.micros[p - n]);
            }
            count.Into(&write);
            DSVM_RETURN_IF_ERROR(CheckPages(s, n, 2 * n, true, "writer of shared pages"));
            DSVM_RETURN_IF_ERROR(CheckPages(s, warm_from, total, true, "writer of shared pages"));
            PushPass(series, std::move(write));
            return Status::Ok();
          }));
  ids[2] = static_cast<proto::NodeId>(x.back()[0]);
  out->remote_write_invalidate = TakePass(x, 0);

  if (ids[0] == ids[1] || ids[1] == ids[2] || ids[0] == ids[2]) {
    return Internal("the clients were not on three different nodes (" + Str(ids[0]) + ", " +
                    Str(ids[1]) + ", " + Str(ids[2]) + ")");
  }

  // The invalidated sharer and the former owner see node 3's writes.
  for (int node : {1, 0}) {
    DSVM_ASSIGN_OR_RETURN(
        SampleSeries unused,
        RunClient(o, c, node, "check of node 3's writes",
                  [&](const ClientSession& s, SampleSeries*) {
                    DSVM_RETURN_IF_ERROR(CheckPages(s, n, 2 * n, true, "check of node 3's writes"));
                    DSVM_RETURN_IF_ERROR(
                        CheckPages(s, warm_from, total, true, "check of node 3's writes"));
                    return CheckPages(s, 0, n, false, "check of node 3's writes");
                  }));
  }
  return Status::Ok();
}

double Median(std::vector<double> v) { return Quantile(v, 0.5); }
double P99(std::vector<double> v) { return Quantile(v, 0.99); }

// The shape of a series, for the reader of stderr: where the tail starts.
void Describe(const std::string& name, std::vector<double> v) {
  double sum = 0;
  for (double x : v) sum += x;
  std::fprintf(stderr,
               "dsvm-bench: %-36s n=%zu min %.2f p10 %.2f p50 %.2f p90 %.2f p99 %.2f max %.2f "
               "mean %.2f us\n",
               name.c_str(), v.size(), Quantile(v, 0), Quantile(v, 0.1), Quantile(v, 0.5),
               Quantile(v, 0.9), Quantile(v, 0.99), Quantile(v, 1),
               v.empty() ? 0 : sum / static_cast<double>(v.size()));
}

void Describe(const std::string& name, const Pass& pass) {
  Describe(name, pass.micros);
  const double pages = std::max<double>(1, static_cast<double>(pass.micros.size()));
  std::fprintf(stderr, "dsvm-bench: %-36s page faults per access: %.3f\n", "", pass.faults / pages);
}

// Page faults per access of a pass that should take none (or one local one).
void EmitFaultCount(const std::string& prefix, const Pass& pass) {
  const double pages = std::max<double>(1, static_cast<double>(pass.micros.size()));
  EmitMetric(prefix + ".faults_per_access", pass.faults / pages, "faults");
}

// The metric names' tag of a run: the transport, then its settings.
std::string TagFor(const FaultLatencyOptions& o, const std::string& tls, bool direct) {
  std::string tag = tls;
  for (char& ch : tag) {
    if (ch == ',') ch = '_';
  }
  if (direct) tag += ".direct";  // the daemons' read faults also ask the holder
  if (o.busy_poll_us > 0) tag += ".poll";  // the daemons and coordinator busy-poll
  if (o.fault_poll_us >= 0) tag += ".fpoll" + std::to_string(o.fault_poll_us);
  return tag;
}

// One cluster with its daemons' --direct-reads `direct_reads`; sets
// *read_median to the remote read's median.
Status RunOneTransport(const FaultLatencyOptions& o, const std::string& tls,
                       const std::string& direct_reads, double* read_median_us) {
  ::setenv("UCX_TLS", tls.c_str(), 1);
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const std::string tag = TagFor(o, tls, direct_reads == "on");
  std::fprintf(stderr,
               "dsvm-bench: fault-latency: UCX_TLS=%s UCX_NET_DEVICES=lo, --direct-reads %s, "
               "%zu pages per series\n",
               tls.c_str(), direct_reads.c_str(), o.pages);

  Cluster cluster;
  const uint64_t region_bytes = (2 * o.pages + o.warmup_pages) * kFaultPageSize;
  Status st = StartCluster(o, direct_reads, &cluster, region_bytes);
  if (!st.ok()) {
    cluster.Stop().IgnoreError();  // the start's error is the one to report
    return st;
  }

  // The floors first, with the cluster idle beside them (same background).
  std::vector<double> floor, floor_blocking;
  for (bool blocking : {false, true}) {
    const std::string what =
        std::string(blocking ? "blocking floor" : "floor") + " (UCX_TLS=" + tls + ")";
    const auto start = Clock::now();
    auto f = RunForked(what, o.child_timeout_s, [&](SampleSeries* out) -> Status {
      std::vector<double> micros;
      DSVM_RETURN_IF_ERROR(
          MeasureFaultFloor(FloorOptions{o.pages, o.warmup_pages, blocking}, &micros));
      out->push_back(std::move(micros));
      return Status::Ok();
    });
    std::fprintf(stderr, "dsvm-bench: fault-latency: %s: %.2f s\n", what.c_str(),
                 SecondsBetween(start, Clock::now()));
    if (!f.ok()) {
      cluster.Stop().IgnoreError();  // the floor's error is the one to report
      return f.status();
    }
    (blocking ? floor_blocking : floor) = std::move((*f)[0]);
  }

  // One request/reply with the coordinator, no directory work: what each
  // directory hop of a fault pays at least for the TCP link and wake-ups.
  std::vector<double> coordinator_rtt;
  {
    auto tool = proto::ConnectToCoordinator(cluster.coordinator->address(),
                                            &cluster.coordinator->secret());
    for (size_t i = 0; tool.ok() && i < o.pages; ++i) {
      const uint64_t t0 = MonotonicNs();
      auto reply = tool->Call(proto::NodeList{proto::kNoNode});
      coordinator_rtt.push_back(static_cast<double>(MonotonicNs() - t0) / 1000.0);
      if (!reply.ok() || std::get_if<proto::NodeListReply>(&*reply) == nullptr) {
        cluster.Stop().IgnoreError();  // this error is the one to report
        return Unexpected<proto::NodeListReply>(reply, "NodeList");
      }
    }
    if (!tool.ok()) {
      cluster.Stop().IgnoreError();  // this error is the one to report
      return tool.status();
    }
  }

  DsvmSeries d;
  st = RunDsvmPath(o, cluster, &d);
  const Status stopped = cluster.Stop();
  DSVM_RETURN_IF_ERROR(st);
  DSVM_RETURN_IF_ERROR(stopped);

  Describe("floor." + tag, floor);
  Describe("floor_blocking." + tag, floor_blocking);
  Describe("coordinator.request_rtt." + tag, coordinator_rtt);
  Describe("fault.remote_read." + tag, d.remote_read);
  Describe("fault.remote_write_invalidate." + tag, d.remote_write_invalidate);
  Describe("fault.first_touch_write." + tag, d.first_touch_write);
  Describe("fault.local_valid." + tag, d.local_valid);
  Describe("fault.local_reread." + tag, d.local_reread);
  Describe("fault.local_minor." + tag, d.local_minor);
  const double floor_median = Median(floor), floor_p99 = P99(floor);
  const double read_median = Median(d.remote_read.micros), read_p99 = P99(d.remote_read.micros);
  *read_median_us = read_median;
  const double write_median = Median(d.remote_write_invalidate.micros);
  EmitMetric("fault.pages_per_series." + tag, static_cast<double>(o.pages), "pages");
  EmitMetric("fault.remote_read." + tag + ".median_us", read_median, "us");
  EmitMetric("fault.remote_read." + tag + ".p99_us", read_p99, "us");
  EmitMetric("fault.remote_read." + tag + ".direct_share",
             d.direct_reads / static_cast<double>(std::max<size_t>(1, d.remote_read.micros.size())),
             "ratio");
  // 1 when each read brings one copy; up to 2 when the holder's and the
  // directory's both come (direct reads).
  EmitMetric(
      "fault.remote_read." + tag + ".pages_fetched_per_read",
      d.pages_fetched / static_cast<double>(std::max<size_t>(1, d.remote_read.micros.size())),
      "ratio");
  EmitMetric("fault.remote_write_invalidate." + tag + ".median_us", write_median, "us");
  EmitMetric("fault.remote_write_invalidate." + tag + ".p99_us",
             P99(d.remote_write_invalidate.micros), "us");
  EmitMetric("fault.first_touch_write." + tag + ".median_us", Median(d.first_touch_write.micros),
             "us");
  EmitMetric("fault.first_touch_write." + tag + ".p99_us", P99(d.first_touch_write.micros), "us");
  EmitMetric("fault.local_valid." + tag + ".median_us", Median(d.local_valid.micros), "us");
  EmitFaultCount("fault.local_valid." + tag, d.local_valid);
  EmitMetric("fault.local_reread." + tag + ".median_us", Median(d.local_reread.micros), "us");
  EmitFaultCount("fault.local_reread." + tag, d.local_reread);
  EmitMetric("fault.local_minor." + tag + ".median_us", Median(d.local_minor.micros), "us");
  EmitMetric("fault.local_minor." + tag + ".p99_us", P99(d.local_minor.micros), "us");
  EmitFaultCount("fault.local_minor." + tag, d.local_minor);
  EmitMetric("floor." + tag + ".median_us", floor_median, "us");
  EmitMetric("floor." + tag + ".p99_us", floor_p99, "us");
  EmitMetric("floor_blocking." + tag + ".median_us", Median(floor_blocking), "us");
  EmitMetric("floor_blocking." + tag + ".p99_us", P99(floor_blocking), "us");
  EmitMetric("coordinator.request_rtt." + tag + ".median_us", Median(coordinator_rtt), "us");
  EmitMetric("coordinator.request_rtt." + tag + ".p99_us", P99(coordinator_rtt), "us");
  EmitMetric("fault.remote_read." + tag + ".median_vs_floor", read_median / floor_median, "ratio");
  EmitMetric("fault.remote_read." + tag + ".p99_vs_floor_p99", read_p99 / floor_p99, "ratio");
  EmitMetric("fault.remote_read." + tag + ".median_vs_floor_blocking",
             read_median / Median(floor_blocking), "ratio");
  EmitMetric("fault.remote_read." + tag + ".p99_vs_floor_blocking_p99",
             read_p99 / P99(floor_blocking), "ratio");
  EmitMetric("fault.remote_write_invalidate." + tag + ".median_vs_floor",
             write_median / floor_median, "ratio");
  return Status::Ok();
}

}  // namespace

Status RunFaultLatency(const FaultLatencyOptions& options, bool* skipped) {
  *skipped = false;
  FaultLatencyOptions o = options;
  if (o.pages == 0 || o.transports.empty()) return InvalidArgument("nothing to measure");
  // dsvm-node refuses to start without this; the floor needs less of it.
  if (!UffdUsableOrSaySkip("dsvm-bench fault-latency")) {
    *skipped = true;
    return Status::Ok();
  }
  DSVM_RETURN_IF_ERROR(ResolveBinaries(&o.node_binary, &o.coordinator_binary));

  // What the two clock reads around every access cost by themselves.
  std::vector<double> overhead(10000);
  for (double& us : overhead) {
    const uint64_t t0 = MonotonicNs();
    asm volatile("" ::: "memory");
    us = static_cast<double>(MonotonicNs() - t0) / 1000.0;
  }
  EmitMetric("fault.timer_overhead.median_us", Median(overhead), "us");

  for (const std::string& tls : o.transports) {
    std::map<std::string, double> read_median;  // per --direct-reads
    for (const std::string& direct : o.direct_reads) {
      if (direct != "on" && direct != "off") return InvalidArgument("--direct-reads " + direct);
      DSVM_RETURN_IF_ERROR(RunOneTransport(o, tls, direct, &read_median[direct]));
    }
    if (read_median.count("on") != 0 && read_median.count("off") != 0) {
      EmitMetric("fault.remote_read." + TagFor(o, tls, false) + ".direct_vs_directory",
                 read_median["on"] / read_median["off"], "ratio");
    }
  }
  return Status::Ok();
}

}  // namespace dsvm::bench
