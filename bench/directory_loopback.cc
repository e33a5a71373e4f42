#include "bench/directory_loopback.h"

#include <unistd.h>

#include <atomic>
#include <barrier>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_output.h"
#include "bench/coordinator_process.h"
#include "proto/auth.h"
#include "proto/framed_socket.h"
#include "proto/messages.h"

namespace dsvm::bench {
namespace {

using proto::DataSource;
using proto::NodeId;
using proto::PageAddr;
using proto::PageState;
using proto::TxnId;

constexpr uint64_t kPageSize = 4096;
// Request ids of heartbeats and page queries start here, far from each
// other and from FramedSocket::Call's own ids.
constexpr uint64_t kHeartbeatIdBase = uint64_t{1} << 40;
constexpr uint64_t kQueryIdBase = uint64_t{2} << 40;
// Nothing received for this long while requests are outstanding: stuck.
constexpr int kStuckAfterMs = 10000;
constexpr auto kStuckAfter = std::chrono::milliseconds(kStuckAfterMs);
constexpr int kPollMs = 200;

std::string Str(uint64_t v) { return std::to_string(v); }

// FramedSocket::Receive reports a timeout as kUnavailable, like a closed
// connection; only the text tells them apart.
bool IsTimeout(const Status& s) {
  return s.code() == StatusCode::kUnavailable && s.message().find("timed out") != std::string::npos;
}

enum class Mode : uint8_t { kPrime, kHeartbeat, kAcquire };

// When a phase counts completions; set by the barrier that starts it.
struct PhaseClock {
  Clock::time_point from;
  Clock::time_point until;
};

// One node connection: a node daemon reduced to what the directory sees.
class BenchNode {
 public:
  explicit BenchNode(size_t pages) : pages_(pages) {}

  Status Join(const std::string& address, const proto::ClusterSecret* secret) {
    DSVM_ASSIGN_OR_RETURN(sock_, proto::ConnectToCoordinator(address, secret));
    proto::JoinRequest join;
    join.node = proto::kNoNode;  // assign one
    join.address = "127.0.0.1:1";
    DSVM_ASSIGN_OR_RETURN(proto::Message reply, sock_.Call(join));
    if (const auto* s = std::get_if<proto::StatusReply>(&reply)) {
      return Unavailable("join refused: " + proto::FromReply(*s).ToString());
    }
    const auto* j = std::get_if<proto::JoinReply>(&reply);
    if (j == nullptr) {
      return Internal(std::string("JoinRequest answered with ") +
                      proto::TypeName(proto::TypeOf(reply)));
    }
    if (j->node == proto::kNoNode) return Internal("JoinReply assigned node 0");
    id_ = j->node;
    heartbeat_every_ = std::chrono::milliseconds(
        j->heartbeat_interval_ms == 0 ? 500 : std::max<uint32_t>(j->heartbeat_interval_ms / 2, 1));
    std::fprintf(stderr,
                 "directory loopback: joined as node %u (heartbeat every %u ms, dead after %u ms, "
                 "shard %u of %u)\n",
                 id_, j->heartbeat_interval_ms, j->dead_after_ms, j->shard, j->shard_count);
    return Status::Ok();
  }

  // Creates a region for the bench's pages; its base and id.
  Result<proto::RegionReply> CreateRegion(const std::string& name) {
    proto::RegionCreate create;
    create.name = name;
    create.size = pages_.size() * kPageSize;
    create.page_size = kPageSize;
    DSVM_ASSIGN_OR_RETURN(proto::Message reply, sock_.Call(create));
    if (const auto* s = std::get_if<proto::StatusReply>(&reply)) {
      return Status(proto::FromReply(*s).code(),
                    "RegionCreate refused: " + proto::FromReply(*s).message());
    }
    const auto* r = std::get_if<proto::RegionReply>(&reply);
    if (r == nullptr) return Internal("RegionCreate answered with an unexpected type");
    if (r->size < create.size || r->page_size != kPageSize || r->base % kPageSize != 0) {
      return Internal("RegionCreate gave a region of " + Str(r->size) + " bytes in pages of " +
                      Str(r->page_size));
    }
    return *r;
  }

  Status DeleteRegion(const std::string& name) {
    DSVM_ASSIGN_OR_RETURN(proto::Message reply, sock_.Call(proto::RegionDelete{.name = name}));
    const auto* s = std::get_if<proto::StatusReply>(&reply);
    if (s == nullptr) return Internal("RegionDelete answered with an unexpected type");
    return proto::FromReply(*s);
  }

