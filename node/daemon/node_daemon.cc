// The node daemon: start and stop, the event loop, the coordinator link,
// messages from the directory and from peers. The rest of NodeDaemon:
// leases and fences (node_daemon_leases.cc), accesses and the actions that
// carry them out (node_daemon_accesses.cc), prefetch and advice
// (node_daemon_prefetch.cc), GPU maps (node_daemon_gpu_maps.cc), client
// processes and their faults (node_daemon_clients.cc).
#include "node/daemon/node_daemon.h"

#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>

#include "node/daemon/daemon_util.h"
#include "node/fault/mixed_backend.h"
#include "node/fault/uffd_backend.h"
#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {

namespace {

constexpr size_t kMaxPendingPeerPages = 1024;

// Pages sent remembered for leaving out a resend's second copy.
constexpr size_t kRecentSends = 8192;
constexpr uint64_t kTickMs = 10;
constexpr uint64_t kReconnectEveryMs = 200;

// Heartbeats kept per link while their answers are awaited.
constexpr size_t kMaxHeartbeatsInFlight = 64;

// How long an answer from a coordinator whose deadline is dead_after_ms
// lets this node use its copies, counted from when it asked. The
// coordinator declares the node dead no sooner than dead_after_ms after it
// received the request, which is after it was sent; the quarter left is
// for the fence to run, the loop's tick, and clocks that run at slightly
// different rates (docs/PROTOCOL.md, "Leases").
uint64_t LeaseMs(uint32_t dead_after_ms) { return dead_after_ms - dead_after_ms / 4; }
constexpr int kJoinTimeoutMs = 3000;

// A join refused because the id is live on another connection (the
// coordinator gives it up once that connection closes, once it has been
// quiet for two heartbeat intervals for a resume, or once the node is
// declared dead for a new daemon) is asked again this often, on the same
// connection, so the coordinator logs the refusal once...
constexpr int kJoinRetryMs = 100;

// ...for this long at startup (--rejoin-as) before the daemon gives up
// with the coordinator's message: a former process's half-open connection
// is declared dead within it up to a --dead-after-ms of 10 s.
constexpr int kJoinLiveWaitMs = 10'000;

// A rejoin waits at most this long per step (connect, handshake, join), on
// a thread of its own (ReconnectCoordinator).
constexpr uint64_t kRejoinStepMs = 1000;

// Directory messages held per gpu-mapped page (the directory resends its
// messages until answered, so one per txn is kept and the rest dropped).
constexpr size_t kMaxDeferredPerPage = 8;
constexpr uint64_t kMaxEmulatedGpus = 64;

// The --coordinator list: one address per shard, comma-separated.
Result<std::vector<std::string>> ShardAddresses(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    const size_t comma = list.find(',', start);
    std::string one = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    std::string host;
    uint16_t port = 0;
    Status st = proto::ParseHostPort(one, &host, &port);
    if (!st.ok()) {
      return InvalidArgument("coordinator list '" + list + "': entry " +
                             std::to_string(out.size()) + ": " + st.message());
    }
    out.push_back(std::move(one));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (out.size() > 1024) return InvalidArgument("more than 1024 coordinators in '" + list + "'");
  return out;
}

std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

}  // namespace

uint64_t NodeDaemon::NowMs() const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// ---------------------------------------------------------------------------
// Start and stop

Result<proto::JoinReply> NodeDaemon::Join(proto::FramedSocket& link, const NodeDaemonOptions& o,
                                          proto::NodeId as, const std::string& peer_address,
                                          bool resume, int timeout_ms, int live_wait_ms,
                                          uint64_t* sent_ms) {
  proto::JoinRequest j;
  j.node = as;
  j.resume = resume ? 1 : 0;
  j.address = peer_address;
  j.host_memory_bytes = o.host_memory_bytes;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(live_wait_ms);
  for (int attempt = 0;; ++attempt) {
    *sent_ms = MonotonicUs() / 1000;  // NowMs's clock
    DSVM_ASSIGN_OR_RETURN(proto::Message reply, link.Call(j, timeout_ms));
    if (auto* s = std::get_if<proto::StatusReply>(&reply)) {
      Status st = proto::FromReply(*s);
      if (st.ok()) return Internal("join answered OK without a JoinReply");
      const auto next = std::chrono::steady_clock::now() + std::chrono::milliseconds(kJoinRetryMs);
      if (st.code() != StatusCode::kUnavailable || next > give_up) return st;
      if (attempt == 0) {
        LogWarning("joining as node " + std::to_string(as) + ": " + st.message() +
                   "; asking again for up to " + std::to_string(live_wait_ms) + " ms");
      }
      std::this_thread::sleep_until(next);
      continue;
    }
    auto* jr = std::get_if<proto::JoinReply>(&reply);
    if (jr == nullptr) return Internal("join answered with an unexpected message");
    return *jr;
  }
}

// The GPU tier's options, checked before the daemon joins anything.
static Status CheckDeviceOptions(const NodeDaemonOptions& o) {
  if (o.device_backend != "none" && o.device_backend != "emulated" && o.device_backend != "cuda") {
    return InvalidArgument("device backend '" + o.device_backend +
                           "' is none of none, emulated and cuda");
  }
  if (o.device_backend == "none") {
    if (o.host_budget_bytes != 0) {
      return InvalidArgument(
          "a host budget needs the GPU tier, which keeps it: give a device backend "
          "(emulated or cuda) with it");
    }
    return Status::Ok();
  }
  if (o.gpu_budget_bytes < 4096) {
    return InvalidArgument("device backend '" + o.device_backend +
                           "' needs a GPU budget of at least one 4 KiB page (--gpu-budget), not " +
                           std::to_string(o.gpu_budget_bytes) + " bytes");
  }
  if (o.gpu_arena_bytes % kArenaGranularity != 0) {
    return InvalidArgument("a GPU arena (--gpu-arena) is a multiple of 4 KiB, not " +
                           std::to_string(o.gpu_arena_bytes) + " bytes");
  }
  if (o.gpu_pinned_limit_bytes != 0 && o.gpu_pinned_limit_bytes < (2ull << 20)) {
    return InvalidArgument("the pinned memory limit (--gpu-pinned-limit) is at least one 2 MiB "
                           "block (or 0: the default), not " +
                           std::to_string(o.gpu_pinned_limit_bytes) + " bytes");
  }
  if (o.emulated_gpus == 0 || o.emulated_gpus > kMaxEmulatedGpus) {
    return InvalidArgument("the emulated backend plays 1 to " + std::to_string(kMaxEmulatedGpus) +
                           " GPUs, not " + std::to_string(o.emulated_gpus));
  }
  return Status::Ok();
}

