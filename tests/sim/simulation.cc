#include "tests/sim/simulation.h"

#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "coordinator/directory/page_directory.h"
#include "node/coherence/node_agent.h"
#include "proto/messages.h"
#include "proto/shard_map.h"
#include "proto/wire.h"

namespace dsvm::sim {
namespace {

using coordinator::Outbox;
using coordinator::PageDirectory;
using coordinator::PageRecord;
using node::ActionKind;
using node::Actions;
using node::NodeAgent;
using proto::Message;
using proto::NodeId;
using proto::PageAddr;
using proto::PageState;
using proto::TxnId;

constexpr uint32_t kShardEndpoint = 1u << 20;  // endpoint ids >= this are directory shards
constexpr proto::RegionId kRegion = 1;         // the one region every simulated page is in
constexpr PageAddr kWindowBase = 0x100000000000ull;
constexpr uint64_t kRetransmitMs = 60;
constexpr uint64_t kTickEveryMs = 15;
constexpr size_t kMaxWaitersPerNode = 16;
constexpr uint64_t kHealSteps = 400000;

// Deterministic on every platform: no std distributions.
class Rng {
 public:
  explicit Rng(uint64_t seed) : g_(seed) {}
  uint64_t Next() { return g_(); }
  uint64_t Below(uint64_t n) { return n == 0 ? 0 : g_() % n; }
  double Unit() { return static_cast<double>(g_() >> 11) * 0x1.0p-53; }
  bool Chance(double p) { return Unit() < p; }

 private:
  std::mt19937_64 g_;
};

struct InFlight {
  uint64_t deliver_at = 0;
  uint32_t from = 0;
  uint32_t to = 0;
  std::vector<uint8_t> bytes;  // every message crosses the real codec
};

struct SimNode {
  explicit SimNode(NodeId id) : id(id), agent(id, node::NodeOptions{kRetransmitMs}) {}
  NodeId id;
  NodeAgent agent;
  std::map<PageAddr, uint64_t> bytes;  // the node's copy of each page (a page is one u64 here)
  std::map<PageAddr, int> access;      // 0 none, 1 read, 2 read+write
  std::map<std::pair<PageAddr, TxnId>, uint64_t> stash;
  std::map<uint64_t, uint64_t> data;   // DataHandle -> received value
  std::map<uint64_t, std::pair<PageAddr, bool>> waiters;
  std::map<PageAddr, uint64_t> installed;  // value when the page last became writable here
};

struct SimShard {
  std::unique_ptr<PageDirectory> dir;
  std::map<PageAddr, std::vector<uint8_t>> disk;  // persisted PageRecords
};

std::string Describe(const Message& m) {
  return std::visit(
      [](const auto& x) -> std::string {
        using T = std::decay_t<decltype(x)>;
        std::string s = proto::TypeName(T::kType);
        if constexpr (requires { x.page; }) s += " page=" + std::to_string(x.page >> 21);
        if constexpr (requires { x.txn; }) s += " txn=" + std::to_string(x.txn);
        if constexpr (requires { x.kind; }) s += " kind=" + std::to_string(int(x.kind));
        if constexpr (requires { x.request_seq; }) s += " seq=" + std::to_string(x.request_seq);
        if constexpr (requires { x.source; }) s += " src=" + std::to_string(int(x.source));
        if constexpr (requires { x.requester; }) s += " req=" + std::to_string(x.requester);
        if constexpr (requires { x.next_state; }) s += " next=" + std::to_string(int(x.next_state));
        return s;
      },
      m);
}

class Simulation {
 public:
  explicit Simulation(const SimConfig& c) : c_(c), rng_(c.seed), shard_map_(c.shards) {
    for (uint32_t i = 0; i < c_.nodes; ++i) nodes_.push_back(std::make_unique<SimNode>(i + 1));
    shards_.resize(c_.shards);
    for (uint32_t s = 0; s < c_.shards; ++s) StartShard(s);
    for (uint32_t p = 0; p < c_.pages; ++p) {
      pages_.push_back(kWindowBase + uint64_t{p} * proto::kShardGranule);
    }
  }

