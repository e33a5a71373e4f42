#include "bench/directory_inprocess.h"

#include <malloc.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <vector>

#include "bench/bench_output.h"
#include "coordinator/directory/page_directory.h"
#include "node/coherence/node_agent.h"

namespace dsvm::bench {
namespace {

using coordinator::Outbox;
using coordinator::Outgoing;
using coordinator::PageDirectory;
using coordinator::PageRecord;
using proto::AccessKind;
using proto::DataSource;
using proto::NodeId;
using proto::PageAddr;
using proto::PageState;
using proto::TxnId;

constexpr PageAddr kPageBase = 0x200000000000ull;
constexpr uint64_t kPageSize = 4096;
// Tick() is never called: nothing is lost, so nothing is retransmitted.
constexpr uint64_t kNowMs = 1;

PageAddr PageOf(size_t index) { return kPageBase + index * kPageSize; }

std::string Str(uint64_t v) { return std::to_string(v); }

// A node's view of one page: the fields of node::NodeAgent's LocalPage that
// decide what it sends, and the page's bytes, stood in for by the version of
// the write that produced them (0: zeros).
struct SimPage {
  PageState state = PageState::kInvalid;
  TxnId last_txn = 0;  // newest Grant/Fetch/Invalidate txn processed
  uint64_t value = 0;
  uint64_t pending_seq = 0;  // request_seq of the outstanding Acquire; 0: none
  bool pending_write = false;
  bool has_grant = false;  // a kOwner Grant waiting for its PageData
  proto::Grant grant;
  TxnId data_txn = 0;  // PageData received for this txn, not installed yet
  uint64_t data_value = 0;
};

struct SimNode {
  NodeId id = proto::kNoNode;
  uint64_t next_seq = 0;
  std::vector<SimPage> pages;
};

// A message on its way to the directory: kAcquire, kDone or kInvalidateAck.
struct Inbound {
  proto::MessageType type = proto::MessageType::kInvalid;
  proto::Acquire acquire;  // kAcquire
  PageAddr page = 0;       // kDone, kInvalidateAck
  TxnId txn = 0;
  NodeId node = proto::kNoNode;
};

// One PageDirectory and N nodes that answer its messages at once, in the
// order the directory sent them, with nothing lost.
class Cluster {
 public:
  Cluster(size_t nodes, size_t pages) : page_count_(pages) {
    for (size_t i = 0; i < nodes; ++i) {
      SimNode n;
      n.id = static_cast<NodeId>(i + 1);
      n.pages.resize(pages);
      nodes_.push_back(std::move(n));
      dir_.NodeUp(static_cast<NodeId>(i + 1));
    }
  }

  // Node `id` asks for page `index` as a NodeAgent would: kUpgrade when it
  // holds a Shared copy, its newest txn of the page as last_txn. The
  // workloads only ask for what the node lacks, one request per page.
  void Request(NodeId id, size_t index, bool write) {
    if (failed()) return;
    SimNode& n = nodes_[id - 1];
    SimPage& p = n.pages[index];
    DSVM_CHECK(p.pending_seq == 0);
    DSVM_CHECK(write ? p.state != PageState::kModified : p.state == PageState::kInvalid);
    AccessKind kind = AccessKind::kRead;
    if (write) kind = p.state == PageState::kShared ? AccessKind::kUpgrade : AccessKind::kWrite;
    p.pending_seq = ++n.next_seq;
    p.pending_write = write;
    ++outstanding_;
    Inbound m;
    m.type = proto::MessageType::kAcquire;
    m.acquire = proto::Acquire{PageOf(index), id, kind, p.pending_seq, p.last_txn};
    inbound_.push_back(m);
  }

  // Hands what is in flight to the directory, one batch at a time, until
  // nothing is. After each batch the dirty records are taken (a coordinator
  // persists them here, before it sends anything) and the outbox delivered.
  void Pump() {
    while (!inbound_.empty()) {
      batch_.swap(inbound_);
      for (const Inbound& m : batch_) {
        switch (m.type) {
          case proto::MessageType::kAcquire:
            dir_.HandleAcquire(m.acquire, kNowMs, &out_);
            break;
          case proto::MessageType::kDone:
            dir_.HandleDone(proto::Done{m.page, m.txn, m.node}, kNowMs, &out_);
            break;
          case proto::MessageType::kInvalidateAck:
            dir_.HandleInvalidateAck(proto::InvalidateAck{m.page, m.txn, m.node}, kNowMs, &out_);
            break;
          default:
            DSVM_CHECK_MSG(false, "only Acquire, Done and InvalidateAck go to the directory");
        }
      }
      messages_ += batch_.size();
      batch_.clear();
      dir_.TakeDirty(&dirty_);
      dirty_.clear();
      messages_ += out_.size();
      for (const Outgoing& o : out_) Deliver(o);
      out_.clear();
    }
    if (outstanding_ != 0) {
      Fail(Str(outstanding_) + " requests still outstanding with nothing in flight");
      outstanding_ = 0;
    }
  }

