// dsvmctl: looks at and changes a dsvm cluster through its coordinator.
//
//   dsvmctl [--coordinator HOST:PORT[,...]] region create NAME SIZE [PAGE_SIZE]
//   dsvmctl [--coordinator HOST:PORT[,...]] region show NAME
//   dsvmctl [--coordinator HOST:PORT[,...]] region delete NAME
//   dsvmctl [--coordinator HOST:PORT[,...]] page ADDRESS
//   dsvmctl [--coordinator HOST:PORT[,...]] nodes
//   dsvmctl [--coordinator HOST:PORT[,...]] regions
//   dsvmctl [--coordinator HOST:PORT[,...]] pages NAME
//
// SIZE takes a K, M or G suffix; ADDRESS is decimal or 0x hex. The
// coordinator defaults to $DSVM_COORDINATOR, then 127.0.0.1:7700; with
// several directory shards give all of them in shard order (A,B,...), as to
// dsvm-node: `page` asks the page's shard, `pages` sums every shard's
// answer, the rest go to shard 0 (membership and regions). The
// cluster secret comes from --secret-file FILE (before the command), else
// $DSVM_SECRET_FILE; without one only an --insecure coordinator answers.
// Exit status: 0 done, 1 refused by the coordinator or unreachable, 2 usage.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "proto/auth.h"
#include "proto/framed_socket.h"
#include "proto/shard_map.h"

namespace {

using namespace dsvm;

int Usage(const char* why) {
  std::fprintf(stderr,
               "dsvmctl: %s\n"
               "usage: dsvmctl [--coordinator HOST:PORT[,...]] region create NAME SIZE [PAGE_SIZE]\n"
               "       dsvmctl [--coordinator HOST:PORT[,...]] region show|delete NAME\n"
               "       dsvmctl [--coordinator HOST:PORT[,...]] page ADDRESS\n"
               "       dsvmctl [--coordinator HOST:PORT[,...]] nodes|regions\n"
               "       dsvmctl [--coordinator HOST:PORT[,...]] pages NAME\n"
               "       (before the command also: --secret-file FILE, default $DSVM_SECRET_FILE)\n",
               why);
  return 2;
}

bool ParseSize(const std::string& s, uint64_t* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s.c_str(), &end, 0);
  if (errno != 0 || end == s.c_str()) return false;
  std::string suffix(end);
  uint64_t mult = 1;
  if (suffix == "K" || suffix == "k") mult = 1ull << 10;
  else if (suffix == "M" || suffix == "m") mult = 1ull << 20;
  else if (suffix == "G" || suffix == "g") mult = 1ull << 30;
  else if (!suffix.empty()) return false;
  if (v > UINT64_MAX / mult) return false;
  *out = v * mult;
  return true;
}

const char* StateName(proto::PageState s) {
  switch (s) {
    case proto::PageState::kInvalid: return "invalid";
    case proto::PageState::kShared: return "shared";
    case proto::PageState::kModified: return "modified";
    default: return "?";
  }
}

int Report(const Result<proto::Message>& reply) {
  if (!reply.ok()) {
    std::fprintf(stderr, "dsvmctl: %s\n", reply.status().ToString().c_str());
    return 1;
  }
  if (auto* s = std::get_if<proto::StatusReply>(&*reply)) {
    Status st = proto::FromReply(*s);
    if (!st.ok()) {
      std::fprintf(stderr, "dsvmctl: refused: %s\n", st.ToString().c_str());
      return 1;
    }
    std::printf("ok\n");
  } else if (auto* r = std::get_if<proto::RegionReply>(&*reply)) {
    std::printf("region %s id=%llu base=0x%llx size=%llu page_size=%u\n", r->name.c_str(),
                (unsigned long long)r->region, (unsigned long long)r->base,
                (unsigned long long)r->size, r->page_size);
  } else if (auto* q = std::get_if<proto::PageQueryReply>(&*reply)) {
    std::printf("page 0x%llx state=%s owner=%u version=%llu txn=%llu lost=%d busy=%d sharers=",
                (unsigned long long)q->page, StateName(q->state), q->owner,
                (unsigned long long)q->version, (unsigned long long)q->txn, q->lost, q->busy);
    for (size_t i = 0; i < q->sharers.size(); ++i) std::printf("%s%u", i ? "," : "", q->sharers[i]);
    std::printf("\n");
  } else if (auto* p = std::get_if<proto::RegionPagesReply>(&*reply)) {
    auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
    std::printf("region id=%llu pages=%llu touched=%llu lost=%llu in_flight=%llu\n", u(p->region),
                u(p->pages), u(p->touched), u(p->lost), u(p->in_flight));
    for (const proto::NodePages& n : p->nodes) {
      std::printf("  node %u modified=%llu shared=%llu\n", n.node, u(n.modified), u(n.shared));
    }
  } else {
    std::fprintf(stderr, "dsvmctl: unexpected reply %s\n", proto::TypeName(proto::TypeOf(*reply)));
    return 1;
  }
  return 0;
}