  SimResult Run() {
    for (r_.steps = 0; r_.steps < c_.steps && r_.ok; ++r_.steps) {
      Step(/*healing=*/false);
      if (r_.ok) CheckInvariants();
    }
    // Heal: no new faults, a perfect network; everything waiting must finish.
    healing_ = true;
    for (uint64_t i = 0; i < kHealSteps && r_.ok && !Quiescent(); ++i) {
      Step(/*healing=*/true);
      if (r_.ok) CheckInvariants();
    }
    if (r_.ok && !Quiescent()) Fail("no progress: accesses still waiting after the network healed");
    if (r_.ok) CheckHoldersAreKnown();
    // Bytes no grant will claim (sent to a node's former process, say)
    // are dropped within the agents' longest resend interval.
    const uint64_t until = now_ + (kRetransmitMs << 5);
    while (r_.ok && now_ < until && BytesHeld()) Step(/*healing=*/true);
    if (r_.ok) CheckNoBytesLeft();
    for (const auto& s : shards_) r_.transactions += s.dir->stats().transactions;
    for (const auto& n : nodes_) CountDirect(*n);
    return r_;
  }

 private:
  void Fail(const std::string& why) {
    if (!r_.ok) return;
    r_.ok = false;
    r_.failure = "step " + std::to_string(r_.steps) + " (t=" + std::to_string(now_) + "ms): " + why;
  }

  void Step(bool healing) {
    if (rng_.Chance(0.3)) ++now_;
    if (now_ >= next_tick_) {
      next_tick_ = now_ + kTickEveryMs;
      TickAll();
      return;
    }
    const double roll = rng_.Unit();
    if (healing || roll < 0.55) {
      if (!DeliverOne()) ++now_;
      return;
    }
    if (roll < 0.55 + c_.crash_rate) {
      CrashShard(static_cast<uint32_t>(rng_.Below(c_.shards)));
    } else if (roll < 0.55 + c_.crash_rate + c_.node_crash_rate) {
      CrashNode(static_cast<uint32_t>(rng_.Below(nodes_.size())));
    } else if (roll < 0.55 + c_.crash_rate + c_.node_crash_rate + c_.evict_rate) {
      SimNode& n = *nodes_[rng_.Below(nodes_.size())];
      Actions acts;
      // Half the give-ups name a node for the last copy (preferred-node
      // advice): any node, itself and crashed ones included.
      const PageAddr page = pages_[rng_.Below(pages_.size())];
      const proto::NodeId target =
          rng_.Below(2) ? static_cast<proto::NodeId>(1 + rng_.Below(nodes_.size())) : proto::kNoNode;
      if (n.agent.Evict(page, now_, &acts, target)) ++r_.evictions;
      Apply(n, acts);
    } else if (rng_.Chance(c_.sweep_rate)) {
      ProcessSweep();
    } else {
      ProcessAccess();
    }
  }

  // A node touches every page in address order in one turn, as a prefetch
  // or a sequential read does: its requests, and what answers them, line
  // up into PageRuns.
  void ProcessSweep() {
    SimNode& n = *nodes_[rng_.Below(nodes_.size())];
    const bool write = rng_.Chance(0.4);
    Actions acts;
    std::vector<PageAddr> hits;
    for (PageAddr page : pages_) {
      if (n.waiters.size() >= kMaxWaitersPerNode) break;
      const uint64_t waiter = ++next_waiter_;
      node::FaultResult fr = n.agent.Fault(page, write, waiter, now_, &acts, AskHolder(write));
      if (fr == node::FaultResult::kWait) n.waiters[waiter] = {page, write};
      if (fr == node::FaultResult::kHit) hits.push_back(page);
    }
    Apply(n, acts);
    for (PageAddr page : hits) {
      if (!r_.ok) return;
      Access(n, page, write);
    }
  }