  // After a workload: nothing in flight, the directory's invariants hold, and
  // its records agree with what every node holds, page by page.
  Status CheckEnd() const {
    if (!error_.empty()) return Internal(error_);
    DSVM_RETURN_IF_ERROR(dir_.CheckInvariants());
    const coordinator::DirectoryStats& s = dir_.stats();
    if (dir_.busy_count() != 0) return Internal(Str(dir_.busy_count()) + " pages still busy");
    if (s.stale_ignored != 0 || s.retransmits != 0) {
      return Internal("directory ignored " + Str(s.stale_ignored) +
                      " messages as stale and resent " + Str(s.retransmits) +
                      " on a loop that loses nothing");
    }
    if (s.grants != transactions_) {
      return Internal("directory sent " + Str(s.grants) + " grants, nodes installed " +
                      Str(transactions_));
    }
    for (size_t i = 0; i < page_count_; ++i) {
      const PageRecord* r = dir_.Find(PageOf(i));
      if (r == nullptr) return Internal("page " + Str(i) + " has no directory record");
      for (const SimNode& n : nodes_) {
        const SimPage& p = n.pages[i];
        const std::string where = "page " + Str(i) + ", node " + Str(n.id) + ": ";
        if (p.pending_seq != 0 || p.has_grant) return Internal(where + "request still outstanding");
        const bool holds = p.state != PageState::kInvalid;
        if ((r->FindSharer(n.id) != nullptr) != holds) {
          return Internal(where + (holds ? "holds a copy the directory does not list"
                                         : "listed as holder but holds nothing"));
        }
        if (!holds) continue;
        if ((p.state == PageState::kModified) != (r->state == PageState::kModified)) {
          return Internal(where + "node and directory disagree on Modified");
        }
        if (p.value != r->version) {
          return Internal(where + "holds the bytes of write " + Str(p.value) +
                          ", the directory's version is " + Str(r->version));
        }
      }
    }
    return Status::Ok();
  }

  const PageDirectory& directory() const { return dir_; }
  uint64_t transactions() const { return transactions_; }
  uint64_t messages() const { return messages_; }
  bool failed() const { return !error_.empty(); }

 private:
  void Fail(const std::string& why) {
    if (error_.empty()) error_ = why;
  }

  bool IndexOf(PageAddr page, size_t* index) const {
    if (page < kPageBase || (page - kPageBase) % kPageSize != 0) return false;
    *index = (page - kPageBase) / kPageSize;
    return *index < page_count_;
  }

  void Deliver(const Outgoing& o) {
    if (o.to == proto::kNoNode || o.to > nodes_.size()) {
      return Fail("directory sent " + std::string(proto::TypeName(proto::TypeOf(o.message))) +
                  " to unknown node " + Str(o.to));
    }
    SimNode& n = nodes_[o.to - 1];
    size_t index = 0;
    if (const auto* g = std::get_if<proto::Grant>(&o.message)) {
      if (!IndexOf(g->page, &index)) return Fail("grant of unknown page " + Str(g->page));
      OnGrant(n, index, *g);
    } else if (const auto* f = std::get_if<proto::Fetch>(&o.message)) {
      if (!IndexOf(f->page, &index)) return Fail("fetch of unknown page " + Str(f->page));
      OnFetch(n, index, *f);
    } else if (const auto* inv = std::get_if<proto::Invalidate>(&o.message)) {
      if (!IndexOf(inv->page, &index)) return Fail("invalidate of unknown page " + Str(inv->page));
      OnInvalidate(n, index, *inv);
    } else if (const auto* rel = std::get_if<proto::Release>(&o.message)) {
      if (!IndexOf(rel->page, &index)) return Fail("release of unknown page " + Str(rel->page));
      if (rel->txn > n.pages[index].last_txn) {
        Fail("node " + Str(n.id) + " got Release of txn " + Str(rel->txn) + " for page " +
             Str(index) + ", newer than any txn it saw");
      }
    } else {
      // EvictReply answers Evict/Writeback, which these workloads never send.
      Fail("directory sent unexpected " + std::string(proto::TypeName(proto::TypeOf(o.message))) +
           " to node " + Str(n.id));
    }
  }