// The GPU tier's device backend (null for "none"), made before the daemon
// joins anything, so a missing GPU is a clear error at startup.
static Result<std::unique_ptr<DeviceBackend>> MakeNodeDeviceBackend(const NodeDaemonOptions& o) {
  if (o.device_backend == "none") return std::unique_ptr<DeviceBackend>();
  DeviceBackendOptions bo;
  bo.emulated_devices = o.emulated_gpus;
  // Room for a full pool of each page size, so the budget, not the
  // emulated device, is what runs out.
  bo.emulated_device_bytes = 4 * o.gpu_budget_bytes + (8u << 20);
  bo.emulated_copy_delay = o.emulated_copy_delay;
  auto backend = MakeDeviceBackend(o.device_backend, bo);
  if (!backend.ok()) {
    return Status(backend.status().code(),
                  "device backend '" + o.device_backend + "': " + backend.status().message());
  }
  return backend;
}

NodeDaemonOptions NodeDaemon::WithAutoDefaults(NodeDaemonOptions o) {
  if (o.fault_poll_us == NodeDaemonOptions::kAutoFaultPoll) {
    o.fault_poll_us = ::sysconf(_SC_NPROCESSORS_ONLN) >= 4 ? 100 : 0;
  }
  return o;
}

Result<std::unique_ptr<NodeDaemon>> NodeDaemon::Create(const NodeDaemonOptions& options) {
  DSVM_RETURN_IF_ERROR(CheckDeviceOptions(options));
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<DeviceBackend> device, MakeNodeDeviceBackend(options));
  std::shared_ptr<const proto::ClusterSecret> secret;
  if (!options.secret_file.empty()) {
    DSVM_ASSIGN_OR_RETURN(proto::ClusterSecret s, proto::ClusterSecret::Load(options.secret_file));
    secret = std::make_shared<const proto::ClusterSecret>(std::move(s));
  }
  UcxOptions ucx;
  ucx.listen = options.listen;
  ucx.secret = secret;
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<UcxTransport> transport, UcxTransport::Create(ucx));
  const std::string peer_address =
      HostOf(options.listen) + ":" + std::to_string(transport->port());
  DSVM_ASSIGN_OR_RETURN(std::vector<std::string> addresses, ShardAddresses(options.coordinator));
  // Shard 0 assigns the node id; the other shards take it.
  std::vector<ShardLink> shards(addresses.size());
  proto::JoinReply jr;
  for (size_t i = 0; i < addresses.size(); ++i) {
    shards[i].address = addresses[i];
    DSVM_ASSIGN_OR_RETURN(shards[i].link, proto::ConnectToCoordinator(addresses[i], secret.get()));
    uint64_t sent_ms = 0;
    DSVM_ASSIGN_OR_RETURN(
        proto::JoinReply r,
        Join(shards[i].link, options, i == 0 ? options.rejoin_as : jr.node, peer_address,
             /*resume=*/false, kJoinTimeoutMs, kJoinLiveWaitMs, &sent_ms));
    shards[i].lease_ms = LeaseMs(r.dead_after_ms);
    shards[i].lease_until_ms = sent_ms + shards[i].lease_ms;
    if (r.shard != i || r.shard_count != addresses.size()) {
      return InvalidArgument("coordinator " + addresses[i] + " serves shard " +
                             std::to_string(r.shard) + " of " + std::to_string(r.shard_count) +
                             ", but it is entry " + std::to_string(i) + " of " +
                             std::to_string(addresses.size()) + " in --coordinator");
    }
    if (i == 0) jr = r;
  }
  transport->set_self(jr.node);
  std::unique_ptr<NodeDaemon> d(
      new NodeDaemon(options, jr, std::move(shards), std::move(transport), std::move(secret)));
  d->transport_->set_receive_placer(
      [daemon = d.get()](proto::NodeId, const proto::PageData& header, size_t length) {
        return daemon->PlaceReceived(header, length);
      });
  if (options.fault_backend == "uffd") {
    DSVM_ASSIGN_OR_RETURN(std::unique_ptr<UffdBackend> backend, UffdBackend::Create());
    d->backend_ = std::move(backend);
  } else if (options.fault_backend == "kmod") {
    // dsvm.ko for 4 KiB regions, userfaultfd for larger pages.
    DSVM_ASSIGN_OR_RETURN(std::unique_ptr<FaultBackend> backend, CreateKmodNodeBackend());
    d->backend_ = std::move(backend);
  } else if (!options.fault_backend.empty()) {
    return InvalidArgument("fault backend '" + options.fault_backend +
                           "' is none of uffd and kmod");
  }
  d->device_ = std::move(device);
  DSVM_RETURN_IF_ERROR(d->SetupDeviceTier());
  DSVM_RETURN_IF_ERROR(d->Setup());
  LogInfo("node " + std::to_string(jr.node) + " joined; peers reach it at " + peer_address);
  return d;
}

NodeDaemon::NodeDaemon(const NodeDaemonOptions& options, const proto::JoinReply& joined,
                       std::vector<ShardLink> shards, std::unique_ptr<UcxTransport> transport,
                       std::shared_ptr<const proto::ClusterSecret> secret)
    : options_(WithAutoDefaults(options)),
      secret_(std::move(secret)),
      id_(joined.node),
      shards_(std::move(shards)),
      shard_map_(static_cast<uint32_t>(shards_.size())),
      transport_(std::move(transport)),
      heartbeat_ms_(joined.heartbeat_interval_ms == 0 ? 500 : joined.heartbeat_interval_ms),
      agent_(joined.node, NodeOptions{options.retransmit_after_ms}),
      window_base_(joined.window_base),
      window_size_(joined.window_size),
      fence_bytes_per_ms_(options.fence_bytes_per_ms != 0 ? options.fence_bytes_per_ms
                                                          : kDefaultFenceBytesPerMs) {}

Status NodeDaemon::Setup() {
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  timer_fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  if (epoll_fd_ < 0 || wake_fd_ < 0 || timer_fd_ < 0) return IoError("epoll/eventfd/timerfd");
  itimerspec its{};
  its.it_interval.tv_nsec = kTickMs * 1000000;
  its.it_value.tv_nsec = kTickMs * 1000000;
  ::timerfd_settime(timer_fd_, 0, &its, nullptr);
  last_timer_ms_ = NowMs();  // a loop held from the start counts too (NoteStall)
  if (!options_.socket_path.empty()) DSVM_RETURN_IF_ERROR(SetupClientSocket());
  std::vector<int> fds = {wake_fd_, timer_fd_, transport_->event_fd()};
  for (const ShardLink& s : shards_) fds.push_back(s.link.fd());
  if (backend_) fds.push_back(backend_->event_fd());
  if (listen_fd_ >= 0) fds.push_back(listen_fd_);
  for (int fd : fds) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) return IoError("epoll_ctl");
  }
  last_heartbeat_ms_ = NowMs();
  return Status::Ok();
}