  void ProcessAccess() {
    SimNode& n = *nodes_[rng_.Below(nodes_.size())];
    if (n.waiters.size() >= kMaxWaitersPerNode) return;
    const PageAddr page = pages_[rng_.Below(pages_.size())];
    const bool write = rng_.Chance(0.4);
    const uint64_t waiter = ++next_waiter_;
    Actions acts;
    node::FaultResult fr = n.agent.Fault(page, write, waiter, now_, &acts, AskHolder(write));
    if (fr == node::FaultResult::kWait) n.waiters[waiter] = {page, write};
    Apply(n, acts);
    if (fr == node::FaultResult::kHit) Access(n, page, write);
  }

  // Draws nothing when runs never ask, so that such a seed replays as before.
  bool AskHolder(bool write) {
    return !write && c_.direct_rate > 0 && rng_.Chance(c_.direct_rate);
  }

  // Whom a direct read asks: as often as not a node that holds the page
  // now (as a good hint would be), else any other node (a stale one).
  NodeId HintFor(const SimNode& n, PageAddr page) {
    std::vector<NodeId> holders;
    for (const auto& other : nodes_) {
      if (other->id != n.id && other->agent.StateOf(page) != PageState::kInvalid) {
        holders.push_back(other->id);
      }
    }
    if (!holders.empty() && rng_.Chance(0.5)) return holders[rng_.Below(holders.size())];
    NodeId pick = static_cast<NodeId>(1 + rng_.Below(nodes_.size()));
    return pick == n.id ? static_cast<NodeId>(1 + pick % nodes_.size()) : pick;
  }

  void Access(SimNode& n, PageAddr page, bool write) {
    const PageState st = n.agent.StateOf(page);
    const int acc = n.access.count(page) ? n.access[page] : 0;
    auto where = " node " + std::to_string(n.id) + " page " + std::to_string(page >> 21);
    if (write) {
      if (st != PageState::kModified || acc != 2) return Fail("write without Modified access at" + where);
      const uint64_t v = ++write_counter_;
      if (c_.verbose) std::printf("t=%llu node %u writes %llu\n", static_cast<unsigned long long>(now_), n.id, static_cast<unsigned long long>(v));
      n.bytes[page] = v;
      truth_[page] = v;
      last_writer_[page] = n.id;
      also_ok_.erase(page);
      ++r_.writes;
    } else {
      if (st == PageState::kInvalid || acc < 1) return Fail("read without access at" + where);
      if (!n.bytes.count(page)) return Fail("read of a page with no bytes at" + where);
      if (!Accept(page, n.bytes[page])) {
        return Fail("stale read at" + where + ": got " + std::to_string(n.bytes[page]) +
                    ", latest write " + std::to_string(truth_[page]));
      }
      ++r_.reads;
    }
  }

  // --- network -------------------------------------------------------------

  // Queued per link until the sender's turn ends (SendQueued), as the
  // daemon and the coordinator queue what they send in one loop turn.
  void Send(uint32_t from, uint32_t to, const Message& m) {
    ++r_.messages;
    queued_[{from, to}].push_back(m);
  }

  // Sends what each link queued as the real senders do: packed into
  // PageRun frames where messages line up (RunPacker), a frame at a time
  // through the faulty network, so a lost or late frame loses or delays
  // every message of its run together.
  void SendQueued() {
    for (auto& [link, messages] : queued_) {
      proto::RunPacker packer;
      std::vector<uint8_t> stream;
      for (const Message& m : messages) packer.Add(m, 0, &stream);
      packer.Finish(&stream);
      size_t pos = 0;
      while (pos < stream.size()) {
        uint64_t length = 0;
        for (int b = 0; b < 4; ++b) length |= uint64_t{stream[pos + 8 + b]} << (8 * b);
        const size_t end = pos + proto::kHeaderSize + length;
        Transmit(link.first, link.second, std::vector<uint8_t>(stream.begin() + pos, stream.begin() + end));
        pos = end;
      }
    }
    queued_.clear();
  }