  void OnGrant(SimNode& n, size_t index, const proto::Grant& g) {
    SimPage& p = n.pages[index];
    auto where = [&] { return "grant of page " + Str(index) + " to node " + Str(n.id) + ": "; };
    if (g.status != 0) return Fail(where() + "refused with status " + Str(g.status));
    if (p.pending_seq == 0 || g.request_seq != p.pending_seq) {
      return Fail(where() + "request_seq " + Str(g.request_seq) +
                  ", the node's outstanding one is " + Str(p.pending_seq));
    }
    if (g.txn <= p.last_txn) {
      return Fail(where() + "txn " + Str(g.txn) + " not newer than " + Str(p.last_txn));
    }
    const PageState want = p.pending_write ? PageState::kModified : PageState::kShared;
    if (g.state != want) return Fail(where() + "wrong state");
    if (p.pending_write && g.version == 0) return Fail(where() + "write grant of version 0");
    p.has_grant = true;
    p.grant = g;
    TryInstall(n, index);
  }

  void TryInstall(SimNode& n, size_t index) {
    SimPage& p = n.pages[index];
    const proto::Grant& g = p.grant;
    auto where = [&] { return "install of page " + Str(index) + " at node " + Str(n.id) + ": "; };
    uint64_t bytes = 0;
    switch (g.source) {
      case DataSource::kZero:
        break;
      case DataSource::kSelf:
        if (p.state == PageState::kInvalid) return Fail(where() + "kSelf, but it holds no copy");
        bytes = p.value;
        break;
      case DataSource::kOwner:
        if (p.data_txn != g.txn) return;  // the PageData is on its way
        bytes = p.data_value;
        break;
      default:
        return Fail(where() + "unexpected data source");
    }
    // A read sees the last write; a write starts from it.
    const uint64_t last_write = p.pending_write ? g.version - 1 : g.version;
    if (bytes != last_write) {
      return Fail(where() + "got the bytes of write " + Str(bytes) + ", the last write is " +
                  Str(last_write));
    }
    p.has_grant = false;
    p.state = g.state;
    p.last_txn = g.txn;
    p.value = p.pending_write ? g.version : bytes;
    p.pending_seq = 0;
    p.data_txn = 0;
    --outstanding_;
    ++transactions_;
    Inbound m;
    m.type = proto::MessageType::kDone;
    m.page = PageOf(index);
    m.txn = g.txn;
    m.node = n.id;
    inbound_.push_back(m);
  }

  void OnFetch(SimNode& n, size_t index, const proto::Fetch& f) {
    SimPage& p = n.pages[index];
    auto where = [&] { return "fetch of page " + Str(index) + " from node " + Str(n.id) + ": "; };
    if (f.txn <= p.last_txn) {
      return Fail(where() + "txn " + Str(f.txn) + " not newer than " + Str(p.last_txn));
    }
    if (p.state == PageState::kInvalid) return Fail(where() + "it holds no copy");
    p.last_txn = f.txn;
    if (f.send_data) {
      if (f.requester == proto::kNoNode || f.requester > nodes_.size() || f.requester == n.id) {
        return Fail(where() + "bad requester " + Str(f.requester));
      }
      // PageData straight to the requester (the data plane, not counted).
      SimNode& r = nodes_[f.requester - 1];
      SimPage& q = r.pages[index];
      q.data_txn = f.txn;
      q.data_value = p.value;
      if (q.has_grant && q.grant.txn == f.txn) TryInstall(r, index);
    }
    switch (f.next_state) {
      case PageState::kShared:
        p.state = PageState::kShared;
        break;
      case PageState::kInvalid:
        p.state = PageState::kInvalid;  // into a stash until Release
        if (!f.send_data) Ack(n, index, f.txn);
        break;
      default:
        return Fail(where() + "next state neither Shared nor Invalid");
    }
  }