Status NodeDaemon::SetupDeviceTier() {
  if (!device_) return Status::Ok();
  // Each GPU's budget is shared by the pools the tier makes per region
  // (an arena holds one region's pages: docs/GPU.md, "Isolation").
  std::vector<uint64_t> budgets(device_->device_count(), options_.gpu_budget_bytes);
  DeviceTierOptions to;
  to.arena_bytes = options_.gpu_arena_bytes != 0 ? options_.gpu_arena_bytes : 64ull << 20;
  to.host_budget_bytes = options_.host_budget_bytes;
  to.copy_threads =
      options_.gpu_copy_threads != 0 ? options_.gpu_copy_threads : DefaultCopyThreads();
  to.direct_copies = options_.gpu_direct_copies;
  to.pinned_limit_bytes = options_.gpu_pinned_limit_bytes;
  to.keep_alive = [this] {
    BeatIfDue();
    if (tier_job_ && job_serves_ && !serving_) ServeDuringTierJob();
  };
  DSVM_ASSIGN_OR_RETURN(tier_, DeviceTier::Create(device_.get(), std::move(budgets), to));
  LogInfo("GPU tier: " + std::string(device_->name()) + " backend, " +
          std::to_string(device_->device_count()) + " GPU(s), " +
          std::to_string(options_.gpu_budget_bytes) + " bytes of HBM each, " +
          std::to_string(to.copy_threads) + " copy thread(s)" +
          (to.direct_copies ? ", direct copies" : ", staged copies only") +
          (options_.host_budget_bytes != 0
               ? ", host budget " + std::to_string(options_.host_budget_bytes) + " bytes"
               : std::string()));
  return Status::Ok();
}

size_t NodeDaemon::deferred_count() const {
  size_t n = 0;
  for (const auto& [page, held] : deferred_) n += held.size();
  return n;
}

Status NodeDaemon::SetupClientSocket() {
  sockaddr_un sa{};
  if (options_.socket_path.size() >= sizeof(sa.sun_path)) {
    return InvalidArgument("socket path '" + options_.socket_path + "' is too long");
  }
  listen_fd_ = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) return IoError("socket(AF_UNIX)");
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, options_.socket_path.c_str(), options_.socket_path.size() + 1);
  ::unlink(options_.socket_path.c_str());  // a stale socket of an earlier run
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 ||
      ::listen(listen_fd_, 64) != 0) {
    return IoError("listen on " + options_.socket_path + ": " + std::strerror(errno));
  }
  // Any local user may connect; what a client may do is checked per request
  // from its credentials (SO_PEERCRED): the coordinator checks them against
  // the region's owner, mode and token at open.
  ::chmod(options_.socket_path.c_str(), 0666);
  return Status::Ok();
}

NodeDaemon::~NodeDaemon() {
  // The transport outlives every other member, and progresses while it
  // flushes and closes: nothing received from now on goes to a store.
  if (transport_) transport_->set_receive_placer(nullptr);
  if (transport_) transport_->Flush(500).IgnoreError();
  for (auto& [fd, client] : clients_) {
    for (auto& [base, mapping] : client.mappings) backend_->RemoveMapping(mapping).IgnoreError();
  }
  clients_.clear();
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    ::unlink(options_.socket_path.c_str());
  }
  for (int fd : {epoll_fd_, wake_fd_, timer_fd_}) {
    if (fd >= 0) ::close(fd);
  }
}

std::string NodeDaemon::peer_address() const {
  return HostOf(options_.listen) + ":" + std::to_string(transport_->port());
}

void NodeDaemon::Post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> l(posted_mu_);
    posted_.push_back(std::move(fn));
  }
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof(one));
}

void NodeDaemon::Stop() {
  Post([this] { stopping_ = true; });
}

void NodeDaemon::DrainPosted() {
  uint64_t count;
  [[maybe_unused]] ssize_t n = ::read(wake_fd_, &count, sizeof(count));
  std::deque<std::function<void()>> work;
  {
    std::lock_guard<std::mutex> l(posted_mu_);
    work.swap(posted_);
  }
  for (auto& fn : work) fn();
}

void NodeDaemon::FlushOutgoing() {
  transport_->FlushBatches();
  for (ShardLink& s : shards_) {
    if (s.link.is_open()) s.link.Flush().IgnoreError();  // a lost link shows on its next read
  }
}

void NodeDaemon::Run() {
  epoll_event events[16];
  uint64_t last_work_us = MonotonicUs();
  while (!stopping_) {
    if (run_parked_) RunParked();
    // Pages for peers queued since the last turn go first, each peer's in
    // one active message (PageBatch), then what the peers sent meanwhile.
    transport_->FlushBatches();
    if (HandlePeerMessages() > 0) last_work_us = MonotonicUs();
    FlushOutgoing();
    // Busy-poll for busy_poll_us after the last work: the next message of
    // a fault in progress usually comes within tens of microseconds, and
    // sleeping in epoll costs a wakeup (~10-25 us on a VM) per hop.
    const uint64_t idle_us = MonotonicUs() - last_work_us;
    const bool poll = (options_.busy_poll_us > 0 && idle_us < options_.busy_poll_us) ||
                      (fault_waiters_ > 0 && idle_us < options_.fault_poll_us);
    if (!poll && !transport_->Arm()) continue;  // more UCX work first
    const int n = ::epoll_wait(epoll_fd_, events, 16, poll ? 0 : -1);
    if (n > 0 || !poll) {
      last_work_us = MonotonicUs();
    } else {
      sched_yield();  // polling: let a process with work have this core
    }
    for (int i = 0; i < n && !stopping_; ++i) {
      const int fd = events[i].data.fd;
      if (fd == wake_fd_) {
        DrainPosted();
      } else if (fd == timer_fd_) {
        uint64_t expirations;
        [[maybe_unused]] ssize_t r = ::read(timer_fd_, &expirations, sizeof(expirations));
        OnTimer();
      } else if (const size_t shard = ShardOfFd(fd); shard < shards_.size()) {
        OnCoordinatorReadable(shard);
      } else if (backend_ && fd == backend_->event_fd()) {
        OnFaultEvents();
      } else if (fd == listen_fd_) {
        OnClientListenReadable();
      } else if (clients_.count(fd)) {
        OnClientReadable(fd);
      }
      // The UCX event fd needs nothing here: the loop progresses the worker.
    }
  }
}

// ---------------------------------------------------------------------------
// The coordinator link

size_t NodeDaemon::ShardOfFd(int fd) const {
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (shards_[i].link.is_open() && shards_[i].link.fd() == fd) return i;
  }
  return shards_.size();
}