  void Transmit(uint32_t from, uint32_t to, std::vector<uint8_t> bytes) {
    InFlight f;
    f.from = from;
    f.to = to;
    f.bytes = std::move(bytes);
    if (!healing_ && rng_.Chance(c_.drop_rate)) {
      ++r_.dropped;
      return;
    }
    f.deliver_at = now_ + rng_.Below(c_.max_delay_ms + 1);
    if (!healing_ && rng_.Chance(c_.duplicate_rate)) {
      InFlight dup = f;
      dup.deliver_at = now_ + rng_.Below(c_.max_delay_ms * 3 + 1);
      in_flight_.push_back(std::move(dup));
      ++r_.duplicated;
    }
    in_flight_.push_back(std::move(f));
  }

  bool DeliverOne() {
    std::vector<size_t> ready;
    for (size_t i = 0; i < in_flight_.size(); ++i) {
      if (in_flight_[i].deliver_at <= now_) ready.push_back(i);
    }
    if (ready.empty()) return false;
    const size_t pick = ready[rng_.Below(ready.size())];  // any order: reordering
    InFlight f = std::move(in_flight_[pick]);
    in_flight_[pick] = std::move(in_flight_.back());
    in_flight_.pop_back();
    auto frame = proto::Decode(f.bytes);
    if (!frame.ok()) {
      Fail("codec: " + frame.status().ToString());
      return true;
    }
    const auto* run = std::get_if<proto::PageRun>(&frame->message);
    if (run != nullptr) ++r_.runs;
    const uint32_t count = run != nullptr ? run->count : 1;
    for (uint32_t i = 0; i < count && r_.ok; ++i) {
      const Message m = run != nullptr ? proto::PageRunAt(*run, i) : frame->message;
      if (c_.verbose) {
        std::printf("t=%llu %u->%u %s%s\n", static_cast<unsigned long long>(now_), f.from, f.to,
                    Describe(m).c_str(), run != nullptr ? " (in a run)" : "");
      }
      if (f.to >= kShardEndpoint) {
        DeliverToShard(f.to - kShardEndpoint, m);
      } else {
        DeliverToNode(*nodes_[f.to - 1], m);
      }
    }
    return true;
  }

  void DeliverToShard(uint32_t s, const Message& m) {
    PageDirectory& dir = *shards_[s].dir;
    Outbox out;
    if (auto* a = std::get_if<proto::Acquire>(&m)) {
      if (shard_map_.ShardOf(a->page) != s) return Fail("request routed to the wrong shard");
      dir.HandleAcquire(*a, now_, &out);
    } else if (auto* ack = std::get_if<proto::InvalidateAck>(&m)) {
      dir.HandleInvalidateAck(*ack, now_, &out);
    } else if (auto* d = std::get_if<proto::Done>(&m)) {
      dir.HandleDone(*d, now_, &out);
    } else {
      return Fail("unexpected message at a directory: " + Describe(m));
    }
    Flush(s, out);
  }

  void DeliverToNode(SimNode& n, const Message& m) {
    Actions acts;
    if (auto* g = std::get_if<proto::Grant>(&m)) {
      n.agent.HandleGrant(*g, now_, &acts);
    } else if (auto* f = std::get_if<proto::Fetch>(&m)) {
      n.agent.HandleFetch(*f, now_, &acts);
    } else if (auto* i = std::get_if<proto::Invalidate>(&m)) {
      n.agent.HandleInvalidate(*i, now_, &acts);
    } else if (auto* r = std::get_if<proto::Release>(&m)) {
      n.agent.HandleRelease(*r, &acts);
    } else if (auto* e = std::get_if<proto::EvictReply>(&m)) {
      n.agent.HandleEvictReply(*e, now_, &acts);
    } else if (auto* rd = std::get_if<proto::ReadDirect>(&m)) {
      if (rd->region != kRegion) return Fail("ReadDirect of another region");
      n.agent.HandleReadDirect(*rd, now_, &acts);
    } else if (auto* d = std::get_if<proto::PageData>(&m)) {
      uint64_t v = 0;
      if (d->data.size() != 8) return Fail("page data of the wrong size");
      for (int b = 0; b < 8; ++b) v |= uint64_t{d->data[b]} << (8 * b);
      const uint64_t handle = ++next_handle_;
      n.data[handle] = v;
      n.agent.HandlePageData(*d, handle, now_, &acts);
    } else {
      return Fail("unexpected message at a node: " + Describe(m));
    }
    Apply(n, acts);
  }