  void OnInvalidate(SimNode& n, size_t index, const proto::Invalidate& m) {
    SimPage& p = n.pages[index];
    auto where = [&] {
      return "invalidate of page " + Str(index) + " at node " + Str(n.id) + ": ";
    };
    if (m.txn <= p.last_txn) {
      return Fail(where() + "txn " + Str(m.txn) + " not newer than " + Str(p.last_txn));
    }
    if (p.state != PageState::kShared) return Fail(where() + "it holds no Shared copy");
    p.last_txn = m.txn;
    p.state = PageState::kInvalid;
    Ack(n, index, m.txn);
  }

  void Ack(const SimNode& n, size_t index, TxnId txn) {
    Inbound m;
    m.type = proto::MessageType::kInvalidateAck;
    m.page = PageOf(index);
    m.txn = txn;
    m.node = n.id;
    inbound_.push_back(m);
  }

  PageDirectory dir_;
  std::vector<SimNode> nodes_;
  size_t page_count_;
  std::vector<Inbound> inbound_;
  std::vector<Inbound> batch_;
  Outbox out_;
  std::vector<PageRecord> dirty_;
  uint64_t outstanding_ = 0;  // requests not granted yet
  uint64_t transactions_ = 0;
  uint64_t messages_ = 0;
  std::string error_;  // the first check that failed
};

struct Rate {
  uint64_t transactions = 0;
  uint64_t messages = 0;
  double seconds = 0;
};

// Runs `round` once untimed (warm-up, first touches), then times rounds
// until the time is up: at least two, exactly `quick_rounds` in quick mode.
// Stops early once `failed()`.
template <typename RoundFn, typename FailedFn>
double TimeRounds(const InProcessOptions& o, size_t quick_rounds, RoundFn round, FailedFn failed) {
  round();
  const Clock::time_point t0 = Clock::now();
  Clock::time_point t1 = t0;
  size_t done = 0;
  do {
    round();
    ++done;
    t1 = Clock::now();
  } while (!failed() &&
           (o.quick ? done < quick_rounds : (done < 2 || SecondsBetween(t0, t1) < o.seconds)));
  return SecondsBetween(t0, t1);
}

// The bare cost of one directory update: find the page, set owner, bump version.
Result<double> MapBaseline(const InProcessOptions& o) {
  struct Entry {
    NodeId owner = proto::kNoNode;
    uint64_t version = 0;
  };
  std::unordered_map<PageAddr, Entry> map;
  for (size_t i = 0; i < o.pages; ++i) map.emplace(PageOf(i), Entry{});
  uint64_t rounds = 0;
  uint64_t timed_updates = 0;
  auto round = [&] {
    const NodeId owner = static_cast<NodeId>(rounds % 2 + 1);
    for (size_t i = 0; i < o.pages; ++i) {
      Entry& e = map.find(PageOf(i))->second;
      e.owner = owner;
      ++e.version;
    }
    if (rounds++ > 0) timed_updates += o.pages;
  };
  const double seconds = TimeRounds(o, 5, round, [] { return false; });
  // Reading every entry back keeps the loop from being optimised away.
  for (const auto& [page, e] : map) {
    if (e.version != rounds) return Internal("map baseline lost an update");
  }
  return timed_updates / seconds;
}

// (a) Nodes take turns writing every page: each acquire fetches from the
// previous writer (Acquire, Fetch, Grant, Done, Release).
Result<Rate> WritePingPong(size_t nodes, const InProcessOptions& o) {
  Cluster c(nodes, o.pages);
  uint64_t rounds = 0;
  uint64_t txn0 = 0, msg0 = 0;
  auto round = [&] {
    const NodeId writer = static_cast<NodeId>(rounds % nodes + 1);
    for (size_t b = 0; b < o.pages; b += o.batch_pages) {
      const size_t e = std::min(o.pages, b + o.batch_pages);
      for (size_t i = b; i < e; ++i) c.Request(writer, i, /*write=*/true);
      c.Pump();
    }
    if (rounds++ == 0) {
      txn0 = c.transactions();
      msg0 = c.messages();
    }
  };
  const double seconds = TimeRounds(o, 5, round, [&] { return c.failed(); });
  DSVM_RETURN_IF_ERROR(c.CheckEnd());
  const NodeId last = static_cast<NodeId>((rounds - 1) % nodes + 1);
  for (size_t i = 0; i < o.pages; ++i) {
    const PageRecord* r = c.directory().Find(PageOf(i));
    if (r->state != PageState::kModified || r->owner != last || r->version != rounds) {
      return Internal("write ping-pong: page " + Str(i) + " is not Modified at node " + Str(last) +
                      " with version " + Str(rounds));
    }
  }
  if (c.directory().stats().fetches != o.pages * (rounds - 1)) {
    return Internal("write ping-pong: not every write fetched from the previous writer");
  }
  return Rate{c.transactions() - txn0, c.messages() - msg0, seconds};
}

// (b) Node 1 writes; nodes 2..N read (each fetched from node 1, the
// supplier), then node 1 upgrades: one reader keeps a stash until the
// upgrade completes (a no-data Fetch), the others are invalidated.
Result<Rate> ReadShareWrite(size_t nodes, const InProcessOptions& o) {
  Cluster c(nodes, o.pages);
  constexpr NodeId kWriter = 1;
  uint64_t rounds = 0;
  uint64_t txn0 = 0, msg0 = 0;
  auto round = [&] {
    for (size_t b = 0; b < o.pages; b += o.batch_pages) {
      const size_t e = std::min(o.pages, b + o.batch_pages);
      if (rounds > 0) {
        // All readers at once: the directory queues all but one per page.
        for (size_t i = b; i < e; ++i) {
          for (NodeId r = 2; r <= nodes; ++r) c.Request(r, i, /*write=*/false);
        }
        c.Pump();
      }
      for (size_t i = b; i < e; ++i) c.Request(kWriter, i, /*write=*/true);
      c.Pump();
    }
    if (rounds++ == 0) {
      txn0 = c.transactions();
      msg0 = c.messages();
    }
  };
  const double seconds = TimeRounds(o, 5, round, [&] { return c.failed(); });
  DSVM_RETURN_IF_ERROR(c.CheckEnd());
  for (size_t i = 0; i < o.pages; ++i) {
    const PageRecord* r = c.directory().Find(PageOf(i));
    if (r->state != PageState::kModified || r->owner != kWriter || r->version != rounds) {
      return Internal("read sharing: page " + Str(i) + " is not Modified at node 1 with version " +
                      Str(rounds));
    }
  }
  const coordinator::DirectoryStats& s = c.directory().stats();
  // Per page and round: one Fetch per reader; then node 1, the supplier,
  // upgrades: one reader keeps a stash (a no-data Fetch), the others are
  // invalidated.
  const uint64_t upgrades = o.pages * (rounds - 1);
  const uint64_t reads = upgrades * (nodes - 1);
  if (s.fetches != reads + upgrades || s.invalidations != reads - upgrades) {
    return Internal("read sharing: expected " + Str(reads + upgrades) + " fetches and " +
                    Str(reads - upgrades) + " invalidations, got " + Str(s.fetches) + " and " +
                    Str(s.invalidations));
  }
  return Rate{c.transactions() - txn0, c.messages() - msg0, seconds};
}

// What the directory's memory costs per page it knows: heap bytes (glibc's
// count of bytes handed out) after `pages` pages are each written once by
// one node and persisted (TakeDirty), per page. The baseline is the size of
// the record itself, what a table of bare records would take.
Result<double> HeapBytesPerPage(size_t pages) {
  const size_t before = mallinfo2().uordblks;
  size_t after = 0;
  {
    PageDirectory dir{coordinator::DirectoryOptions{}};
    dir.NodeUp(1);
    Outbox out;
    std::vector<PageRecord> dirty;
    for (size_t i = 0; i < pages; ++i) {
      dir.HandleAcquire(proto::Acquire{PageOf(i), 1, AccessKind::kWrite, i + 1, 0}, 0, &out);
      dir.HandleDone(proto::Done{PageOf(i), 1, 1}, 0, &out);
      if (out.size() >= 1024) {
        out.clear();
        dirty.clear();
        dir.TakeDirty(&dirty);
      }
    }
    out.clear();
    dirty.clear();
    dir.TakeDirty(&dirty);
    dirty.shrink_to_fit();
    if (dir.busy_count() != 0 || dir.Find(PageOf(pages - 1)) == nullptr) {
      return Internal("heap per page: the pages were not all written");
    }
    after = mallinfo2().uordblks;
  }
  return static_cast<double>(after - before) / static_cast<double>(pages);
}

// The same for a node's agent (node::NodeAgent): heap bytes per page after
// `pages` pages were each faulted for writing and granted Modified, so that
// every page is at rest (nothing pending, no waiter). A node keeps such an
// entry for every page it ever touched until its region goes.
Result<double> AgentHeapBytesPerPage(size_t pages) {
  const size_t before = mallinfo2().uordblks;
  size_t after = 0;
  {
    node::NodeAgent agent(1, node::NodeOptions{});
    node::Actions acts;
    for (size_t i = 0; i < pages; ++i) {
      acts.clear();
      if (agent.Fault(PageOf(i), true, i + 1, kNowMs, &acts) != node::FaultResult::kWait) {
        return Internal("agent heap per page: a first write fault did not wait");
      }
      const proto::Acquire* acq = nullptr;
      for (const node::Action& a : acts) {
        if (a.kind == node::ActionKind::kSendToDirectory) acq = std::get_if<proto::Acquire>(&a.message);
      }
      if (acq == nullptr) return Internal("agent heap per page: the fault sent no Acquire");
      proto::Grant g;
      g.page = PageOf(i);
      g.txn = 1;
      g.request_seq = acq->request_seq;
      g.state = PageState::kModified;
      g.source = DataSource::kZero;
      g.version = 1;
      acts.clear();
      agent.HandleGrant(g, kNowMs, &acts);
    }
    acts.clear();
    acts.shrink_to_fit();
    if (agent.StateOf(PageOf(pages - 1)) != PageState::kModified ||
        agent.HasPending(PageOf(pages - 1))) {
      return Internal("agent heap per page: the pages were not all granted");
    }
    after = mallinfo2().uordblks;
  }
  return static_cast<double>(after - before) / static_cast<double>(pages);
}

}  // namespace

Status RunDirectoryInProcess(const InProcessOptions& o) {
  DSVM_CHECK(o.pages > 0 && o.batch_pages > 0);
  DSVM_ASSIGN_OR_RETURN(const double baseline, MapBaseline(o));
  std::fprintf(stderr, "directory in-process: baseline unordered_map update: %.3g updates/s\n",
               baseline);
  EmitMetric("directory.inprocess.baseline.unordered_map_update_per_s", baseline, "updates/s");

  DSVM_ASSIGN_OR_RETURN(const double heap, HeapBytesPerPage(o.pages));
  std::fprintf(stderr, "directory in-process: %.0f heap bytes per page (%zu pages; a record is %zu)\n",
               heap, o.pages, sizeof(PageRecord));
  EmitMetric("directory.inprocess.heap_bytes_per_page", heap, "bytes");
  EmitMetric("directory.inprocess.heap_bytes_per_page.vs_record_size",
             heap / static_cast<double>(sizeof(PageRecord)), "ratio");

  DSVM_ASSIGN_OR_RETURN(const double agent_heap, AgentHeapBytesPerPage(o.pages));
  std::fprintf(stderr, "node agent in-process: %.0f heap bytes per page at rest (%zu pages)\n",
               agent_heap, o.pages);
  EmitMetric("agent.inprocess.heap_bytes_per_page", agent_heap, "bytes");
  // Against what the page's state at rest needs: state, version, last txn.
  EmitMetric("agent.inprocess.heap_bytes_per_page.vs_state_size", agent_heap / 24.0, "ratio");

  struct Workload {
    const char* name;
    Result<Rate> (*run)(size_t, const InProcessOptions&);
  };
  const Workload workloads[] = {{"write_pingpong", WritePingPong},
                                {"read_share_write", ReadShareWrite}};
  for (const Workload& w : workloads) {
    for (size_t nodes : {size_t{2}, size_t{4}}) {
      Result<Rate> r = w.run(nodes, o);
      if (!r.ok()) {
        return Internal(std::string(w.name) + " with " + Str(nodes) +
                        " nodes: " + r.status().message());
      }
      const double tps = r->transactions / r->seconds;
      const double mps = r->messages / r->seconds;
      std::fprintf(stderr,
                   "directory in-process: %s, %zu nodes: %llu transactions in %.2f s, %.3g txn/s "
                   "(%.0f ns each), %.2f directory messages per txn; checks passed\n",
                   w.name, nodes, static_cast<unsigned long long>(r->transactions), r->seconds, tps,
                   1e9 / tps, static_cast<double>(r->messages) / r->transactions);
      // Persisting the dirty records is not part of these figures: the name says so.
      const std::string prefix =
          "directory.inprocess_no_persist." + std::string(w.name) + ".nodes" + Str(nodes);
      EmitMetric(prefix + ".txn_per_s", tps, "txn/s");
      EmitMetric(prefix + ".msg_per_s", mps, "msg/s");
      EmitMetric(prefix + ".vs_map_update", tps / baseline, "ratio");
    }
  }
  return Status::Ok();
}

}  // namespace dsvm::bench