void NodeDaemon::OnCoordinatorReadable(size_t shard) {
  ShardLink& s = shards_[shard];
  Status st = s.link.ReadAvailable();
  for (;;) {
    auto frame = s.link.NextFrame();
    if (!frame.ok()) {
      LogError("malformed frame from the coordinator at " + s.address + ": " +
               frame.status().ToString());
      st = frame.status();
      break;
    }
    if (!frame->has_value()) break;
    proto::Frame& f = **frame;
    const uint64_t rid = f.header.request_id;
    if (shard == 0 && rid != 0 && rid == lookup_request_) {
      if (auto* nl = std::get_if<proto::NodeListReply>(&f.message)) {
        for (const proto::NodeEntry& e : nl->nodes) {
          if (e.live && e.node != id_ && !transport_->HasPeer(e.node)) {
            Status c = transport_->Connect(e.node, e.address);
            if (!c.ok()) LogWarning("connecting to node " + std::to_string(e.node) + ": " + c.ToString());
          }
        }
        lookup_request_ = 0;
        if (nl->more && !nl->nodes.empty()) {
          lookup_request_ = control().NextRequestId();
          control().Send(proto::NodeList{nl->nodes.back().node}, lookup_request_).IgnoreError();
        } else {
          FlushPendingPeers();
        }
      }
      continue;
    }
    if (auto fw = forwarded_.find(rid); shard == 0 && fw != forwarded_.end()) {
      Forwarded to = fw->second;
      forwarded_.erase(fw);
      if (serving_) {
        replies_held_for_job_.emplace_back(to, std::move(f.message));  // may open a region
      } else {
        ForwardedReply(to, std::move(f.message));
      }
      continue;
    }
    if (auto* r = std::get_if<proto::StatusReply>(&f.message)) {
      const std::optional<uint64_t> heartbeat_sent = TakeHeartbeat(s, rid);
      if (heartbeat_sent && r->code == 0) RenewLease(shard, *heartbeat_sent);
      if (heartbeat_sent && r->code == static_cast<uint16_t>(StatusCode::kFailedPrecondition)) {
        // Declared dead while connected (this loop stalled past the
        // deadline): reconnect, which finds out and starts afresh.
        st = Unavailable("the coordinator no longer counts this node live: " + r->message);
        break;
      }
      if (r->code != 0) LogWarning("coordinator " + s.address + ": " + proto::FromReply(*r).ToString());
      continue;  // heartbeat answers
    }
    HandleDirectoryMessage(std::move(f.message));
  }
  if (!st.ok()) {
    LogWarning("lost the coordinator at " + s.address + ": " + st.ToString());
    CloseShardLink(shard);
  }
}

void NodeDaemon::CloseShardLink(size_t shard) {
  ShardLink& s = shards_[shard];
  if (!s.link.is_open()) return;
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, s.link.fd(), nullptr);
  s.link.Close();
  s.heartbeats.clear();  // request ids start again on the next link
  if (shard != 0) return;
  lookup_request_ = 0;
  auto forwarded = std::move(forwarded_);
  forwarded_.clear();
  for (auto& [id, f] : forwarded) {
    ForwardedReply(f, proto::ToReply(Unavailable("lost the coordinator; retry")));
  }
}

void NodeDaemon::ReconnectCoordinator(size_t shard) {
  ShardLink& s = shards_[shard];
  s.last_reconnect_ms = NowMs();
  ++stats_.rejoins_started;
  // On a thread of its own: connect, handshake and join block for up to
  // kRejoinStepMs each (a coordinator that does not answer), and the loop
  // goes on serving meanwhile (local faults, peers, fences). The thread
  // touches nothing of the daemon: it gets copies and returns a result,
  // which OnTimer takes (FinishRejoin).
  s.rejoin = std::async(
      std::launch::async,
      [address = s.address, secret = secret_, options = options_, id = id_,
       peer = peer_address(), resume = !s.fresh]() -> Rejoin {
        Rejoin r;
        r.resume = resume;
        if (options.before_rejoin) options.before_rejoin();
        const int step_ms = static_cast<int>(kRejoinStepMs);
        auto link = proto::ConnectToCoordinator(address, secret.get(), step_ms);
        if (!link.ok()) {
          r.status = link.status();
          return r;
        }
        // Refused while the coordinator still hears this node's former
        // connection (not seen closed yet), asked again for a step more;
        // after that the loop reconnects as after any failed rejoin.
        auto jr = Join(*link, options, id, peer, resume, step_ms, step_ms, &r.sent_ms);
        if (!jr.ok()) {
          r.status = jr.status();
          return r;
        }
        r.link = std::move(*link);
        r.joined = *jr;
        return r;
      });
}

void NodeDaemon::FinishRejoin(size_t shard) {
  ShardLink& s = shards_[shard];
  Rejoin r = s.rejoin.get();
  if (!r.status.ok()) {
    if (r.status.code() == StatusCode::kFailedPrecondition && r.resume && !s.fresh) {
      // Declared dead meanwhile: what this node holds is stale. The next
      // attempt joins as a new daemon (at once).
      DropEverything(r.status.message());
      s.last_reconnect_ms = 0;
    } else if (r.status.code() != StatusCode::kUnavailable &&
               r.status.code() != StatusCode::kIoError) {
      LogWarning("rejoining the coordinator at " + s.address + ": " + r.status.ToString());
    }
    return;
  }
  if (r.resume && s.fresh) {
    // Another shard declared this node dead while this join was in flight:
    // the join resumed what was dropped since. Join again, as a new daemon.
    return;
  }
  s.fresh = false;
  s.link = std::move(r.link);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = s.link.fd();
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, s.link.fd(), &ev);
  ++stats_.coordinator_reconnects;
  // A coordinator that restarted may have a shorter deadline: the lease
  // starts again from this join alone.
  s.lease_ms = LeaseMs(r.joined.dead_after_ms);
  s.lease_until_ms = 0;
  RenewLease(shard, r.sent_ms);
  LogInfo("node " + std::to_string(id_) + " rejoined the coordinator at " + s.address);
  Actions acts;
  // A shard that restarted on other data numbers transactions anew: what was
  // sent before says nothing about what is asked now.
  ForgetSends(0, ~uint64_t{0});
  agent_.ResendAll(NowMs(), &acts);  // whatever was in flight may be lost
  Execute(acts);
  if (shard == 0 && !pending_peer_.empty()) LookupPeers();
}