  // Write-ahead: the directory's changed records reach its disk before any
  // of the messages that announce them leave.
  void Flush(uint32_t s, Outbox& out) {
    std::vector<PageRecord> dirty;
    shards_[s].dir->TakeDirty(&dirty);
    for (const PageRecord& r : dirty) shards_[s].disk[r.page] = proto::EncodeFields(r);
    for (const auto& o : out) {
      if (o.to == proto::kNoNode || o.to > nodes_.size()) return Fail("message to no node");
      Send(kShardEndpoint + s, o.to, o.message);
    }
    SendQueued();
  }

  void Apply(SimNode& n, Actions& acts) {
    ApplyActions(n, acts);
    SendQueued();
  }

  void ApplyActions(SimNode& n, Actions& acts) {
    for (node::Action& a : acts) {
      if (!r_.ok) return;
      const std::string where = " at node " + std::to_string(n.id) + " page " + std::to_string(a.page >> 21);
      switch (a.kind) {
        case ActionKind::kSendToDirectory:
          // As the daemon does: an Acquire names the region mapped at its
          // page (the simulated pages are all of one region).
          if (auto* acquire = std::get_if<proto::Acquire>(&a.message)) acquire->region = kRegion;
          Send(n.id, kShardEndpoint + shard_map_.ShardOf(a.page), a.message);
          break;
        case ActionKind::kSendPage:
        case ActionKind::kSendStash: {
          uint64_t v;
          if (a.kind == ActionKind::kSendPage) {
            if (!n.bytes.count(a.page)) return Fail("send of a page with no bytes" + where);
            v = n.bytes[a.page];
          } else {
            auto it = n.stash.find({a.page, a.txn});
            if (it == n.stash.end()) return Fail("send from a missing stash" + where);
            v = it->second;
          }
          proto::PageData d;
          d.page = a.page;
          d.txn = a.txn;
          d.sender = n.id;
          d.version = a.version;
          d.region = kRegion;
          for (int b = 0; b < 8; ++b) d.data.push_back(static_cast<uint8_t>(v >> (8 * b)));
          Send(n.id, a.node, d);
          break;
        }
        case ActionKind::kAskHolder:
          if (nodes_.size() > 1) {
            Send(n.id, HintFor(n, a.page), proto::ReadDirect{a.page, n.id, kRegion});
          }
          break;
        case ActionKind::kMapRead:
        case ActionKind::kMapWrite:
          if (!n.bytes.count(a.page)) return Fail("map of a page with no bytes" + where);
          if (a.kind == ActionKind::kMapWrite && n.access[a.page] != 2) {
            n.installed[a.page] = n.bytes[a.page];  // the value before this node's writes
          }
          n.access[a.page] = a.kind == ActionKind::kMapWrite ? 2 : 1;
          break;
        case ActionKind::kUnmap:
          n.access[a.page] = 0;
          break;
        case ActionKind::kDiscard:
          n.bytes.erase(a.page);
          n.access.erase(a.page);
          break;
        case ActionKind::kStash:
          if (!n.bytes.count(a.page)) return Fail("stash of a page with no bytes" + where);
          n.stash[{a.page, a.txn}] = n.bytes[a.page];
          n.bytes.erase(a.page);
          n.access.erase(a.page);
          break;
        case ActionKind::kInstallZero:
          n.bytes[a.page] = 0;
          break;
        case ActionKind::kInstallData: {
          auto it = n.data.find(a.handle);
          if (it == n.data.end()) return Fail("install of an unknown data handle" + where);
          n.bytes[a.page] = it->second;
          n.data.erase(it);
          break;
        }
        case ActionKind::kInstallStash: {
          auto it = n.stash.find({a.page, a.txn});
          if (it == n.stash.end()) return Fail("install from a missing stash" + where);
          n.bytes[a.page] = it->second;
          n.stash.erase(it);
          break;
        }
        case ActionKind::kDropStash:
          n.stash.erase({a.page, a.txn});
          break;
        case ActionKind::kDropData:
          n.data.erase(a.handle);
          break;
        case ActionKind::kWake: {
          auto it = n.waiters.find(a.waiter);
          if (it == n.waiters.end()) return Fail("wake of an unknown waiter" + where);
          auto [page, write] = it->second;
          n.waiters.erase(it);
          if (a.status != StatusCode::kOk) {
            if (a.status == StatusCode::kDataLoss && may_be_lost_.count(page)) {
              ++r_.lost_reads;
              break;
            }
            return Fail("access failed" + where + ": " + std::string(StatusCodeName(a.status)));
          }
          Access(n, page, write);
          break;
        }
        case ActionKind::kProtocolError:
          return Fail("protocol error" + where + ": " + a.text);
        case ActionKind::kInvalid:
          return Fail("invalid action" + where);
      }
    }
  }