  NodeId id() const { return id_; }
  void set_peer(NodeId peer) { peer_ = peer; }
  void set_region(const proto::RegionReply& r) {
    base_ = r.base;
    region_ = r.region;
  }
  // Pages this node will ask for once acquires start.
  void WantAllPages() {
    for (size_t i = 0; i < pages_.size(); ++i) ready_.push_back(i);
  }

  // Runs one phase: keeps `window` requests of its mode outstanding until
  // clock.until (kPrime: until every wanted page is held), then waits for
  // what is outstanding. Returns the completions inside [from, until].
  Result<uint64_t> Run(Mode mode, size_t window, const PhaseClock& clock,
                       const std::atomic<bool>& abort) {
    uint64_t counted = 0;
    Clock::time_point last_frame = Clock::now();
    Clock::time_point next_heartbeat = last_frame;
    for (;;) {
      const Clock::time_point now = Clock::now();
      const bool stopping = abort.load(std::memory_order_relaxed) ||
                            (mode == Mode::kPrime ? ready_.empty() : now >= clock.until);
      if (!stopping) {
        if (mode == Mode::kHeartbeat) {
          while (heartbeats_out_.size() < window) SendHeartbeat();
        } else {
          while (acquires_out_ < window && !ready_.empty()) {
            SendAcquire(ready_.front());
            ready_.pop_front();
          }
        }
      }
      if (mode != Mode::kHeartbeat && now >= next_heartbeat) {
        // Keeps the node alive while it only acquires.
        SendHeartbeat();
        next_heartbeat = now + heartbeat_every_;
      }
      DSVM_RETURN_IF_ERROR(sock_.Flush());
      if (stopping && acquires_out_ == 0 && heartbeats_out_.empty()) break;

      Result<proto::Frame> f = sock_.Receive(kPollMs);
      if (!f.ok()) {
        if (!IsTimeout(f.status())) {
          return Unavailable("node " + Str(id_) + ": " + f.status().ToString());
        }
        if (Clock::now() - last_frame > kStuckAfter) {
          return Unavailable("node " + Str(id_) + ": nothing received for 10 s with " +
                             Str(acquires_out_) + " acquires and " + Str(heartbeats_out_.size()) +
                             " heartbeats outstanding");
        }
        continue;
      }
      last_frame = Clock::now();
      const bool in_window = last_frame >= clock.from && last_frame <= clock.until;
      for (;;) {
        Mode completed = Mode::kPrime;
        DSVM_ASSIGN_OR_RETURN(const bool done, Handle(*f, &completed));
        if (done && completed == mode && in_window) ++counted;
        // Then what has arrived meanwhile, without waiting.
        f = sock_.Receive(0);
        if (!f.ok()) {
          if (!IsTimeout(f.status())) {
            return Unavailable("node " + Str(id_) + ": " + f.status().ToString());
          }
          break;
        }
      }
    }
    return counted;
  }

  // Asks the directory about every page this node holds (PageQuery): it must
  // record this node as sole writer, at the txn and version the node got.
  // Runs when neither node has a request outstanding. Frames that arrive
  // before a reply are handled first: a Fetch the other node's last acquire
  // caused can still be on its way, and a page it moved is no longer held.
  Status CheckHeld() {
    size_t checked = 0, moved = 0;
    for (size_t i = 0; i < pages_.size(); ++i) {
      if (pages_[i].state != PageState::kModified) continue;
      const uint64_t rid = kQueryIdBase + i;
      sock_.Queue(proto::PageQuery{PageOf(i)}, rid);
      DSVM_RETURN_IF_ERROR(sock_.Flush());
      std::optional<proto::Message> reply;
      while (!reply) {
        DSVM_ASSIGN_OR_RETURN(proto::Frame f, sock_.Receive(kStuckAfterMs));
        if (f.header.request_id == rid) {
          reply = std::move(f.message);
        } else {
          Mode completed = Mode::kPrime;
          DSVM_ASSIGN_OR_RETURN(const bool done, Handle(f, &completed));
          if (done && completed == Mode::kAcquire) return Internal("a grant after the last phase");
        }
      }
      if (const auto* s = std::get_if<proto::StatusReply>(&*reply)) {
        std::fprintf(stderr, "directory loopback: PageQuery refused (%s): final check skipped\n",
                     proto::FromReply(*s).ToString().c_str());
        return Status::Ok();
      }
      const auto* q = std::get_if<proto::PageQueryReply>(&*reply);
      if (q == nullptr) return Internal("PageQuery answered with an unexpected type");
      const LocalPage& p = pages_[i];
      if (p.state != PageState::kModified) {
        ++moved;
        continue;
      }
      if (q->page != PageOf(i) || q->state != PageState::kModified || q->owner != id_ ||
          q->busy != 0 || q->lost != 0 || q->txn != p.last_txn || q->version != p.version ||
          q->sharers != std::vector<NodeId>{id_}) {
        return Internal("page " + Str(i) + ": node " + Str(id_) + " holds it Modified at txn " +
                        Str(p.last_txn) + " version " + Str(p.version) +
                        "; the directory says state " + Str(static_cast<uint8_t>(q->state)) +
                        " owner " + Str(q->owner) + " txn " + Str(q->txn) + " version " +
                        Str(q->version) + " busy " + Str(q->busy) + " lost " + Str(q->lost) +
                        " sharers " + Str(q->sharers.size()));
      }
      ++checked;
    }
    std::fprintf(stderr,
                 "directory loopback: node %u: %zu held pages agree with PageQuery (%zu moved to "
                 "the other node by late fetches)\n",
                 id_, checked, moved);
    return Status::Ok();
  }