void NodeDaemon::DropEverything(const std::string& why) {
  LogError("the coordinator says: " + why +
           ". Dropping every page (the directory handed them on) and joining as a new daemon");
  ++stats_.fresh_starts;
  // Every other shard still counts this node's copies of its pages: they
  // must be handed on too, which joining there as a new daemon does.
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (shards_[i].fresh) continue;
    shards_[i].fresh = true;
    CloseShardLink(i);
  }
  const std::vector<WaiterId> waiting = agent_.Forget();
  ForgetSends(0, ~uint64_t{0});
  if (tier_) {
    // Every copy is stale, GPU copies too. A client's live maps are lost:
    // their slots stay held (no other page gets the memory its device
    // pointers name) until it unmaps, and the unmap says kDataLoss.
    LoseGpuMaps(0, ~proto::PageAddr{0},
                "node " + std::to_string(id_) +
                    " lost this map's pages while it was mapped (declared dead); what the GPU "
                    "wrote through it is gone");
    deferred_.clear();
    gpu_hidden_.clear();
    for (auto& [base, store] : stores_) {
      tier_->RemoveRegion(base).IgnoreError();  // known to the tier since OpenRegion
      Status st = tier_->AddRegion(store.get());
      if (!st.ok()) LogError("GPU tier: re-adding region " + Hex(base) + ": " + st.ToString());
    }
  }
  for (auto& [base, store] : stores_) {
    Status st = backend_ ? backend_->InvalidateAll(base) : store->DiscardAll();
    if (!st.ok()) LogError("dropping region " + Hex(base) + ": " + st.ToString());
  }
  data_.clear();
  fenced_pages_.clear();  // dropped with the rest; parked accesses wait for the rejoin
  pending_peer_.clear();
  pending_peer_count_ = 0;
  // A waiting process retries (and asks again once joined).
  EndWaits(waiting, "node " + std::to_string(id_) + " was declared dead; retry");
}

void NodeDaemon::LoseGpuMaps(proto::PageAddr begin, proto::PageAddr end, const std::string& why) {
  for (auto& [fd, client] : clients_) {
    for (GpuMapping& g : client.gpu_maps) {
      if (g.lost || g.end <= begin || g.first >= end) continue;
      g.lost = true;
      g.lost_why = why;
      ++stats_.gpu_maps_lost;
      if (g.zero_copy || g.replica) continue;  // no slots, or held already
      std::vector<proto::PageAddr> pages;
      for (proto::PageAddr p = g.first; p < g.end; p += g.page_size) pages.push_back(p);
      Status st = tier_->Detach(pages, &g.held);
      if (!st.ok()) LogError("GPU tier: keeping a lost map's slots: " + st.ToString());
    }
  }
  std::erase_if(gpu_pins_, [&](const auto& e) { return e.first >= begin && e.first < end; });
}

Status NodeDaemon::DropRegion(proto::PageAddr base, const std::string& why) {
  if (backend_) {
    Status gone = backend_->RemoveRegion(base);
    if (!gone.ok()) {
      return FailedPrecondition("the region that was at " + Hex(base) + " (" + why +
                                ") is still mapped by processes on this node: " + gone.message());
    }
  }
  // Its pages' states are the old region's: forget them, or they would
  // answer the new region's faults.
  const uint64_t size = stores_.at(base)->size();
  EndWaits(ForgetPages(base, base + size), "region at " + Hex(base) + " " + why);
  if (tier_) {
    // Its gpu maps lose their pages: their slots stay theirs until unmapped.
    LoseGpuMaps(base, base + size,
                "the region at " + Hex(base) + " went while this map lived (" + why +
                    "); what the GPU wrote through it is gone");
    tier_->RemoveRegion(base).IgnoreError();  // added in OpenRegion
  }
  std::erase_if(deferred_, [&](const auto& d) { return d.first >= base && d.first < base + size; });
  std::erase_if(gpu_hidden_, [&](proto::PageAddr p) { return p >= base && p < base + size; });
  std::erase_if(fenced_pages_, [&](proto::PageAddr p) { return p >= base && p < base + size; });
  // A region made again at these addresses numbers its pages' transactions
  // from 1 again: the old region's sends must not pass for its.
  ForgetSends(base, base + size);
  for (auto& [peer, pages] : pending_peer_) {  // the old region's bytes
    pending_peer_count_ -= std::erase_if(
        pages, [&](const proto::PageData& d) { return d.page >= base && d.page < base + size; });
  }
  stores_.erase(base);
  advice_.erase(base);
  preferred_.erase(base);
  preferred_gpu_.erase(base);
  accessed_by_.erase(base);
  read_ahead_.erase(base);
  region_ids_.erase(base);
  holder_hint_.erase(base);
  std::erase_if(page_hint_, [&](const auto& e) { return e.first >= base && e.first < base + size; });
  LogInfo("dropped the region that was at " + Hex(base) + ": " + why);
  return Status::Ok();
}

void NodeDaemon::EndWaits(const std::vector<WaiterId>& waiting, const std::string& why) {
  for (WaiterId id : waiting) {
    auto it = waiters_.find(id);
    if (it == waiters_.end()) continue;
    Waiter w = std::move(it->second);
    waiters_.erase(it);
    if (w.fault) {
      --fault_waiters_;
      Status st = backend_->Resolve(w.token, Resolution::kRetry);
      if (!st.ok() && st.code() != StatusCode::kNotFound) LogWarning("resolving: " + st.ToString());
    } else {
      w.fn(Unavailable(why), {});
    }
  }
}

proto::NodeCounters NodeDaemon::Counters() const {
  const NodeStats& a = agent_.stats();
  proto::NodeCounters c;
  c.read_faults = stats_.read_faults;
  c.write_faults = stats_.write_faults;
  c.local_hits = a.hits + (backend_ ? backend_->local_hits() : 0);
  c.pages_fetched = stats_.pages_received;
  c.pages_sent = stats_.pages_sent;
  c.bytes_fetched = stats_.bytes_received;
  c.bytes_sent = stats_.bytes_sent;
  c.invalidations = a.invalidations;
  c.downgrades = a.downgrades;
  c.prefetched_pages = stats_.prefetched_pages;
  c.gpu_maps = stats_.gpu_maps;
  c.gpu_zero_copy_maps = stats_.gpu_zero_copy_maps;
  c.gpu_maps_lost = stats_.gpu_maps_lost;
  c.gpu_placed_pages = stats_.gpu_placed;
  if (tier_) {
    c.gpu_pages_in = tier_->stats().pages_to_device;
    c.gpu_pages_out = tier_->stats().pages_to_host;
    c.gpu_direct_pages_in = tier_->stats().direct_pages_to_device;
    c.gpu_direct_pages_out = tier_->stats().direct_pages_to_host;
  }
  c.fences = stats_.fences;
  c.fenced_accesses = stats_.fenced_accesses;
  c.direct_reads = a.direct_installs;
  c.direct_reads_served = a.direct_served;
  return c;
}

void NodeDaemon::BeatIfDue() {
  const uint64_t now = NowMs();
  if (now - last_heartbeat_ms_ < heartbeat_ms_) return;
  last_heartbeat_ms_ = now;
  UpdateHeldBytes();
  // Each shard keeps its own membership: each needs the heartbeats.
  for (ShardLink& s : shards_) {
    if (!s.link.is_open()) continue;  // OnTimer reconnects it
    const uint64_t rid = s.link.NextRequestId();
    if (s.heartbeats.size() == kMaxHeartbeatsInFlight) s.heartbeats.pop_front();
    s.heartbeats.emplace_back(rid, now);
    s.link.Send(proto::Heartbeat{id_, Counters()}, rid).IgnoreError();
  }
}