  void TickAll() {
    for (uint32_t s = 0; s < shards_.size(); ++s) {
      Outbox out;
      shards_[s].dir->Tick(now_, &out);
      Flush(s, out);
    }
    for (auto& n : nodes_) {
      Actions acts;
      n->agent.Tick(now_, &acts);
      Apply(*n, acts);
    }
  }

  // --- crashes -------------------------------------------------------------

  void StartShard(uint32_t s) {
    coordinator::DirectoryOptions o;
    o.retransmit_after_ms = kRetransmitMs;
    shards_[s].dir = std::make_unique<PageDirectory>(o);
    for (const auto& [page, bytes] : shards_[s].disk) {
      PageRecord rec;
      Status st = proto::DecodeFields(bytes, &rec);
      if (!st.ok()) return Fail("stored record does not decode: " + st.ToString());
      shards_[s].dir->Restore(rec);
    }
    for (auto& n : nodes_) shards_[s].dir->NodeUp(n->id);
  }

  void CrashShard(uint32_t s) {
    ++r_.crashes;
    if (c_.verbose) std::printf("t=%llu directory shard %u CRASHES\n", static_cast<unsigned long long>(now_), s);
    r_.transactions += shards_[s].dir->stats().transactions;
    const uint32_t ep = kShardEndpoint + s;
    std::vector<InFlight> keep;
    for (auto& f : in_flight_) {
      if (f.to == ep) continue;                          // the dead process never reads it
      if (f.from == ep && rng_.Chance(0.5)) continue;    // unsent socket buffers vanish
      keep.push_back(std::move(f));
    }
    in_flight_ = std::move(keep);
    StartShard(s);
    // The nodes notice the reconnect and send their outstanding requests again.
    for (auto& n : nodes_) {
      Actions acts;
      n->agent.ResendAll(now_, &acts);
      Apply(*n, acts);
    }
  }

  // Whether `v` is a value page may show now; the first value seen after a
  // node crash settles which of the possible ones it is.
  bool Accept(PageAddr page, uint64_t v) {
    const uint64_t latest = truth_.count(page) ? truth_[page] : 0;
    if (v == latest) {
      also_ok_.erase(page);
      return true;
    }
    auto it = also_ok_.find(page);
    if (it == also_ok_.end() || !it->second.count(v)) return false;
    truth_[page] = v;
    also_ok_.erase(it);
    return true;
  }