  Status Leave() {
    DSVM_ASSIGN_OR_RETURN(proto::Message reply, sock_.Call(proto::LeaveRequest{id_}));
    const auto* s = std::get_if<proto::StatusReply>(&reply);
    if (s == nullptr) return Internal("LeaveRequest answered with an unexpected type");
    return proto::FromReply(*s);
  }

 private:
  struct LocalPage {
    PageState state = PageState::kInvalid;
    TxnId last_txn = 0;        // newest Grant/Fetch/Invalidate txn processed
    uint64_t version = 0;      // of the last grant
    uint64_t pending_seq = 0;  // outstanding Acquire; 0: none
  };

  PageAddr PageOf(size_t index) const { return base_ + index * kPageSize; }

  void SendHeartbeat() {
    const uint64_t rid = kHeartbeatIdBase + next_heartbeat_id_++;
    sock_.Queue(proto::Heartbeat{id_, {}}, rid);
    heartbeats_out_.push_back(rid);
  }

  void SendAcquire(size_t index) {
    LocalPage& p = pages_[index];
    DSVM_CHECK(p.pending_seq == 0 && p.state == PageState::kInvalid);
    p.pending_seq = ++next_seq_;
    // Holds nothing: kWrite, not kUpgrade; last_txn as the directory needs it.
    sock_.Queue(
        proto::Acquire{.page = PageOf(index),
                       .node = id_,
                       .kind = proto::AccessKind::kWrite,
                       .request_seq = p.pending_seq,
                       .last_txn = p.last_txn,
                       .region = region_},
        0);
    ++acquires_out_;
  }