// `pages NAME` over every shard: each knows the records of its own pages.
Result<proto::Message> SumRegionPages(const std::vector<std::string>& shards,
                                      const proto::ClusterSecret* secret, const std::string& name) {
  proto::RegionPagesReply sum;
  std::map<proto::NodeId, proto::NodePages> by_node;
  for (const std::string& address : shards) {
    DSVM_ASSIGN_OR_RETURN(proto::FramedSocket sock, proto::ConnectToCoordinator(address, secret));
    DSVM_ASSIGN_OR_RETURN(proto::Message reply, sock.Call(proto::RegionPages{name}));
    auto* p = std::get_if<proto::RegionPagesReply>(&reply);
    if (p == nullptr) return reply;  // a refusal: reported as it is
    sum.region = p->region;
    sum.pages = p->pages;
    sum.touched += p->touched;
    sum.lost += p->lost;
    sum.in_flight += p->in_flight;
    for (const proto::NodePages& n : p->nodes) {
      proto::NodePages& t = by_node[n.node];
      t.node = n.node;
      t.modified += n.modified;
      t.shared += n.shared;
    }
  }
  for (auto& [id, n] : by_node) sum.nodes.push_back(n);
  return proto::Message(sum);
}

// Lists every node or region, page by page.
int List(proto::FramedSocket& sock, bool nodes) {
  uint64_t after = 0;
  for (;;) {
    proto::Message request = nodes ? proto::Message(proto::NodeList{static_cast<uint32_t>(after)})
                                   : proto::Message(proto::RegionList{after});
    auto reply = sock.Call(request);
    if (!reply.ok()) {
      std::fprintf(stderr, "dsvmctl: %s\n", reply.status().ToString().c_str());
      return 1;
    }
    bool more = false;
    if (auto* n = std::get_if<proto::NodeListReply>(&*reply)) {
      for (const auto& e : n->nodes) {
        std::printf("node %u %s address=%s host_memory=%llu gpus=%u\n", e.node,
                    e.live ? "live" : "dead", e.address.c_str(),
                    (unsigned long long)e.host_memory_bytes, e.gpu_count);
        const proto::NodeCounters& c = e.counters;
        auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
        std::printf(
            "  faults read=%llu write=%llu local_hits=%llu  pages fetched=%llu (%llu B) "
            "sent=%llu (%llu B)  invalidations=%llu downgrades=%llu prefetched=%llu  "
            "fences=%llu (accesses held %llu)  direct reads=%llu served=%llu\n",
            u(c.read_faults), u(c.write_faults), u(c.local_hits), u(c.pages_fetched),
            u(c.bytes_fetched), u(c.pages_sent), u(c.bytes_sent), u(c.invalidations),
            u(c.downgrades), u(c.prefetched_pages), u(c.fences), u(c.fenced_accesses),
            u(c.direct_reads), u(c.direct_reads_served));
        if (e.gpu_count != 0) {
          std::printf("  gpu maps=%llu (zero-copy %llu, lost %llu) placed=%llu pages in=%llu "
                      "(direct %llu) out=%llu (direct %llu)\n",
                      u(c.gpu_maps), u(c.gpu_zero_copy_maps), u(c.gpu_maps_lost),
                      u(c.gpu_placed_pages), u(c.gpu_pages_in), u(c.gpu_direct_pages_in),
                      u(c.gpu_pages_out), u(c.gpu_direct_pages_out));
        }
        after = e.node;
      }
      more = n->more;
    } else if (auto* r = std::get_if<proto::RegionListReply>(&*reply)) {
      for (const auto& e : r->regions) {
        std::printf("region %s id=%llu base=0x%llx size=%llu page_size=%u\n", e.name.c_str(),
                    (unsigned long long)e.region, (unsigned long long)e.base,
                    (unsigned long long)e.size, e.page_size);
        after = e.region;
      }
      more = r->more;
    } else {
      return Report(reply);
    }
    if (!more) return 0;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const char* env = std::getenv("DSVM_COORDINATOR");
  std::string coordinator = env ? env : "127.0.0.1:7700";
  std::string secret_flag;
  // The options before the command, in any order.
  while (args.size() >= 2 && (args[0] == "--coordinator" || args[0] == "--secret-file")) {
    (args[0] == "--coordinator" ? coordinator : secret_flag) = args[1];
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.empty()) return Usage("no command");
  std::optional<proto::ClusterSecret> secret;
  if (const std::string path = proto::SecretPath(secret_flag); !path.empty()) {
    auto loaded = proto::ClusterSecret::Load(path);
    if (!loaded.ok()) {
      std::fprintf(stderr, "dsvmctl: %s\n", loaded.status().ToString().c_str());
      return 1;
    }
    secret = std::move(*loaded);
  }
  std::vector<std::string> shards;
  for (size_t start = 0;;) {
    const size_t comma = coordinator.find(',', start);
    shards.push_back(coordinator.substr(start, comma == std::string::npos ? comma : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  const proto::ClusterSecret* key = secret ? &*secret : nullptr;
  auto connect = [&](const std::string& address) { return proto::ConnectToCoordinator(address, key); };
  std::string target = shards[0];  // membership and regions

  proto::Message request;
  if (args[0] == "region" && args.size() >= 3) {
    const std::string& verb = args[1];
    const std::string& name = args[2];
    if (name.size() > proto::kMaxNameLength) return Usage("region name too long");
    if (verb == "create" && (args.size() == 4 || args.size() == 5)) {
      proto::RegionCreate c;
      c.name = name;
      uint64_t page = 4096;
      if (!ParseSize(args[3], &c.size)) return Usage("SIZE is not a size");
      if (args.size() == 5 && (!ParseSize(args[4], &page) || page > UINT32_MAX)) {
        return Usage("PAGE_SIZE is not a size");
      }
      c.page_size = static_cast<uint32_t>(page);
      request = c;
    } else if (verb == "show" && args.size() == 3) {
      request = proto::RegionOpen{.name = name};
    } else if (verb == "delete" && args.size() == 3) {
      request = proto::RegionDelete{.name = name};
    } else {
      return Usage("unknown region command");
    }
  } else if ((args[0] == "nodes" || args[0] == "regions") && args.size() == 1) {
    auto sock = connect(target);
    if (!sock.ok()) {
      std::fprintf(stderr, "dsvmctl: %s\n", sock.status().ToString().c_str());
      return 1;
    }
    return List(*sock, args[0] == "nodes");
  } else if (args[0] == "pages" && args.size() == 2) {
    if (args[1].size() > proto::kMaxNameLength) return Usage("region name too long");
    return Report(SumRegionPages(shards, key, args[1]));
  } else if (args[0] == "page" && args.size() == 2) {
    uint64_t addr = 0;
    if (!ParseSize(args[1], &addr)) return Usage("ADDRESS is not a number");
    request = proto::PageQuery{addr};
    target = shards[proto::ShardMap(static_cast<uint32_t>(shards.size())).ShardOf(addr)];
  } else {
    return Usage("unknown command");
  }

  auto sock = connect(target);
  if (!sock.ok()) {
    std::fprintf(stderr, "dsvmctl: %s\n", sock.status().ToString().c_str());
    return 1;
  }
  return Report(sock->Call(request));
}