  void CrashNode(uint32_t index) {
    ++r_.node_crashes;
    SimNode& old = *nodes_[index];
    if (c_.verbose) std::printf("t=%llu node %u CRASHES\n", static_cast<unsigned long long>(now_), old.id);
    const NodeId id = old.id;
    for (PageAddr page : pages_) {
      bool involved = old.agent.StateOf(page) != PageState::kInvalid || old.bytes.count(page) ||
                      old.agent.HasPending(page);
      for (const auto& [key, v] : old.stash) involved |= key.first == page;
      if (!involved) continue;
      may_be_lost_.insert(page);
      // Its writes die with it (an aborted move is restored from the former
      // owner's stash): the page may show the value it had before them.
      if (last_writer_[page] == id && old.installed.count(page)) {
        also_ok_[page].insert(old.installed[page]);
      }
    }
    // What was sent to it is lost; of the page bytes it sent, some were
    // on the wire already and still arrive (as from a process that died
    // after its send left). Its other messages go with it.
    const uint32_t ep = id;
    std::vector<InFlight> keep;
    for (auto& f : in_flight_) {
      const bool on_the_wire = f.from == ep && IsPageData(f) && rng_.Chance(0.5);
      if ((f.to != ep && f.from != ep) || on_the_wire) keep.push_back(std::move(f));
    }
    in_flight_ = std::move(keep);
    CountDirect(old);
    nodes_[index] = std::make_unique<SimNode>(id);  // back empty, same id
    // The directory learns of the death (missed heartbeats), then of the rejoin.
    for (uint32_t s = 0; s < shards_.size(); ++s) {
      Outbox out;
      shards_[s].dir->NodeDown(id, &out);
      Flush(s, out);
      shards_[s].dir->NodeUp(id);
    }
  }

  void CountDirect(const SimNode& n) {
    r_.direct_asks += n.agent.stats().direct_asks;
    r_.direct_installs += n.agent.stats().direct_installs;
    r_.direct_served += n.agent.stats().direct_served;
    r_.fetch_sends_skipped += n.agent.stats().fetch_sends_skipped;
  }

  static bool IsPageData(const InFlight& f) {
    auto frame = proto::Decode(f.bytes);
    return frame.ok() && std::holds_alternative<proto::PageData>(frame->message);
  }

  // --- checks --------------------------------------------------------------

  void CheckInvariants() {
    for (PageAddr page : pages_) {
      int writers = 0, readers = 0;
      for (auto& n : nodes_) {
        const PageState st = n->agent.StateOf(page);
        if (st == PageState::kInvalid) continue;
        (st == PageState::kModified ? writers : readers)++;
        auto it = n->bytes.find(page);
        if (it == n->bytes.end() || !Accept(page, it->second)) {
          return Fail("node " + std::to_string(n->id) + " holds page " + std::to_string(page >> 21) +
                      " without its latest value");
        }
      }
      if (writers > 1) return Fail("two writers of page " + std::to_string(page >> 21));
      if (writers == 1 && readers > 0) {
        return Fail("a writer and a reader of page " + std::to_string(page >> 21));
      }
    }
    for (auto& s : shards_) {
      Status st = s.dir->CheckInvariants();
      if (!st.ok()) return Fail("directory: " + st.ToString());
    }
  }

  // Once everything is quiet, every copy a node holds is one its directory
  // knows of. A copy the directory does not list would never be
  // invalidated: reads of it would go stale. A copy of a page the directory
  // holds lost is read and written by that node alone, while every other
  // node is told the page is gone (and its writes are seen by no one).
  void CheckHoldersAreKnown() {
    for (PageAddr page : pages_) {
      const PageRecord* rec = shards_[shard_map_.ShardOf(page)].dir->Find(page);
      for (auto& n : nodes_) {
        const PageState st = n->agent.StateOf(page);
        if (st == PageState::kInvalid) continue;
        const std::string who = "node " + std::to_string(n->id) + " holds page " +
                                std::to_string(page >> 21) + (st == PageState::kModified ? " Modified" : " Shared");
        if (rec == nullptr || rec->lost) {
          return Fail(who + " that the directory " + (rec ? "holds lost" : "never saw"));
        }
        if (rec->FindSharer(n->id) == nullptr) return Fail(who + " but is not among its holders");
        if (st == PageState::kModified && (rec->state != PageState::kModified || rec->owner != n->id)) {
          return Fail(who + " but the directory does not record it as the writer");
        }
      }
    }
  }