void NodeDaemon::OnTimer() {
  const uint64_t now = NowMs();
  NoteStall(now);
  CheckLeases();
  for (size_t i = 0; i < shards_.size(); ++i) {
    ShardLink& s = shards_[i];
    if (s.rejoin.valid()) {
      if (s.rejoin.wait_for(std::chrono::seconds(0)) != std::future_status::ready) continue;
      FinishRejoin(i);
    }
    if (!s.link.is_open() && NowMs() - s.last_reconnect_ms >= kReconnectEveryMs) {
      ReconnectCoordinator(i);
    }
  }
  BeatIfDue();
  Actions acts;
  agent_.Tick(now, &acts);
  Execute(acts);
  if (!held_for_write_back_.empty()) {
    std::vector<FaultEvent> held = std::move(held_for_write_back_);
    held_for_write_back_.clear();
    for (const FaultEvent& e : held) HandleFault(e);  // one still refused is held again
  }
  if (idle_trim_.Due(stats_.bytes_sent + stats_.bytes_received, now) && TrimHeap()) {
    ++stats_.heap_trims;
  }
}

// ---------------------------------------------------------------------------
// Messages from the directory

void NodeDaemon::Park(std::function<void()> access) {
  if (!running_parked_) ++stats_.fenced_accesses;  // counted once, not at each rerun
  parked_.push_back(std::move(access));
}

void NodeDaemon::RunParked() {
  run_parked_ = false;
  std::vector<std::function<void()>> parked = std::move(parked_);
  parked_.clear();
  running_parked_ = true;
  for (auto& access : parked) access();  // one whose lease lapsed again parks again
  running_parked_ = false;
}

bool NodeDaemon::MustDefer(const proto::Message& m) const {
  if (gpu_pins_.empty() && deferred_.empty()) return false;
  const proto::PageAddr page = std::visit(
      [](const auto& x) -> proto::PageAddr {
        if constexpr (requires { x.page; }) {
          return x.page;
        } else {
          return ~proto::PageAddr{0};
        }
      },
      m);
  // Whatever follows a held message waits behind it, so the agent sees them
  // in the order they came.
  if (deferred_.count(page) != 0) return true;
  auto it = gpu_pins_.find(page);
  if (it == gpu_pins_.end()) return false;
  if (std::holds_alternative<proto::Invalidate>(m)) return true;
  if (const auto* f = std::get_if<proto::Fetch>(&m)) {
    // A read map keeps a Shared copy: a downgrade may go on, a move may not.
    return it->second.writes != 0 || f->next_state == proto::PageState::kInvalid;
  }
  return false;
}

void NodeDaemon::Defer(proto::PageAddr page, proto::Message m) {
  std::vector<proto::Message>& held = deferred_[page];
  const auto same = [&](const proto::Message& o) {
    return proto::Encode(o, 0) == proto::Encode(m, 0);  // a resend of one held already
  };
  if (std::none_of(held.begin(), held.end(), same) && held.size() < kMaxDeferredPerPage) {
    held.push_back(std::move(m));
    ++stats_.deferred_requests;
  }
}

void NodeDaemon::HandleDirectoryMessage(proto::Message m) {
  if (tier_job_ && HoldForTierJob(m)) return;
  if (serving_) ++stats_.served_during_gpu_copies;
  if (const auto* g = std::get_if<proto::Grant>(&m);
      g != nullptr && gpu_pins_.count(g->page) != 0 && deferred_.count(g->page) == 0 &&
      agent_.Disowns(*g)) {
    // The page a GPU map pins was lost: the map is lost with it (its unmap
    // says so, and its slots stay its own until then, so no other page's
    // bytes appear behind the client's pointer), and the copy goes now.
    // Waiting for the unmap instead would keep a request of this node
    // that the refusal answers waiting too: a client holding one map
    // while making another of the page would wait on itself.
    if (PageStore* store = StoreOf(g->page)) {
      LoseGpuMaps(g->page, g->page + store->page_size(),
                  "page " + Hex(g->page) + " was lost (its only other copy died with its node)");
    }
  }
  if (MustDefer(m)) {
    const proto::PageAddr page = DirectoryPageOf(m);
    Defer(page, std::move(m));
    return;
  }
  const uint64_t now = NowMs();
  Actions acts;
  std::visit(
      [&](auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, proto::Grant> || std::is_same_v<T, proto::Fetch> ||
                      std::is_same_v<T, proto::Invalidate> || std::is_same_v<T, proto::Release> ||
                      std::is_same_v<T, proto::EvictReply>) {
          // A refusal needs no store: the agent only answers it (a loss
          // notice is acknowledged even for a page of no open region).
          bool refusal = false;
          if constexpr (std::is_same_v<T, proto::Grant>) refusal = x.status != 0;
          if (StoreOf(x.page) == nullptr && !refusal) {
            ++stats_.protocol_errors;
            LogWarning(std::string(proto::TypeName(T::kType)) + " for a page of no open region");
            return;
          }
          if constexpr (std::is_same_v<T, proto::Grant>) agent_.HandleGrant(x, now, &acts);
          if constexpr (std::is_same_v<T, proto::Fetch>) {
            // Its bytes must be on the host before the agent gives them
            // up; refused, the directory's resend tries again.
            if (!HostBytesCurrent(x.page)) return;
            // The page leaves for the requester, which a later read here
            // asks (not for a late or resent Fetch: a newer guess stays).
            if (x.next_state == proto::PageState::kInvalid && x.txn > agent_.LastTxnOf(x.page)) {
              NotePageHolder(x.page, x.requester);
            }
            agent_.HandleFetch(x, now, &acts);
          }
          if constexpr (std::is_same_v<T, proto::Invalidate>) {
            // The writer will hold the page.
            if (x.txn > agent_.LastTxnOf(x.page)) NotePageHolder(x.page, x.writer);
            agent_.HandleInvalidate(x, now, &acts);
          }
          if constexpr (std::is_same_v<T, proto::Release>) agent_.HandleRelease(x, &acts);
          if constexpr (std::is_same_v<T, proto::EvictReply>) agent_.HandleEvictReply(x, now, &acts);
        } else if constexpr (std::is_same_v<T, proto::RegionDeleted>) {
          HandleRegionDeleted(x);
        } else {
          ++stats_.protocol_errors;
          LogWarning(std::string("unexpected ") + proto::TypeName(T::kType) + " from the coordinator");
        }
      },
      m);
  Execute(acts);
}