  // Checks and answers one frame. Returns true with *completed set when it
  // completes one of this node's requests.
  Result<bool> Handle(const proto::Frame& f, Mode* completed) {
    const std::string what = proto::TypeName(f.header.type);
    if (f.header.request_id != 0) {
      const auto* r = std::get_if<proto::StatusReply>(&f.message);
      if (r == nullptr) {
        return Internal("node " + Str(id_) + ": " + what + " with request_id " +
                        Str(f.header.request_id) + ", expected only StatusReply to heartbeats");
      }
      // One connection, served in order: replies come in request order.
      if (heartbeats_out_.empty() || heartbeats_out_.front() != f.header.request_id) {
        return Internal("node " + Str(id_) + ": reply to request_id " + Str(f.header.request_id) +
                        (heartbeats_out_.empty() ? ", none outstanding"
                                                 : ", expected " + Str(heartbeats_out_.front())));
      }
      heartbeats_out_.pop_front();
      if (r->code != 0) {
        return Internal("node " + Str(id_) +
                        ": heartbeat refused: " + proto::FromReply(*r).ToString());
      }
      *completed = Mode::kHeartbeat;
      return true;
    }
    size_t index = 0;
    auto page_index = [&](PageAddr page) {
      if (page < base_ || (page - base_) % kPageSize != 0) return false;
      index = (page - base_) / kPageSize;
      return index < pages_.size();
    };
    auto fail = [&](const std::string& why) -> Result<bool> {
      return Internal("node " + Str(id_) + ": " + what + " of page " + Str(index) + ": " + why);
    };
    if (const auto* g = std::get_if<proto::Grant>(&f.message)) {
      if (!page_index(g->page)) return fail("not a page this bench uses");
      LocalPage& p = pages_[index];
      if (g->status != 0) return fail("refused with status " + Str(g->status));
      if (p.pending_seq == 0 || g->request_seq != p.pending_seq) {
        return fail("request_seq " + Str(g->request_seq) + ", the outstanding one is " +
                    Str(p.pending_seq));
      }
      if (g->txn <= p.last_txn) {
        return fail("txn " + Str(g->txn) + " not newer than " + Str(p.last_txn));
      }
      if (g->state != PageState::kModified) return fail("not Modified");
      if (g->version <= p.version) return fail("version did not grow");
      // A first write fills zeros; every later one takes the other node's copy.
      const DataSource want = g->version == 1 ? DataSource::kZero : DataSource::kOwner;
      if (g->source != want) {
        return fail("data source " + Str(static_cast<uint8_t>(g->source)) + " at version " +
                    Str(g->version));
      }
      p.state = PageState::kModified;
      p.last_txn = g->txn;
      p.version = g->version;
      p.pending_seq = 0;
      --acquires_out_;
      // A daemon waits for the PageData of kOwner first; that travels between
      // nodes, not through the directory, and is not part of this bench.
      sock_.Queue(proto::Done{g->page, g->txn, id_}, 0);
      *completed = Mode::kAcquire;
      return true;
    }
    if (const auto* m = std::get_if<proto::Fetch>(&f.message)) {
      if (!page_index(m->page)) return fail("not a page this bench uses");
      LocalPage& p = pages_[index];
      if (m->txn <= p.last_txn) {
        return fail("txn " + Str(m->txn) + " not newer than " + Str(p.last_txn));
      }
      if (p.state != PageState::kModified) return fail("this node holds no copy");
      if (m->requester != peer_ || m->next_state != PageState::kInvalid || m->send_data != 1) {
        return fail("expected send_data=1, next_state Invalid, requester " + Str(peer_));
      }
      // The copy goes to the peer (not simulated) and into a stash until Release.
      p.state = PageState::kInvalid;
      p.last_txn = m->txn;
      ready_.push_back(index);
      return false;
    }
    if (const auto* m = std::get_if<proto::Release>(&f.message)) {
      if (!page_index(m->page)) return fail("not a page this bench uses");
      if (m->txn > pages_[index].last_txn) return fail("txn newer than any this node saw");
      return false;
    }
    // Invalidate needs a Shared copy, EvictReply an Evict: neither happens here.
    return Internal("node " + Str(id_) + ": unexpected " + what);
  }