  bool BytesHeld() const {
    for (const auto& n : nodes_) {
      if (!n->data.empty()) return true;
    }
    return false;
  }

  // Once quiet, no received page bytes are held: each was installed or
  // dropped (data of a txn, or a direct read's bytes).
  void CheckNoBytesLeft() {
    for (const auto& n : nodes_) {
      if (!n->data.empty()) {
        return Fail("node " + std::to_string(n->id) + " still holds " +
                    std::to_string(n->data.size()) + " received pages once the cluster is quiet");
      }
    }
  }

  bool Quiescent() const {
    if (!in_flight_.empty()) return false;
    for (const auto& n : nodes_) {
      if (!n->waiters.empty()) return false;
      for (PageAddr p : pages_) {
        if (n->agent.HasPending(p)) return false;
      }
    }
    for (const auto& s : shards_) {
      if (s.dir->busy_count() != 0 || s.dir->telling_count() != 0) return false;
    }
    return true;
  }

  SimConfig c_;
  Rng rng_;
  proto::ShardMap shard_map_;
  std::vector<std::unique_ptr<SimNode>> nodes_;
  std::vector<SimShard> shards_;
  std::vector<PageAddr> pages_;
  std::vector<InFlight> in_flight_;
  std::map<std::pair<uint32_t, uint32_t>, std::vector<Message>> queued_;  // (from, to)
  std::map<PageAddr, uint64_t> truth_;  // latest completed write per page
  // After a node crash, values a page may legitimately show besides truth_
  // (the value before the dead node got it); narrowed at the first look.
  std::map<PageAddr, std::set<uint64_t>> also_ok_;
  std::set<PageAddr> may_be_lost_;      // a dead node took part in it
  std::map<PageAddr, NodeId> last_writer_;
  uint64_t now_ = 0;
  uint64_t next_tick_ = 0;
  uint64_t next_waiter_ = 0;
  uint64_t next_handle_ = 0;
  uint64_t write_counter_ = 0;
  bool healing_ = false;
  SimResult r_;
};

}  // namespace

SimConfig ConfigForSeed(uint64_t seed, bool harsh) {
  Rng rng(seed ^ 0x9E3779B97F4A7C15ull);
  SimConfig c;
  c.seed = seed;
  c.nodes = 2 + static_cast<uint32_t>(rng.Below(4));   // 2..5
  c.shards = 1 + static_cast<uint32_t>(rng.Below(3));  // 1..3
  c.pages = 1 + static_cast<uint32_t>(rng.Below(10));  // 1..10: few pages, hot contention
  c.drop_rate = rng.Unit() * 0.06;
  c.duplicate_rate = rng.Unit() * 0.06;
  c.max_delay_ms = 1 + rng.Below(30);
  c.crash_rate = rng.Chance(0.7) ? rng.Unit() * 0.002 : 0.0;
  c.evict_rate = rng.Unit() * 0.03;
  c.node_crash_rate = (c.nodes >= 3 && rng.Chance(0.5)) ? rng.Unit() * 0.0006 : 0.0;
  if (harsh) {
    c.nodes = std::max<uint32_t>(c.nodes, 3);
    c.drop_rate *= 2.5;
    c.evict_rate *= 2.5;
    c.node_crash_rate = 0.0005 + rng.Unit() * 0.003;
  }
  // Drawn last, so the knobs above stay what they were for each seed.
  constexpr double kSweepRates[] = {0.0, 0.1, 0.5, 0.9};
  c.sweep_rate = kSweepRates[rng.Below(4)];
  constexpr double kDirectRates[] = {0.0, 0.5, 1.0};
  c.direct_rate = kDirectRates[rng.Below(3)];
  return c;
}

SimResult RunSimulation(const SimConfig& config) { return Simulation(config).Run(); }

}  // namespace dsvm::sim