void NodeDaemon::HandleRegionDeleted(const proto::RegionDeleted& m) {
  // Never opened here, or its addresses already hold a region of another
  // id: nothing of it to drop.
  auto id = region_ids_.find(m.base);
  if (id == region_ids_.end() || id->second != m.region) return;
  Status st = DropRegion(m.base, "deleted");
  if (!st.ok()) {
    // Processes still map it: what their page tables map they keep reading
    // and writing, any access that reaches the daemon fails (SIGBUS), and
    // the copy goes when the last of them unmaps it (DropUnmappedDeleted).
    LogInfo("keeping a deleted region until its last local mapping goes: " + st.message());
    deleted_mapped_[m.base] = m.region;
    // Its requests in flight are not resent: the directory would refuse
    // them (NOT_FOUND: they name a deleted region), so they fail here at
    // once. Its pages' states go too: every access
    // that reaches the daemon now fails (IsOfADeletedRegion), and what the
    // processes' page tables map is all they keep. The waits end, and
    // their faults, retried, fail.
    const uint64_t size = stores_.at(m.base)->size();
    EndWaits(ForgetPages(m.base, m.base + size), "its region was deleted");
    return;
  }
  ++stats_.regions_deleted;
}

bool NodeDaemon::IsOfADeletedRegion(proto::PageAddr page) const {
  if (deleted_mapped_.empty()) return false;
  const PageStore* store = StoreOf(page);
  if (store == nullptr) return false;
  auto deleted = deleted_mapped_.find(store->base());
  auto id = region_ids_.find(store->base());
  return deleted != deleted_mapped_.end() && id != region_ids_.end() &&
         id->second == deleted->second;
}

std::vector<WaiterId> NodeDaemon::ForgetPages(proto::PageAddr begin, proto::PageAddr end) {
  std::erase_if(data_, [&](const auto& d) { return d.second.page >= begin && d.second.page < end; });
  return agent_.ForgetRange(begin, end);
}

void NodeDaemon::DropUnmappedDeleted() {
  if (tier_job_) return;  // the tier is busy: EndTierJob calls again
  for (auto it = deleted_mapped_.begin(); it != deleted_mapped_.end();) {
    auto id = region_ids_.find(it->first);
    if (id == region_ids_.end() || id->second != it->second) {
      it = deleted_mapped_.erase(it);  // dropped meanwhile (a new region took its addresses)
    } else if (DropRegion(it->first, "deleted, and its last local mapping is gone").ok()) {
      ++stats_.regions_deleted;
      it = deleted_mapped_.erase(it);
    } else {
      ++it;
    }
  }
}

// ---------------------------------------------------------------------------
// Peers

size_t NodeDaemon::HandlePeerMessages() {
  std::vector<UcxIncoming> in;
  const size_t progressed = transport_->Progress(&in);
  Actions acts;
  for (UcxIncoming& m : in) {
    if (auto* rd = std::get_if<proto::ReadDirect>(&m.message)) {
      HandleReadDirect(m.from, *rd, &acts);
      continue;
    }
    auto* d = std::get_if<proto::PageData>(&m.message);
    PageStore* store = d ? StoreOf(d->page) : nullptr;
    if (d == nullptr || store == nullptr || d->sender != m.from ||
        m.page.size != store->page_size() || store->CheckPage(d->page).ok() == false) {
      ++stats_.protocol_errors;
      LogWarning("dropping a malformed message from node " + std::to_string(m.from));
      continue;
    }
    if (auto id = region_ids_.find(store->base()); id == region_ids_.end() || id->second != d->region) {
      // Sent for a region deleted since (another was made at its
      // addresses, where txns and versions start again): not this page's.
      ++stats_.pages_of_another_region;
      continue;
    }
    if (!store->ReceivedIntact(m.page.data.get())) {
      // Received in place, and the page was written or punched before the
      // bytes were all in: they may be incomplete. The agent asks again.
      ++stats_.receives_torn;
      LogWarning("dropping page " + Hex(d->page) + " from node " + std::to_string(m.from) +
                 ": the page changed while it was received in place");
      continue;
    }
    ++stats_.pages_received;
    stats_.bytes_received += m.page.size;
    holder_hint_[store->base()] = m.from;
    NotePageHolder(d->page, m.from);
    const DataHandle h = ++next_handle_;
    data_[h] = Received{d->page, std::move(m.page)};
    if (tier_job_ && TierMayTouch(d->page)) {
      // Its install would write bytes a GPU map's copies may read, and map
      // the page through the tier: after them (EndTierJob).
      pages_held_for_job_.emplace_back(*d, h);
      ++stats_.held_for_gpu_copies;
      continue;
    }
    agent_.HandlePageData(*d, h, NowMs(), &acts);
  }
  if (!acts.empty()) Execute(acts);  // the pages of a batch together: Coalesce
  return progressed;
}

void NodeDaemon::NotePageHolder(proto::PageAddr page, proto::NodeId node) {
  if (node == proto::kNoNode || node == id_) return;
  if (page_hint_.size() >= kMaxPageHints && page_hint_.count(page) == 0) page_hint_.clear();
  page_hint_[page] = node;
}

bool NodeDaemon::AsksHolder(proto::PageAddr page, bool write) const {
  // Not for large pages, whose transfer outweighs the directory's hop.
  if (!options_.direct_reads || write) return false;  // before the lookup: every fault asks
  const PageStore* store = StoreOf(page);
  return store != nullptr && store->page_size() <= transport_->batch_page_bytes();
}

void NodeDaemon::AskHolder(const PageStore& store, proto::PageAddr page) {
  const proto::RegionId region = region_ids_.at(store.base());
  if (auto p = page_hint_.find(page);
      p != page_hint_.end() && p->second != id_ && transport_->HasPeer(p->second)) {
    transport_->Send(p->second, proto::ReadDirect{page, id_, region}).IgnoreError();
    ++stats_.direct_asks_by_page;
    return;
  }
  auto hint = holder_hint_.find(store.base());
  if (hint == holder_hint_.end() || hint->second == id_) return;  // the directory alone, then
  if (!transport_->HasPeer(hint->second)) {
    // Not connected (yet, or any more: a node gone). The directory serves
    // this fault; the guess comes back with the region's next page.
    holder_hint_.erase(hint);
    LookupPeers();
    return;
  }
  // A lost ask costs nothing but the shortcut: the Acquire is on its way.
  transport_->Send(hint->second, proto::ReadDirect{page, id_, region}).IgnoreError();
}