  proto::FramedSocket sock_;
  NodeId id_ = proto::kNoNode;
  NodeId peer_ = proto::kNoNode;
  PageAddr base_ = 0;
  proto::RegionId region_ = 0;
  std::chrono::milliseconds heartbeat_every_{500};
  std::vector<LocalPage> pages_;
  std::deque<size_t> ready_;  // pages to acquire, in order
  size_t acquires_out_ = 0;
  std::deque<uint64_t> heartbeats_out_;  // request ids, oldest first
  uint64_t next_seq_ = 0;
  uint64_t next_heartbeat_id_ = 0;
};

struct Phase {
  Mode mode;
  size_t window;
  bool both;  // false: only the first node works (priming)
};

}  // namespace

Status RunDirectoryLoopback(const LoopbackOptions& o, bool* skipped) {
  *skipped = false;
  std::unique_ptr<CoordinatorProcess> process;
  std::string address = o.coordinator_address;
  // A coordinator of someone else's: its secret comes from $DSVM_SECRET_FILE.
  std::optional<proto::ClusterSecret> given;
  const proto::ClusterSecret* secret = nullptr;
  if (!address.empty()) {
    if (const std::string path = proto::SecretPath(""); !path.empty()) {
      DSVM_ASSIGN_OR_RETURN(proto::ClusterSecret s, proto::ClusterSecret::Load(path));
      given = std::move(s);
      secret = &*given;
    }
  }
  if (address.empty()) {
    std::string binary = o.coordinator_binary;
    if (binary.empty()) {
      binary = DefaultCoordinatorBinary();
      if (binary.empty() || ::access(binary.c_str(), X_OK) != 0) {
        std::fprintf(stderr,
                     "coordinator binary not found: skipping loopback part (looked for %s; "
                     "build target dsvm-coordinator, or pass --coordinator-bin PATH or "
                     "--coordinator HOST:PORT)\n",
                     binary.empty() ? "<cannot read /proc/self/exe>" : binary.c_str());
        *skipped = true;
        return Status::Ok();
      }
    }
    DSVM_ASSIGN_OR_RETURN(process, CoordinatorProcess::Start(binary));
    address = process->address();
    secret = &process->secret();
    std::fprintf(stderr, "directory loopback: started %s on %s\n", binary.c_str(), address.c_str());
  }

  Status result = [&]() -> Status {
    BenchNode a(o.pages), b(o.pages);
    DSVM_RETURN_IF_ERROR(a.Join(address, secret));
    DSVM_RETURN_IF_ERROR(b.Join(address, secret));
    if (a.id() == b.id()) return Internal("both connections were assigned node " + Str(a.id()));
    a.set_peer(b.id());
    b.set_peer(a.id());
    const std::string region = "dsvm-bench-" + Str(static_cast<uint64_t>(::getpid()));
    DSVM_ASSIGN_OR_RETURN(const proto::RegionReply made, a.CreateRegion(region));
    a.set_region(made);
    b.set_region(made);
    // Node a writes every page once (zero fills, untimed); from then on b
    // takes them from a and a takes them back: every acquire moves a page.
    a.WantAllPages();
    b.WantAllPages();

    std::vector<Phase> phases = {{Mode::kPrime, 64, false}};
    for (size_t w : o.windows) {
      phases.push_back({Mode::kHeartbeat, w, true});
      phases.push_back({Mode::kAcquire, w, true});
    }
    std::vector<uint64_t> counts(phases.size() * 2, 0);
    std::atomic<bool> abort{false};
    std::mutex error_mu;
    Status error;  // GUARDED_BY(error_mu): the first failure
    PhaseClock clock;
    std::barrier sync(2, [&]() noexcept {
      clock.from = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(o.warmup_seconds));
      clock.until = clock.from + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(o.seconds));
    });
    auto body = [&](BenchNode& node, size_t which) {
      for (size_t k = 0; k <= phases.size(); ++k) {
        sync.arrive_and_wait();
        if (abort.load()) continue;
        Status s;
        if (k == phases.size()) {
          s = node.CheckHeld();  // after the last phase: nothing in flight
        } else if (phases[k].both || which == 0) {
          Result<uint64_t> r = node.Run(phases[k].mode, phases[k].window, clock, abort);
          if (r.ok()) counts[k * 2 + which] = *r;
          s = r.status();
        }
        if (!s.ok()) {
          std::lock_guard<std::mutex> l(error_mu);
          if (error.ok()) error = s;
          abort.store(true);
        }
      }
    };
    std::thread ta(body, std::ref(a), 0);
    std::thread tb(body, std::ref(b), 1);
    ta.join();
    tb.join();
    DSVM_RETURN_IF_ERROR(error);

    for (size_t k = 0; k < phases.size(); ++k) {
      if (phases[k].mode != Mode::kAcquire) continue;
      DSVM_CHECK(k > 0 && phases[k - 1].mode == Mode::kHeartbeat);
      const double acquires = (counts[k * 2] + counts[k * 2 + 1]) / o.seconds;
      const double heartbeats = (counts[(k - 1) * 2] + counts[(k - 1) * 2 + 1]) / o.seconds;
      if (acquires <= 0 || heartbeats <= 0) {
        return Internal("window " + Str(phases[k].window) + ": nothing completed in the window");
      }
      std::fprintf(stderr,
                   "directory loopback: window %zu per connection: %.3g acquires/s, %.3g "
                   "heartbeats/s; checks passed\n",
                   phases[k].window, acquires, heartbeats);
      const std::string prefix = "directory.loopback.w" + Str(phases[k].window);
      EmitMetric(prefix + ".acquires_per_s", acquires, "req/s");
      EmitMetric(prefix + ".heartbeats_per_s", heartbeats, "req/s");
      EmitMetric(prefix + ".acquire_vs_heartbeat", acquires / heartbeats, "ratio");
    }
    DSVM_RETURN_IF_ERROR(a.DeleteRegion(region));
    DSVM_RETURN_IF_ERROR(a.Leave());
    DSVM_RETURN_IF_ERROR(b.Leave());
    return Status::Ok();
  }();

  if (process != nullptr) {
    if (!result.ok()) process->PrintLogTail(40);
    Status stopped = process->Stop();
    if (result.ok()) result = stopped;
  }
  return result;
}

}  // namespace dsvm::bench