void NodeDaemon::HandleReadDirect(proto::NodeId from, const proto::ReadDirect& m, Actions* acts) {
  if (m.node != from) {
    ++stats_.protocol_errors;
    LogWarning("dropping a ReadDirect from node " + std::to_string(from) + " that names node " +
               std::to_string(m.node));
    return;
  }
  // Ignored (the requester's Acquire serves it): a page of no region here
  // or of another (one of them was deleted), a fenced page (its lease
  // lapsed), a page a GPU write map holds (it stays Modified for the GPU
  // until the unmap, its current bytes there), and a page with directory
  // messages held for its maps (a txn is under way for it), or a page whose
  // bytes a GPU map's copies may be moving (TierMayTouch). A dirty GPU
  // copy of any other page is written back before the agent serves it, as
  // for a Fetch; one a store refused is not served either.
  PageStore* store = StoreOf(m.page);
  const auto id = store != nullptr ? region_ids_.find(store->base()) : region_ids_.end();
  const auto pins = gpu_pins_.find(m.page);
  if (store == nullptr || !store->CheckPage(m.page).ok() || id == region_ids_.end() ||
      id->second != m.region || IsOfADeletedRegion(m.page) || LeaseLapsed(m.page) ||
      (pins != gpu_pins_.end() && pins->second.writes != 0) || deferred_.count(m.page) != 0 ||
      TierMayTouch(m.page) || !HostBytesCurrent(m.page)) {
    ++stats_.direct_reads_refused;
    return;
  }
  agent_.HandleReadDirect(m, NowMs(), acts);
}

bool NodeDaemon::ZeroCopyFor(const PageStore& store, bool receive) const {
  using Z = NodeDaemonOptions::ZeroCopy;
  if (options_.zero_copy == Z::kOff || tier_ ||
      (backend_ && backend_->NameFor(store.page_size()) != "uffd")) {
    return false;
  }
  return options_.zero_copy == Z::kOn || !receive || store.hugetlb();
}

std::shared_ptr<uint8_t> NodeDaemon::PlaceReceived(const proto::PageData& header, size_t length) {
  PageStore* store = StoreOf(header.page);
  if (store == nullptr || length != store->page_size() || !store->CheckPage(header.page).ok() ||
      !ZeroCopyFor(*store, /*receive=*/true) || region_ids_.at(store->base()) != header.region ||
      !agent_.MayReceiveInPlace(header)) {
    return nullptr;
  }
  Result<std::shared_ptr<uint8_t>> view = store->ReceiveInPlace(header.page);
  return view.ok() ? std::move(view).value() : nullptr;
}

Status NodeDaemon::InstallReceived(PageStore& store, proto::PageAddr page, DataHandle handle) {
  auto it = data_.find(handle);
  if (it == data_.end()) return NotFound("no such data handle");
  const ReceivedPage& bytes = it->second.bytes;
  Status st = Status::Ok();
  if (store.Adopt(page, bytes.data.get())) {
    ++stats_.pages_received_in_place;
  } else {
    st = store.WritePage(page, bytes.bytes());
  }
  data_.erase(it);
  return st;
}

void NodeDaemon::ForgetSends(proto::PageAddr first, proto::PageAddr end) {
  std::erase_if(recent_sends_, [&](const auto& s) { return s.first.page >= first && s.first.page < end; });
  std::erase_if(recent_sends_order_, [&](const SentPage& s) { return s.page >= first && s.page < end; });
}

bool NodeDaemon::SentAlready(proto::NodeId to, proto::PageAddr page, proto::TxnId txn) const {
  if (txn == 0) return false;  // a direct read's bytes: each answers one ask, never a resend
  auto it = recent_sends_.find(SentPage{to, page, txn});
  return it != recent_sends_.end() && it->second == transport_->PeerGeneration(to);
}

void NodeDaemon::SendPage(proto::NodeId to, const proto::PageData& header, size_t length,
                          const UcxTransport::PageFill& fill, std::shared_ptr<const uint8_t> lent) {
  if (transport_->HasPeer(to)) {
    const SentPage key{to, header.page, header.txn};
    bool read = true;  // false: fill failed, and said so
    const uint64_t from_lent = transport_->stats().sent_from_lent;
    Status st = lent != nullptr ? transport_->SendPageFrom(to, header, std::move(lent), length)
                                : transport_->SendPage(to, header, length, [&](std::span<uint8_t> out) {
                                    Status filled = fill(out);
                                    read = filled.ok();
                                    return filled;
                                  });
    stats_.pages_sent_in_place += transport_->stats().sent_from_lent - from_lent;
    if (!st.ok()) {
      if (read) LogWarning("sending a page to node " + std::to_string(to) + ": " + st.ToString());
      agent_.ForgetRecentCopy(header.page, to);
      return;
    }
    // A direct read's bytes (txn 0) answer one ask each: never skipped.
    if (header.txn != 0 &&
        recent_sends_.insert_or_assign(key, transport_->PeerGeneration(to)).second) {
      recent_sends_order_.push_back(key);
    }
    while (recent_sends_order_.size() > kRecentSends) {
      recent_sends_.erase(recent_sends_order_.front());
      recent_sends_order_.pop_front();
    }
    ++stats_.pages_sent;
    stats_.bytes_sent += length;
    return;
  }
  std::vector<proto::PageData>& waiting = pending_peer_[to];
  for (const proto::PageData& w : waiting) {
    if (w.page == header.page && w.txn == header.txn) {  // a resend's copy of one waiting already
      ++stats_.duplicate_sends_skipped;
      return;
    }
  }
  if (pending_peer_count_ >= kMaxPendingPeerPages) {
    LogWarning("too many pages waiting for peer addresses; dropping one (it is resent on demand)");
    agent_.ForgetRecentCopy(header.page, to);
    return;
  }
  proto::PageData d{header.page, header.txn, header.sender, header.version,
                    std::vector<uint8_t>(length), header.region};
  if (Status st = fill(d.data); !st.ok()) {  // fill said why
    agent_.ForgetRecentCopy(header.page, to);
    return;
  }
  waiting.push_back(std::move(d));
  ++pending_peer_count_;
  LookupPeers();
}

void NodeDaemon::LookupPeers() {
  if (lookup_request_ != 0 || !control().is_open()) return;
  ++stats_.peer_lookups;
  lookup_request_ = control().NextRequestId();
  control().Send(proto::NodeList{proto::kNoNode}, lookup_request_).IgnoreError();
}

void NodeDaemon::FlushPendingPeers() {
  auto pending = std::move(pending_peer_);
  pending_peer_.clear();
  pending_peer_count_ = 0;
  for (auto& [peer, pages] : pending) {
    if (!transport_->HasPeer(peer)) {
      LogWarning("node " + std::to_string(peer) + " is not a live member; dropping its pages");
      continue;
    }
    for (const proto::PageData& d : pages) {
      SendPage(peer, d, d.data.size(), [&d](std::span<uint8_t> out) {
        std::copy(d.data.begin(), d.data.end(), out.begin());
        return Status::Ok();
      });
    }
  }
}

}  // namespace dsvm::node
