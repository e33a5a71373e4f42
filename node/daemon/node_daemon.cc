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
#include <cstdio>
#include <cstring>
#include <optional>
#include <thread>

#include "node/fault/fd_passing.h"
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
// Extra time a fence is given beyond its estimate (FenceLeadMs).
constexpr uint64_t kFenceSpareMs = 10;
// A fence that took at least this much measures the fence rate.
constexpr uint64_t kFenceRateSampleBytes = 16u << 20;

// The estimated time, with a quarter more and kFenceSpareMs, a fence of
// held_bytes takes.
uint64_t FenceNeedsMs(uint64_t held_bytes, uint64_t bytes_per_ms) {
  const uint64_t estimate = held_bytes / bytes_per_ms + 1;
  return estimate + estimate / 4 + kFenceSpareMs;
}
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
constexpr size_t kMaxClients = 1024;
constexpr size_t kMaxForwarded = 4096;
constexpr size_t kFaultBatch = 64;
// Accesses one prefetch keeps in flight: 256 pages (past that, 4 KiB scans
// measured no faster), but at most 16 MiB, so
// that a window of large pages arrives well within the retransmit time.
constexpr uint32_t kPrefetchWindow = 256;
constexpr uint64_t kPrefetchWindowBytes = 16u << 20;
// Pages a read fault on read-mostly pages fetches after its own.
constexpr uint32_t kReadAhead = 16;
// Sequential read-ahead (any page, no advice needed): the first window is
// 64 KiB, each sequential miss doubles it up to 1 MiB (and at most 16 MiB
// of large pages), like the kernel's read-ahead for files.
constexpr uint64_t kSequentialFirstBytes = 64u << 10;
constexpr uint64_t kSequentialMaxPages = 256;
// GPU maps: acquisitions of a map's pages lost to remote requests before the
// pin, retried this often before the map fails (kUnavailable).
constexpr uint32_t kGpuMapRounds = 8;
// Directory messages held per gpu-mapped page (the directory resends its
// messages until answered, so one per txn is kept and the rest dropped).
constexpr size_t kMaxDeferredPerPage = 8;
constexpr uint64_t kMaxEmulatedGpus = 64;

uint64_t MonotonicUs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// The page a message for the directory is about (the agent sends Acquire,
// InvalidateAck and Done), which names the shard it goes to.
proto::PageAddr DirectoryPageOf(const proto::Message& m) {
  return std::visit(
      [](const auto& x) -> proto::PageAddr {
        if constexpr (requires { x.page; }) {
          return x.page;
        } else {
          DSVM_CHECK(false && "a directory message without a page");
          return 0;
        }
      },
      m);
}

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

uint64_t FenceLeadMs(uint64_t held_bytes, uint64_t bytes_per_ms, uint64_t lease_ms) {
  DSVM_CHECK(bytes_per_ms > 0);
  const uint64_t needs = FenceNeedsMs(held_bytes, bytes_per_ms);
  const uint64_t after_lapse = lease_ms / 3 / 2;  // half the margin
  return needs <= after_lapse ? 0 : std::min(needs - after_lapse, lease_ms / 2);
}

bool FenceOutlastsMargin(uint64_t held_bytes, uint64_t bytes_per_ms, uint64_t lease_ms) {
  DSVM_CHECK(bytes_per_ms > 0);
  return FenceNeedsMs(held_bytes, bytes_per_ms) > FenceLeadMs(held_bytes, bytes_per_ms, lease_ms) +
                                                       lease_ms / 3;
}

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
  to.keep_alive = [this] { BeatIfDue(); };
  DSVM_ASSIGN_OR_RETURN(tier_, DeviceTier::Create(device_.get(), std::move(budgets), to));
  LogInfo("GPU tier: " + std::string(device_->name()) + " backend, " +
          std::to_string(device_->device_count()) + " GPU(s), " +
          std::to_string(options_.gpu_budget_bytes) + " bytes of HBM each, " +
          std::to_string(to.copy_threads) + " copy thread(s)" +
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

void NodeDaemon::Run() {
  epoll_event events[16];
  uint64_t last_work_us = MonotonicUs();
  while (!stopping_) {
    if (run_parked_) RunParked();
    // Pages for peers queued since the last turn go first, each peer's in
    // one active message (PageBatch), then what the peers sent meanwhile.
    transport_->FlushBatches();
    if (HandlePeerMessages() > 0) last_work_us = MonotonicUs();
    transport_->FlushBatches();
    for (ShardLink& s : shards_) {
      if (s.link.is_open()) s.link.Flush().IgnoreError();  // a lost link shows on its next read
    }
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
      ForwardedReply(to, std::move(f.message));
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
  }
  c.fences = stats_.fences;
  c.fenced_accesses = stats_.fenced_accesses;
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
}

// ---------------------------------------------------------------------------
// Leases

std::optional<uint64_t> NodeDaemon::TakeHeartbeat(ShardLink& s, uint64_t rid) {
  auto it = std::find_if(s.heartbeats.begin(), s.heartbeats.end(),
                         [&](const auto& h) { return h.first == rid; });
  if (it == s.heartbeats.end()) return std::nullopt;
  const uint64_t sent_ms = it->second;
  s.heartbeats.erase(s.heartbeats.begin(), it + 1);
  return sent_ms;
}

bool NodeDaemon::LeaseLapsed(proto::PageAddr page) const {
  return NowMs() >= shards_[shard_map_.ShardOf(page)].lease_until_ms;
}

void NodeDaemon::RenewLease(size_t shard, uint64_t sent_ms) {
  ShardLink& s = shards_[shard];
  s.lease_until_ms = std::max(s.lease_until_ms, sent_ms + s.lease_ms);
  if (NowMs() >= s.lease_until_ms) return;
  // Accesses parked between the lapse and the fence wait too, fenced or not.
  if (!parked_.empty()) run_parked_ = true;
  // Pages an early fence took are mapped again at their next fault.
  s.fenced_early = false;
  if (!s.fenced) return;
  s.fenced = false;
  LogInfo("node " + std::to_string(id_) + ": the coordinator at " + s.address +
          " answers again: local processes use its pages again");
}

void NodeDaemon::UpdateHeldBytes() {
  // Every shard's pages together: all leases lapse at once when the node
  // is cut off (an over-estimate for one shard's lapse alone). A deleted
  // region kept for local mappings is not fenced.
  uint64_t held = 0;
  for (const auto& [base, store] : stores_) {
    if (deleted_mapped_.count(base) != 0) continue;
    Result<uint64_t> bytes = store->ResidentBytes();
    if (bytes.ok()) held += *bytes;  // an fstat that fails: that region counts as empty
  }
  held_bytes_ = held;
  // One shard's lease length stands for all: they come from one cluster's flags.
  const uint64_t lease_ms = shards_.empty() ? 0 : shards_[0].lease_ms;
  // Said again only when the node holds twice as much as when last said.
  if (lease_ms == 0 || held <= 2 * fence_warned_bytes_ ||
      !FenceOutlastsMargin(held, fence_bytes_per_ms_, lease_ms)) {
    return;
  }
  fence_warned_bytes_ = held;
  char text[320];
  std::snprintf(text, sizeof(text),
                "node %u holds %.1f MiB: at the %.3g MB/s a fence runs here it would not be over "
                "within the %llu ms the lease leaves after it lapses, even started %llu ms early; "
                "give the coordinator a longer --dead-after-ms",
                id_, static_cast<double>(held) / (1 << 20),
                static_cast<double>(fence_bytes_per_ms_) / 1000,
                static_cast<unsigned long long>(lease_ms / 3),
                static_cast<unsigned long long>(lease_ms / 2));
  LogWarning(text);
}

void NodeDaemon::NoteStall(uint64_t now) {
  const uint64_t gap = now - std::min(now, last_timer_ms_);
  last_timer_ms_ = now;
  // A loop held this long let a lease check, and a fence, come late by as
  // much (half the margin of the shortest lease).
  uint64_t lease_ms = 0;
  for (const ShardLink& s : shards_) {
    if (s.lease_ms != 0) lease_ms = lease_ms == 0 ? s.lease_ms : std::min(lease_ms, s.lease_ms);
  }
  if (lease_ms == 0 || gap <= lease_ms / 6) return;
  ++stats_.loop_stalls;
  stats_.longest_stall_ms = std::max(stats_.longest_stall_ms, gap);
  LogWarning("node " + std::to_string(id_) + ": the daemon's loop stood still for " +
             std::to_string(gap) + " ms, more than half the " + std::to_string(lease_ms / 3) +
             " ms a lease leaves for its fence: a lease that lapsed in that time was fenced up to that late");
}

uint64_t NodeDaemon::FenceLead(const ShardLink& s) const {
  return FenceLeadMs(held_bytes_, fence_bytes_per_ms_, s.lease_ms);
}

void NodeDaemon::CheckLeases() {
  for (size_t i = 0; i < shards_.size(); ++i) {
    ShardLink& s = shards_[i];
    if (s.fenced) continue;
    // Before the lapse, a node that holds more than it could fence after
    // it starts early (once); accesses go on meanwhile.
    const bool early = NowMs() < s.lease_until_ms;
    if (early && (s.fenced_early || NowMs() + FenceLead(s) < s.lease_until_ms)) continue;
    // A busy loop may not have read the answer that renews it yet.
    if (s.link.is_open()) OnCoordinatorReadable(i);
    if (s.fenced || (early && s.fenced_early)) continue;
    if (NowMs() >= s.lease_until_ms) {
      Fence(i, /*early=*/false);  // with an early fence before: the pages mapped since
    } else if (NowMs() + FenceLead(s) >= s.lease_until_ms) {
      Fence(i, /*early=*/true);
    }
  }
}

void NodeDaemon::Fence(size_t shard, bool early) {
  ShardLink& s = shards_[shard];
  if (early) {
    s.fenced_early = true;
    ++stats_.early_fences;
  } else {
    s.fenced = true;
    ++stats_.fences;
  }
  const uint64_t start_us = MonotonicUs();
  const uint64_t lapsed_ms = s.lease_until_ms;
  const uint64_t lead_ms = lapsed_ms - std::min(lapsed_ms, NowMs());  // an early fence's
  // Pages newly taken: a page a fence took before and nothing mapped since
  // costs the fence nothing, so it counts neither here nor in the rate.
  size_t taken = 0;
  uint64_t taken_bytes = 0;
  if (backend_) {  // without one, every access comes through AccessPage
    std::vector<proto::PageAddr> pages;
    for (proto::PageAddr p : agent_.AccessiblePages()) {
      if (shard_map_.ShardOf(p) == shard) pages.push_back(p);
    }
    std::sort(pages.begin(), pages.end());
    // Runs of neighbouring pages of one region go at once (UnmapRange): a
    // fence must be over within the lease's margin. Unmap is idempotent: a
    // page unmapped already stays so.
    for (size_t i = 0, j = 0; i < pages.size(); i = j) {
      PageStore* store = StoreOf(pages[i]);
      const uint64_t ps = store == nullptr ? 0 : store->page_size();
      for (j = i + 1; j < pages.size() && store != nullptr && pages[j] == pages[j - 1] + ps &&
                      StoreOf(pages[j]) == store;
           ++j) {
      }
      Status run = store == nullptr ? NotFound("no store") : backend_->UnmapRange(pages[i], j - i, ps);
      if (!run.ok()) {
        LogError("fence: taking pages from " + Hex(pages[i]) + " on from local processes: " +
                 run.ToString() + "; page by page");
        for (size_t k = i; k < j; ++k) {  // one by one, to name what fails
          Status st = backend_->Unmap(pages[k]);
          if (!st.ok()) {
            LogError("fence: taking page " + Hex(pages[k]) + " from local processes: " + st.ToString());
            continue;
          }
          if (fenced_pages_.insert(pages[k]).second) {
            ++taken;
            taken_bytes += ps;
          }
        }
        continue;
      }
      for (size_t k = i; k < j; ++k) {
        if (fenced_pages_.insert(pages[k]).second) {
          ++taken;
          taken_bytes += ps;
        }
      }
    }
  }
  const uint64_t took_us = MonotonicUs() - start_us;
  const uint64_t took_ms = took_us / 1000;
  if (options_.fence_bytes_per_ms == 0 && taken_bytes >= kFenceRateSampleBytes) {
    // What this machine does, for the next fence's lead (an early fence
    // measures it as well as a late one).
    fence_bytes_per_ms_ = std::max<uint64_t>(1, taken_bytes * 1000 / std::max<uint64_t>(took_us, 1));
  }
  if (early) {
    char held[32];
    std::snprintf(held, sizeof(held), "%.1f MiB", static_cast<double>(held_bytes_) / (1 << 20));
    LogWarning("node " + std::to_string(id_) + ": no answer from the coordinator at " + s.address +
               "; its lease lapses " + std::to_string(lead_ms) +
               " ms from the start of this fence, too late to fence the " + held +
               " this node holds after it: " + std::to_string(taken) +
               " pages were taken from local processes now (in " +
               std::to_string(took_ms) + " ms); they map them again until the lapse");
    return;
  }
  LogWarning("node " + std::to_string(id_) + ": no answer from the coordinator at " + s.address +
             " for " + std::to_string(s.lease_ms) + " ms: it may declare this node dead, so " +
             std::to_string(taken) + " pages were taken from local processes (in " +
             std::to_string(took_ms) + " ms), whose accesses wait until it answers");
  // The lease leaves a quarter of the deadline, a third of lease_ms, for
  // the fence: one over later than that after the lapse may have let
  // processes read pages the directory had handed on.
  const uint64_t late_ms = NowMs() - std::min(NowMs(), lapsed_ms);
  if (late_ms > s.lease_ms / 3) {
    LogError("node " + std::to_string(id_) + ": the fence was over " + std::to_string(late_ms) +
             " ms after the lease lapsed, more than the " + std::to_string(s.lease_ms / 3) +
             " ms the lease leaves for it; give the coordinator a longer --dead-after-ms "
             "for nodes that hold this much (or a loop held this long)");
  }
}

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
  if (gpu_pins_.empty()) return false;
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

void NodeDaemon::HandleDirectoryMessage(proto::Message m) {
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
    std::vector<proto::Message>& held = deferred_[page];
    const auto same = [&](const proto::Message& o) {
      return proto::Encode(o, 0) == proto::Encode(m, 0);  // a resend of one held already
    };
    if (std::none_of(held.begin(), held.end(), same) && held.size() < kMaxDeferredPerPage) {
      held.push_back(std::move(m));
      ++stats_.deferred_requests;
    }
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
          if (StoreOf(x.page) == nullptr) {
            ++stats_.protocol_errors;
            LogWarning(std::string(proto::TypeName(T::kType)) + " for a page of no open region");
            return;
          }
          if constexpr (std::is_same_v<T, proto::Grant>) agent_.HandleGrant(x, now, &acts);
          if constexpr (std::is_same_v<T, proto::Fetch>) agent_.HandleFetch(x, now, &acts);
          if constexpr (std::is_same_v<T, proto::Invalidate>) agent_.HandleInvalidate(x, now, &acts);
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
    auto* d = std::get_if<proto::PageData>(&m.message);
    PageStore* store = d ? StoreOf(d->page) : nullptr;
    if (d == nullptr || store == nullptr || d->sender != m.from ||
        m.page.size != store->page_size() || store->CheckPage(d->page).ok() == false) {
      ++stats_.protocol_errors;
      LogWarning("dropping a malformed message from node " + std::to_string(m.from));
      continue;
    }
    ++stats_.pages_received;
    stats_.bytes_received += m.page.size;
    const DataHandle h = ++next_handle_;
    data_[h] = Received{d->page, std::move(m.page)};
    agent_.HandlePageData(*d, h, NowMs(), &acts);
  }
  if (!acts.empty()) Execute(acts);  // the pages of a batch together: Coalesce
  return progressed;
}

void NodeDaemon::ForgetSends(proto::PageAddr first, proto::PageAddr end) {
  std::erase_if(recent_sends_, [&](const auto& s) { return s.first.page >= first && s.first.page < end; });
  std::erase_if(recent_sends_order_, [&](const SentPage& s) { return s.page >= first && s.page < end; });
}

bool NodeDaemon::SentAlready(proto::NodeId to, proto::PageAddr page, proto::TxnId txn) const {
  auto it = recent_sends_.find(SentPage{to, page, txn});
  return it != recent_sends_.end() && it->second == transport_->PeerGeneration(to);
}

void NodeDaemon::SendPage(proto::NodeId to, const proto::PageData& header, size_t length,
                          const UcxTransport::PageFill& fill) {
  if (transport_->HasPeer(to)) {
    const SentPage key{to, header.page, header.txn};
    bool read = true;  // false: fill failed, and said so
    Status st = transport_->SendPage(to, header, length, [&](std::span<uint8_t> out) {
      Status filled = fill(out);
      read = filled.ok();
      return filled;
    });
    if (!st.ok()) {
      if (read) LogWarning("sending a page to node " + std::to_string(to) + ": " + st.ToString());
      return;
    }
    if (recent_sends_.insert_or_assign(key, transport_->PeerGeneration(to)).second) {
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
    return;
  }
  proto::PageData d{header.page, header.txn, header.sender, header.version,
                    std::vector<uint8_t>(length)};
  if (Status st = fill(d.data); !st.ok()) return;  // fill said why
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

// ---------------------------------------------------------------------------
// Regions, accesses, actions

PageStore* NodeDaemon::StoreOf(proto::PageAddr page) const {
  auto it = stores_.upper_bound(page);
  if (it == stores_.begin()) return nullptr;
  --it;
  PageStore* s = it->second.get();
  return page < s->base() + s->size() ? s : nullptr;
}

std::span<uint8_t> NodeDaemon::Bytes(proto::PageAddr page) {
  PageStore* s = StoreOf(page);
  return s == nullptr ? std::span<uint8_t>() : s->MappedPage(page);
}

void NodeDaemon::CallAccessFn(proto::PageAddr page, bool write, bool prefetch,
                              const AccessFn& fn) {
  if (prefetch) {
    fn(Status::Ok(), {});
    return;
  }
  Status st = Status::Ok();
  if (TakenFromCpu(page)) {
    st = RevealToCpu(page);  // their bytes are retained: map them as the agent holds them
  }
  if (st.ok() && backend_) st = backend_->WriteBack(page);
  if (st.ok() && tier_) {
    // The host bytes must be current, and a write makes GPU copies stale.
    st = write ? tier_->EvictCopies(std::span<const proto::PageAddr>(&page, 1))
               : tier_->WriteBack(std::span<const proto::PageAddr>(&page, 1));
  }
  if (!st.ok()) {
    fn(st, {});
    return;
  }
  fn(Status::Ok(), Bytes(page));
  if (write && backend_) {
    st = backend_->Refresh(page);
    if (!st.ok()) LogError("refreshing page " + Hex(page) + " after a write: " + st.ToString());
  }
}

Status NodeDaemon::OpenRegion(const proto::RegionReply& r) {
  if (stores_.count(r.base)) return AlreadyExists("region '" + r.name + "' is open here");
  PageStoreOptions o;
  o.name = "dsvm-" + r.name;
  o.map_for_copies = options_.map_for_copies;
  DSVM_ASSIGN_OR_RETURN(std::unique_ptr<PageStore> store,
                        PageStore::Create(r.base, r.size, r.page_size, o));
  if (backend_) DSVM_RETURN_IF_ERROR(backend_->AddRegion(store.get()));
  if (tier_) {
    Status st = tier_->AddRegion(store.get());
    if (!st.ok()) {
      if (backend_) backend_->RemoveRegion(r.base).IgnoreError();  // just added, unmapped
      return st;
    }
  }
  stores_[r.base] = std::move(store);
  region_ids_[r.base] = r.region;
  return Status::Ok();
}

void NodeDaemon::Access(proto::PageAddr address, bool write, AccessFn fn) {
  AccessPage(address, write, std::move(fn), false);
}

void NodeDaemon::AccessPage(proto::PageAddr address, bool write, AccessFn fn, bool prefetch) {
  if (LeaseLapsed(address)) {  // the page's shard (2 MiB granules hold whole pages)
    Park([this, address, write, fn = std::move(fn), prefetch]() mutable {
      AccessPage(address, write, std::move(fn), prefetch);
    });
    return;
  }
  ++stats_.accesses;
  PageStore* store = StoreOf(address);
  if (store == nullptr) {
    ++stats_.accesses_failed;
    fn(NotFound("address in no open region"), {});
    return;
  }
  const proto::PageAddr page =
      store->base() + (address - store->base()) / store->page_size() * store->page_size();
  if (IsOfADeletedRegion(page)) {
    ++stats_.accesses_failed;
    fn(NotFound("page " + Hex(page) + " is of a deleted region"), {});
    return;
  }
  const WaiterId w = ++next_waiter_;
  Actions acts;
  if (agent_.Fault(page, write, w, NowMs(), &acts) == FaultResult::kHit) {
    Execute(acts);
    CallAccessFn(page, write, prefetch, fn);
    return;
  }
  if (!prefetch) {
    ++(write ? stats_.write_faults : stats_.read_faults);
  } else if (std::any_of(acts.begin(), acts.end(), [](const Action& a) {
               return a.kind == ActionKind::kSendToDirectory;
             })) {
    ++stats_.prefetched_pages;  // this prefetch asked for it (not one already on its way)
  }
  Waiter& waiter = waiters_[w];
  waiter.page = page;
  waiter.fn = std::move(fn);
  waiter.write = write;
  waiter.prefetch = prefetch;
  Execute(acts);
}

bool NodeDaemon::MayGiveUp(proto::PageAddr page) const {
  // Not while a gpu map holds it; nor a page of a region deleted but kept
  // for local mappings: it is no directory's business any more (its
  // addresses may be another region's), and it goes with the region.
  return gpu_pins_.count(page) == 0 && !IsOfADeletedRegion(page);
}

bool NodeDaemon::Evict(proto::PageAddr page) {
  if (!MayGiveUp(page)) return false;
  Actions acts;
  const bool started = agent_.Evict(page, NowMs(), &acts, PreferredNodeOf(page));
  Execute(acts);
  return started;
}

void NodeDaemon::Execute(Actions& actions) {
  for (Action& a : actions) {
    if (Coalesce(a)) continue;
    FlushRuns();
    ExecuteOne(a);
  }
  FlushRuns();
  if (!to_place_.empty()) {
    // Pages installed Shared under preferred-GPU advice, per region (a
    // local write's Modified install is the CPU's, not placed).
    std::vector<proto::PageAddr> pages = std::move(to_place_);
    to_place_.clear();
    std::sort(pages.begin(), pages.end());
    pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
    std::erase_if(pages, [&](proto::PageAddr p) {
      return agent_.StateOf(p) != PageState::kShared || PreferredGpuOf(p) == kNoGpuAdvice;
    });
    for (size_t i = 0; i < pages.size();) {
      PageStore* store = StoreOf(pages[i]);
      size_t j = i + 1;
      while (j < pages.size() && StoreOf(pages[j]) == store) ++j;
      PlaceOnPreferredGpu(std::vector<proto::PageAddr>(pages.begin() + i, pages.begin() + j));
      i = j;
    }
  }
  if (tier_ && !leaving_) LeavePages();
}

// Pages of a batch arrive together and the agent answers each with
// kInstallData, kMapRead, kSendToDirectory(Done) and kWake: page by page
// that is a pwrite and a UFFDIO_CONTINUE per mapping for each. Held here,
// neighbouring pages' installs become one pwritev and their maps one
// UFFDIO_CONTINUE per mapping. Order is kept where it matters: a page's
// install goes before its map (installs are flushed first), wake-ups after
// both, and any other action flushes everything held before it runs. A
// daemon with a GPU tier runs every action alone (its hooks are per page).
bool NodeDaemon::Coalesce(Action& a) {
  constexpr size_t kMaxRunPages = 64;
  if (tier_ || !gpu_hidden_.empty()) return false;
  switch (a.kind) {
    case ActionKind::kSendToDirectory:  // queued for the end of the turn anyway
      ExecuteOne(a);
      return true;
    case ActionKind::kWake:
      held_wakes_.push_back(std::move(a));
      return true;
    case ActionKind::kInstallData: {
      PageStore* store = StoreOf(a.page);
      if (store == nullptr || data_.count(a.handle) == 0) return false;
      InstallRun& r = install_run_;
      const bool in_map_run = map_run_.store == store && a.page >= map_run_.first &&
                              a.page < map_run_.first + map_run_.pages * store->page_size();
      if (in_map_run) return false;
      if (!r.handles.empty() &&
          (r.store != store || a.page != r.first + r.handles.size() * store->page_size() ||
           r.handles.size() == kMaxRunPages)) {
        FlushRuns();
      }
      if (install_run_.handles.empty()) {
        install_run_.store = store;
        install_run_.first = a.page;
      }
      install_run_.handles.push_back(a.handle);
      return true;
    }
    case ActionKind::kMapRead:
    case ActionKind::kMapWrite: {
      PageStore* store = StoreOf(a.page);
      if (store == nullptr || !backend_ || LeaseLapsed(a.page)) return false;
      const bool write = a.kind == ActionKind::kMapWrite;
      MapRun& m = map_run_;
      if (m.pages > 0 && (m.store != store || a.page != m.first + m.pages * store->page_size() ||
                          m.write != write || m.pages == kMaxRunPages)) {
        FlushRuns();
      }
      if (map_run_.pages == 0) {
        map_run_.store = store;
        map_run_.first = a.page;
        map_run_.write = write;
      }
      ++map_run_.pages;
      return true;
    }
    case ActionKind::kDropData:
      if (std::find(install_run_.handles.begin(), install_run_.handles.end(), a.handle) !=
          install_run_.handles.end()) {
        return false;
      }
      ExecuteOne(a);
      return true;
    default:
      return false;
  }
}

void NodeDaemon::FlushRuns() {
  if (!install_run_.handles.empty()) {
    InstallRun r = std::move(install_run_);
    install_run_ = {};
    std::vector<std::span<const uint8_t>> bytes;
    for (DataHandle h : r.handles) bytes.push_back(data_.at(h).bytes.bytes());
    Status st = r.store->WritePages(r.first, bytes);
    if (!st.ok()) {
      ++stats_.protocol_errors;
      LogError("install of " + std::to_string(r.handles.size()) + " pages from " + Hex(r.first) +
               ": " + st.ToString());
    }
    for (DataHandle h : r.handles) data_.erase(h);
  }
  if (map_run_.pages > 0) {
    MapRun m = map_run_;
    map_run_ = {};
    for (size_t i = 0; i < m.pages && !fenced_pages_.empty(); ++i) {
      fenced_pages_.erase(m.first + i * m.store->page_size());
    }
    Status st = backend_->MapRange(m.first, m.pages, m.store->page_size(), m.write);
    if (!st.ok()) {
      // Page by page, so that what fails is named and the rest is mapped.
      for (size_t i = 0; i < m.pages; ++i) {
        Action a;
        a.kind = m.write ? ActionKind::kMapWrite : ActionKind::kMapRead;
        a.page = m.first + i * m.store->page_size();
        ExecuteOne(a);
      }
    }
  }
  if (!held_wakes_.empty()) {
    std::vector<Action> wakes = std::move(held_wakes_);
    held_wakes_.clear();
    for (Action& w : wakes) ExecuteOne(w);
  }
}

void NodeDaemon::LeavePages() {
  leaving_ = true;
  for (std::vector<proto::PageAddr> pages = tier_->TakePagesToLeave(); !pages.empty();
       pages = tier_->TakePagesToLeave()) {
    for (proto::PageAddr page : pages) {
      Actions acts;
      // Refused (a request in flight, or no copy): it stays, and may be
      // chosen again later.
      if (!MayGiveUp(page) || !agent_.Evict(page, NowMs(), &acts, PreferredNodeOf(page))) {
        tier_->table().KeepOnNode(page).IgnoreError();  // the tier reported it leaving
        continue;
      }
      ++stats_.pages_left;
      for (Action& a : acts) ExecuteOne(a);
    }
  }
  leaving_ = false;
}

void NodeDaemon::Fatal(Status why) {
  if (!fatal_.ok()) return;
  LogError("stopping: " + why.ToString());
  fatal_ = std::move(why);
  stopping_ = true;
}

void NodeDaemon::ExecuteOne(Action& a) {
  if (!fatal_.ok()) return;  // stopping: nothing more leaves or changes here
  PageStore* store = StoreOf(a.page);
  auto check = [&](const Status& st, const char* what) {
    if (st.ok()) return;
    ++stats_.protocol_errors;
    LogError(std::string(what) + " of page " + std::to_string(a.page) + ": " + st.ToString());
  };
  if (store == nullptr && a.kind != ActionKind::kSendToDirectory && a.kind != ActionKind::kWake &&
      a.kind != ActionKind::kDropData && a.kind != ActionKind::kProtocolError) {
    check(NotFound("no open region"), "action");
    return;
  }
  // The GPU tier's coherence hooks (docs/GPU.md): a dirty GPU copy is
  // written back before the node reads, moves or maps the host bytes again;
  // a page the node gives up loses its GPU copy; an installed page counts
  // against the host budget.
  const std::span<const proto::PageAddr> one(&a.page, 1);
  if (!gpu_hidden_.empty()) {  // pages hidden for the GPU (write maps, prefetch)
    switch (a.kind) {
      case ActionKind::kMapRead:   // written back below, then mapped
      case ActionKind::kMapWrite:
      case ActionKind::kUnmap:     // local processes lose it anyway
      case ActionKind::kDiscard:
      case ActionKind::kStash:
        gpu_hidden_.erase(a.page);
        break;
      default:
        break;
    }
  }
  // A page whose current bytes are on a GPU the tier can no longer copy
  // from (a failed write-back): sending or mapping the host bytes would pass
  // stale data for current. The daemon stops instead; the directory then
  // declares this node dead and its sole copies lost, which clients are told.
  auto write_back = [&]() {
    Status st = tier_->WriteBack(one);
    if (!st.ok()) {
      Fatal(FailedPrecondition("GPU write-back of page " + Hex(a.page) + ": " + st.ToString()));
    }
    return st.ok();
  };
  if (tier_) {
    switch (a.kind) {
      case ActionKind::kSendPage:
      case ActionKind::kUnmap:
      case ActionKind::kMapRead:
      case ActionKind::kMapWrite:
        if (!write_back()) return;
        if ((a.kind == ActionKind::kMapRead || a.kind == ActionKind::kMapWrite) &&
            tier_->table().IsLeaving(a.page)) {
          // The agent kept the page after all (the directory refused the Evict).
          check(tier_->table().KeepOnNode(a.page), "GPU tier keep");
        }
        break;
      case ActionKind::kStash:
        if (!write_back()) return;
        check(tier_->Drop(one), "GPU drop");
        break;
      case ActionKind::kDiscard:
        check(tier_->Drop(one), "GPU drop");
        break;
      default:
        break;
    }
  }
  switch (a.kind) {
    case ActionKind::kSendToDirectory:
      // The agent knows pages by address only; the directory is told which
      // region the node maps there, so that it never serves a request of a
      // deleted region with the page of a region made at its addresses.
      if (auto* acquire = std::get_if<proto::Acquire>(&a.message)) {
        if (store == nullptr) {
          // Not expected: a region's pages are forgotten when it goes. The
          // request ends here rather than be resent for ever.
          check(NotFound("no open region"), "Acquire");
          EndWaits(ForgetPages(a.page, a.page + 1), "its region is not open here");
          return;
        }
        acquire->region = region_ids_.at(store->base());
      }
      // Queued: Run() writes everything queued in one go before it waits,
      // so the requests of a prefetch window share a send. Not open: the
      // agent resends after the rejoin.
      if (proto::FramedSocket& link = LinkFor(DirectoryPageOf(a.message)); link.is_open()) {
        link.Queue(a.message, 0);
      }
      return;
    case ActionKind::kSendPage:
    case ActionKind::kSendStash: {
      if (SentAlready(a.node, a.page, a.txn)) {
        ++stats_.duplicate_sends_skipped;
        return;
      }
      // A backend with its own copy of mapped pages (kmod) brings it to
      // the store first; the agent downgraded the page before this send.
      if (a.kind == ActionKind::kSendPage && backend_) {
        check(backend_->WriteBack(a.page), "write back for send");
      }
      // Read straight into the buffer the page leaves from. A page that
      // cannot be read is not sent: the requester asks again.
      SendPage(a.node, proto::PageData{a.page, a.txn, id_, a.version, {}}, store->page_size(),
               [&](std::span<uint8_t> out) {
                 const bool current = a.kind == ActionKind::kSendPage;
                 Status st = current ? store->ReadPage(a.page, out)
                                     : store->ReadStash(a.page, a.txn, out);
                 check(st, current ? "read for send" : "read stash for send");
                 return st;
               });
      return;
    }
    case ActionKind::kMapRead:
    case ActionKind::kMapWrite:
      if (backend_ && LeaseLapsed(a.page)) {
        // Not while the lease is lapsed: the page's next fault maps it
        // once the lease is back. Unmap, not nothing: a downgrade must
        // still take the write access away before the page is sent.
        check(backend_->Unmap(a.page), "fence");
        fenced_pages_.insert(a.page);
        return;
      }
      fenced_pages_.erase(a.page);
      check(store->Restore(a.page), "restore");
      if (backend_) {
        check(a.kind == ActionKind::kMapRead ? backend_->MapRead(a.page) : backend_->MapWrite(a.page),
              "map");
      }
      return;
    case ActionKind::kUnmap:
      check(backend_ ? backend_->Unmap(a.page) : store->Retain(a.page), "unmap");
      return;
    case ActionKind::kDiscard:
      if (backend_) check(backend_->Invalidate(a.page), "invalidate");
      check(store->Discard(a.page), "discard");
      return;
    case ActionKind::kStash:
      if (backend_) check(backend_->Unmap(a.page), "unmap");
      check(store->Stash(a.page, a.txn), "stash");
      return;
    case ActionKind::kInstallZero:
      check(store->ZeroPage(a.page), "zero");
      if (tier_) check(tier_->AddHostPage(a.page, NowMs()), "GPU tier admit");
      if (!preferred_gpu_.empty()) to_place_.push_back(a.page);
      return;
    case ActionKind::kInstallData: {
      auto it = data_.find(a.handle);
      if (it == data_.end()) return check(NotFound("no such data handle"), "install");
      check(store->WritePage(a.page, it->second.bytes.bytes()), "install");
      data_.erase(it);
      if (tier_) check(tier_->AddHostPage(a.page, NowMs()), "GPU tier admit");
      if (!preferred_gpu_.empty()) to_place_.push_back(a.page);
      return;
    }
    case ActionKind::kInstallStash:
      check(store->InstallStash(a.page, a.txn), "install stash");
      if (tier_) check(tier_->AddHostPage(a.page, NowMs()), "GPU tier admit");
      if (!preferred_gpu_.empty()) to_place_.push_back(a.page);
      return;
    case ActionKind::kDropStash:
      if (store->HasStash(a.page, a.txn)) check(store->DropStash(a.page, a.txn), "drop stash");
      return;
    case ActionKind::kDropData:
      data_.erase(a.handle);
      return;
    case ActionKind::kWake: {
      auto it = waiters_.find(a.waiter);
      if (it == waiters_.end()) return;
      Waiter w = std::move(it->second);
      waiters_.erase(it);
      if (w.fault) {
        --fault_waiters_;
        // Not found: the client's mapping went meanwhile; nothing waits.
        Status st = backend_->Resolve(w.token, a.status == StatusCode::kOk ? Resolution::kRetry
                                                                          : Resolution::kError);
        if (!st.ok() && st.code() != StatusCode::kNotFound) check(st, "resolve");
        if (a.status != StatusCode::kOk) {
          ++stats_.accesses_failed;
          LogWarning("a client's access to page " + Hex(w.page) + " fails (SIGBUS): " +
                     (a.status == StatusCode::kNotFound
                          ? std::string("its region was deleted")
                          : Status(a.status, "").ToString()));
        }
        return;
      }
      if (a.status != StatusCode::kOk) {
        ++stats_.accesses_failed;
        w.fn(Status(a.status, "page " + std::to_string(w.page) + " is lost"), {});
      } else if (LeaseLapsed(w.page)) {
        // Granted, but the lease lapsed before the grant was carried out:
        // the access starts again once it is back (Leases).
        Park([this, w = std::move(w)]() mutable {
          AccessPage(w.page, w.write, std::move(w.fn), w.prefetch);
        });
      } else {
        CallAccessFn(w.page, w.write, w.prefetch, w.fn);
      }
      return;
    }
    case ActionKind::kProtocolError:
      ++stats_.protocol_errors;
      LogWarning("protocol error on page " + std::to_string(a.page) + ": " + a.text);
      return;
    case ActionKind::kInvalid:
      break;
  }
  DSVM_CHECK_MSG(false, "invalid action");
}

// ---------------------------------------------------------------------------
// Client processes: faults and the client plane

void NodeDaemon::OnFaultEvents() {
  FaultEvent events[kFaultBatch];
  for (;;) {
    auto n = backend_->ReadEvents(events);
    if (!n.ok()) {
      LogError("reading fault events: " + n.status().ToString());
      return;
    }
    if (*n == 0) return;
    for (size_t i = 0; i < *n; ++i) {
      const FaultEvent& e = events[i];
      if (e.kind == FaultEventKind::kMappingClosed) {
        backend_->RemoveMapping(e.mapping).IgnoreError();
        for (auto& [fd, client] : clients_) {
          std::erase_if(client.mappings, [&](const auto& m) { return m.second == e.mapping; });
        }
        DropUnmappedDeleted();
        continue;
      }
      if (e.kind == FaultEventKind::kFault) HandleFault(e);
    }
  }
}

void NodeDaemon::HandleFault(const FaultEvent& e) {
  if (LeaseLapsed(e.page)) {
    Park([this, e] { HandleFault(e); });
    return;
  }
  ++stats_.client_faults;
  if (TakenFromCpu(e.page)) {
    Status st = RevealToCpu(e.page);
    if (!st.ok()) LogError("revealing page " + Hex(e.page) + ": " + st.ToString());
  }
  if (IsOfADeletedRegion(e.page)) {
    // The directory would refuse it (the Acquire names the deleted
    // region): the access fails here at once (SIGBUS).
    ++stats_.accesses_failed;
    LogWarning("a client's access to page " + Hex(e.page) +
               " fails (SIGBUS): its region was deleted");
    Status st = backend_->Resolve(e.token, Resolution::kError);
    if (!st.ok() && st.code() != StatusCode::kNotFound) LogWarning("resolving a fault: " + st.ToString());
    return;
  }
  const WaiterId w = ++next_waiter_;
  Actions acts;
  if (agent_.Fault(e.page, e.write, w, NowMs(), &acts) == FaultResult::kHit) {
    Execute(acts);
    Status st = backend_->Resolve(e.token, Resolution::kRetry);
    if (!st.ok() && st.code() != StatusCode::kNotFound) {
      LogWarning("resolving a fault: " + st.ToString());
    }
    return;
  }
  ++(e.write ? stats_.write_faults : stats_.read_faults);
  Waiter waiter;
  waiter.page = e.page;
  waiter.fault = true;
  waiter.token = e.token;
  waiters_[w] = std::move(waiter);
  ++fault_waiters_;
  Execute(acts);
  if (!e.write) ReadAhead(e.page);
}

// ---------------------------------------------------------------------------
// Prefetch and advice

Status NodeDaemon::CheckClientRange(proto::PageAddr address, uint64_t length,
                                    proto::PageAddr* first, proto::PageAddr* end,
                                    uint32_t* page_size) {
  if (length == 0) return InvalidArgument("empty range at " + Hex(address));
  PageStore* store = StoreOf(address);
  if (store == nullptr) return NotFound("no region open on this node at " + Hex(address));
  const uint64_t left = store->base() + store->size() - address;
  if (length > left) {
    return InvalidArgument(std::to_string(length) + " bytes from " + Hex(address) +
                           " run past the end of the region at " + Hex(store->base() + store->size()));
  }
  const uint64_t ps = store->page_size();
  *first = store->base() + (address - store->base()) / ps * ps;
  *end = store->base() + (address + length - store->base() + ps - 1) / ps * ps;
  *page_size = static_cast<uint32_t>(ps);
  return Status::Ok();
}

void NodeDaemon::StartPrefetch(Prefetch p) {
  const uint64_t id = ++next_prefetch_;
  prefetches_.emplace(id, std::move(p));
  PumpPrefetch(id);
}

void NodeDaemon::PumpPrefetch(uint64_t id) {
  auto it = prefetches_.find(id);
  if (it == prefetches_.end()) return;
  Prefetch& p = it->second;  // stable: only this function erases jobs
  p.pumping = true;
  const uint32_t window = static_cast<uint32_t>(
      std::clamp<uint64_t>(kPrefetchWindowBytes / p.page_size, 1, kPrefetchWindow));
  while (p.in_flight < window && p.next < p.end && p.error.ok()) {
    const proto::PageAddr page = p.next;
    p.next += p.page_size;
    ++p.in_flight;
    AccessPage(page, p.write, [this, id](Status st, std::span<uint8_t>) {
      Prefetch& q = prefetches_.at(id);
      --q.in_flight;
      if (!st.ok() && q.error.ok()) q.error = st;
      if (!q.pumping) PumpPrefetch(id);  // answered later than the call
    }, true);
  }
  p.pumping = false;
  if (p.in_flight > 0 || (p.next < p.end && p.error.ok())) return;
  if (p.done) {
    std::function<void(Status)> done = std::move(p.done);
    Status error = p.error;
    prefetches_.erase(it);
    done(error);
    return;
  }
  if (p.client_fd >= 0 && IsClient(p.client_fd, p.client_serial)) {
    ReplyToClient(p.client_fd, p.client_request, proto::ToReply(p.error));
  }
  prefetches_.erase(it);
}

Status NodeDaemon::SetAdvice(const proto::Advise& m) {
  if (m.advice == proto::Advice::kPreferredGpu || m.advice == proto::Advice::kAccessedBy) {
    return SetGpuAdvice(m);
  }
  const bool names_node = m.advice == proto::Advice::kPreferredNode;
  if (!names_node && m.node != proto::kNoNode) {
    return InvalidArgument("advice " + std::to_string(static_cast<int>(m.advice)) +
                           " names no node, but node " + std::to_string(m.node) + " was given");
  }
  if (names_node && m.node == proto::kNoNode) {
    return InvalidArgument("preferred-node advice needs a node (0 was given)");
  }
  proto::PageAddr first, end;
  uint32_t ps;
  DSVM_RETURN_IF_ERROR(CheckClientRange(m.address, m.length, &first, &end, &ps));
  PageStore* store = StoreOf(first);
  std::vector<proto::NodeId>& preferred = preferred_[store->base()];
  if (preferred.empty()) preferred.assign(store->size() / ps, proto::kNoNode);
  if (names_node || m.advice == proto::Advice::kNormal) {
    for (proto::PageAddr p = first; p < end; p += ps) preferred[store->IndexOf(p)] = m.node;
  }
  if (m.advice == proto::Advice::kNormal) {  // ends GPU advice too
    for (auto* gpu_advice : {&preferred_gpu_, &accessed_by_}) {
      if (auto it = gpu_advice->find(store->base()); it != gpu_advice->end()) {
        for (proto::PageAddr p = first; p < end; p += ps) it->second[store->IndexOf(p)] = kNoGpuAdvice;
      }
    }
  }
  if (names_node) return Status::Ok();
  // Normal or read-mostly: the per-page read advice.
  std::vector<proto::Advice>& per_page = advice_[store->base()];
  if (per_page.empty()) per_page.assign(store->size() / ps, proto::Advice::kNormal);
  for (proto::PageAddr p = first; p < end; p += ps) per_page[store->IndexOf(p)] = m.advice;
  return Status::Ok();
}

Status NodeDaemon::SetGpuAdvice(const proto::Advise& m) {
  if (!tier_) {
    return FailedPrecondition("GPU advice, but this node has no GPU tier: dsvm-node runs with "
                              "--device-backend none");
  }
  if (m.node >= device_->device_count()) {
    return InvalidArgument("gpu " + std::to_string(m.node) + " does not exist: this node has " +
                           std::to_string(device_->device_count()) + " (" +
                           std::string(device_->name()) + ")");
  }
  proto::PageAddr first, end;
  uint32_t ps;
  DSVM_RETURN_IF_ERROR(CheckClientRange(m.address, m.length, &first, &end, &ps));
  PageStore* store = StoreOf(first);
  const bool accessed_by = m.advice == proto::Advice::kAccessedBy;
  std::vector<uint32_t>& gpu_of = (accessed_by ? accessed_by_ : preferred_gpu_)[store->base()];
  if (gpu_of.empty()) gpu_of.assign(store->size() / ps, kNoGpuAdvice);
  if (accessed_by) {  // takes effect at the next map
    for (proto::PageAddr p = first; p < end; p += ps) gpu_of[store->IndexOf(p)] = m.node;
    return Status::Ok();
  }
  std::vector<proto::PageAddr> valid;
  for (proto::PageAddr p = first; p < end; p += ps) {
    gpu_of[store->IndexOf(p)] = m.node;
    if (agent_.StateOf(p) != PageState::kInvalid && !agent_.HasPending(p)) valid.push_back(p);
  }
  PlaceOnPreferredGpu(std::move(valid));
  LeavePages();  // admitting them may have gone past the host budget
  return Status::Ok();
}

bool NodeDaemon::AllReadMostly(std::span<const proto::PageAddr> pages) const {
  if (pages.empty()) return false;
  PageStore* store = StoreOf(pages.front());
  if (store == nullptr) return false;
  auto it = advice_.find(store->base());
  if (it == advice_.end()) return false;
  for (proto::PageAddr p : pages) {
    if (it->second[store->IndexOf(p)] != proto::Advice::kReadMostly) return false;
  }
  return true;
}

uint32_t NodeDaemon::PreferredGpuOf(proto::PageAddr page) const {
  return GpuAdviceOf(preferred_gpu_, page);
}

uint32_t NodeDaemon::GpuAdviceOf(const std::map<proto::PageAddr, std::vector<uint32_t>>& advice,
                                 proto::PageAddr page) const {
  auto it = advice.upper_bound(page);
  if (it == advice.begin()) return kNoGpuAdvice;
  --it;
  auto s = stores_.find(it->first);
  if (s == stores_.end() || page >= it->first + s->second->size()) return kNoGpuAdvice;
  return it->second[s->second->IndexOf(page)];
}

void NodeDaemon::PlaceOnPreferredGpu(std::vector<proto::PageAddr> pages) {
  if (!tier_ || pages.empty()) return;
  PageStore* store = StoreOf(pages.front());
  if (store == nullptr) return;
  // Per GPU, in chunks: one that does not fit is left on the host.
  std::map<uint32_t, std::vector<proto::PageAddr>> by_gpu;
  for (proto::PageAddr p : pages) {
    const uint32_t gpu = PreferredGpuOf(p);
    // Not pages a gpu map holds, nor those it pinned elsewhere.
    if (gpu != kNoGpuAdvice && gpu_pins_.count(p) == 0 && !tier_->table().IsLeaving(p)) {
      by_gpu[gpu].push_back(p);
    }
  }
  constexpr size_t kChunk = 64;
  for (auto& [gpu, list] : by_gpu) {
    for (size_t i = 0; i < list.size(); i += kChunk) {
      std::span<const proto::PageAddr> chunk(list.data() + i, std::min(kChunk, list.size() - i));
      std::vector<proto::PageAddr> modified;
      for (proto::PageAddr p : chunk) {
        if (backend_) backend_->WriteBack(p).IgnoreError();  // kmod: its own copy to the store
        if (agent_.StateOf(p) == PageState::kModified) modified.push_back(p);
      }
      // A clean GPU copy of a page local processes may write is stale.
      if (!tier_->EvictCopies(modified).ok()) continue;
      Result<std::vector<DevicePtr>> placed =
          tier_->MakeResident(store->base(), chunk, gpu, /*for_write=*/false, NowMs());
      if (!placed.ok()) {
        LogLine(LogLevel::kDebug, "preferred GPU " + std::to_string(gpu) + ": " + placed.status().ToString());
        break;  // the budget is full: the rest stays on the host
      }
      tier_->Unpin(chunk).IgnoreError();  // pinned just above
      HideFromCpu(modified, /*writes_only=*/true);
      stats_.gpu_placed += chunk.size();
    }
  }
}

proto::NodeId NodeDaemon::PreferredNodeOf(proto::PageAddr page) {
  PageStore* store = StoreOf(page);
  if (store == nullptr) return proto::kNoNode;
  auto it = preferred_.find(store->base());
  return it == preferred_.end() ? proto::kNoNode : it->second[store->IndexOf(page)];
}

bool NodeDaemon::ReadAheadSequential(PageStore* store, proto::PageAddr page) {
  const uint64_t ps = store->page_size();
  ReadAheadState& ra = read_ahead_[store->base()];
  // Sequential: the page after the last miss, or a miss inside (or just
  // after) the window read ahead, which the reader has caught up with.
  const bool in_window = ra.pages > 0 && page >= ra.window_begin && page <= ra.window_end;
  const bool next = ra.last_miss != 0 && page == ra.last_miss + ps;
  ra.last_miss = page;
  if (!in_window && !next) {
    ra.pages = 0;
    return false;
  }
  const uint64_t max_pages =
      std::clamp<uint64_t>(kPrefetchWindowBytes / ps, 1, kSequentialMaxPages);
  const uint64_t first = std::clamp<uint64_t>(kSequentialFirstBytes / ps, 1, max_pages);
  ra.pages = in_window ? std::min(max_pages, ra.pages * 2) : first;
  const proto::PageAddr region_end = store->base() + store->size();
  const proto::PageAddr begin = std::max(page + ps, in_window ? ra.window_end : page + ps);
  const proto::PageAddr end = std::min(region_end, begin + ra.pages * ps);
  if (begin >= end) return true;
  ra.window_begin = begin;
  ra.window_end = end;
  Prefetch p;
  p.page_size = static_cast<uint32_t>(ps);
  p.next = begin;
  p.end = end;
  StartPrefetch(std::move(p));
  return true;
}

void NodeDaemon::ReadAhead(proto::PageAddr page) {
  PageStore* store = StoreOf(page);
  if (store == nullptr) return;
  if (ReadAheadSequential(store, page)) return;
  auto it = advice_.find(store->base());
  if (it == advice_.end()) return;
  const std::vector<proto::Advice>& per_page = it->second;
  const uint64_t index = store->IndexOf(page);
  if (per_page[index] != proto::Advice::kReadMostly) return;
  uint64_t last = index;  // the last read-mostly page of the read-ahead
  while (last + 1 < per_page.size() && last - index < kReadAhead &&
         per_page[last + 1] == proto::Advice::kReadMostly) {
    ++last;
  }
  if (last == index) return;
  Prefetch p;
  p.page_size = store->page_size();
  p.next = page + p.page_size;
  p.end = store->base() + (last + 1) * p.page_size;
  // The window counts as read ahead: a reader that goes on in order misses
  // next at its end, and the sequential read-ahead takes over from there
  // (doubling), rather than this fixed window hiding every such miss.
  ReadAheadState& ra = read_ahead_[store->base()];
  ra.window_begin = p.next;
  ra.window_end = p.end;
  ra.pages = last - index;
  StartPrefetch(std::move(p));
}

// ---------------------------------------------------------------------------
// GPU maps (dsvm_gpu_map / dsvm_gpu_unmap)

void NodeDaemon::StartGpuMap(int fd, uint64_t request, const proto::GpuMap& m, uint32_t round,
                             bool prefetch) {
  auto fail = [&](const Status& st) {
    ++stats_.gpu_maps_failed;
    ReplyToClient(fd, request, proto::ToReply(st));
  };
  if (!tier_) {
    return fail(FailedPrecondition(
        "this node has no GPU tier: dsvm-node runs with --device-backend none"));
  }
  if (m.gpu >= device_->device_count()) {
    return fail(InvalidArgument("gpu " + std::to_string(m.gpu) + " does not exist: this node has " +
                                std::to_string(device_->device_count()) + " (" +
                                std::string(device_->name()) + ")"));
  }
  Prefetch p;
  Status st = CheckClientRange(m.address, m.length, &p.next, &p.end, &p.page_size);
  if (!st.ok()) return fail(st);
  if (m.address % p.page_size != 0 || m.length % p.page_size != 0) {
    return fail(InvalidArgument("a gpu map covers whole pages: " + std::to_string(m.length) +
                                " bytes at " + Hex(m.address) + " are not aligned to the region's " +
                                std::to_string(p.page_size) + "-byte pages"));
  }
  // Before any page is acquired: a range the GPU's budget cannot hold would
  // take the pages from other nodes (and other page sizes' GPU memory) for
  // nothing.
  if (m.length > options_.gpu_budget_bytes / p.page_size * p.page_size) {
    return fail(ResourceExhausted(std::to_string(m.length) + " bytes are more than gpu " +
                                  std::to_string(m.gpu) + "'s budget of " +
                                  std::to_string(options_.gpu_budget_bytes) + " bytes"));
  }
  auto it = clients_.find(fd);
  DSVM_CHECK(it != clients_.end());
  const uint64_t serial = it->second.serial;
  p.client_fd = fd;
  p.client_serial = serial;
  p.client_request = request;
  p.write = m.write != 0;
  p.done = [this, fd, serial, request, m, round, prefetch](Status acquired) {
    FinishGpuMap(fd, serial, request, m, round, prefetch, acquired);
  };
  StartPrefetch(std::move(p));
}

void NodeDaemon::FinishGpuMap(int fd, uint64_t serial, uint64_t request, const proto::GpuMap& m,
                              uint32_t round, bool prefetch, Status acquired) {
  if (!IsClient(fd, serial)) return;  // gone meanwhile: nothing was pinned
  auto fail = [&](const Status& st) {
    ++stats_.gpu_maps_failed;
    ReplyToClient(fd, request, proto::ToReply(st));
  };
  if (!acquired.ok()) return fail(acquired);
  PageStore* store = StoreOf(m.address);
  if (store == nullptr) return fail(NotFound("the region at " + Hex(m.address) + " went meanwhile"));
  const uint32_t ps = store->page_size();
  std::vector<proto::PageAddr> pages;
  bool held = true;
  for (proto::PageAddr p = m.address; p < m.address + m.length; p += ps) {
    pages.push_back(p);
    const PageState s = agent_.StateOf(p);
    held &= m.write ? s == PageState::kModified : s != PageState::kInvalid;
  }
  if (!held) {
    // A remote request took a page between its acquisition and now: acquire
    // again. Pins are taken only once the whole range is held, so two maps
    // acquiring overlapping ranges never hold each other's pages.
    if (round + 1 >= kGpuMapRounds) {
      return fail(Unavailable("the pages of the gpu map were taken by other nodes " +
                              std::to_string(kGpuMapRounds) + " times while it acquired them"));
    }
    return StartGpuMap(fd, request, m, round + 1, prefetch);
  }
  // Accessed-by advice: the GPU uses the host copy (zero-copy).
  size_t advised = 0;
  for (proto::PageAddr p : pages) advised += GpuAdviceOf(accessed_by_, p) == m.gpu;
  if (!prefetch && advised != 0) {
    if (advised != pages.size()) {
      return fail(InvalidArgument("the pages of a gpu map must all or none have accessed-by "
                                  "advice for gpu " + std::to_string(m.gpu) + "; " +
                                  std::to_string(advised) + " of " + std::to_string(pages.size()) +
                                  " have it"));
    }
    return FinishZeroCopyMap(fd, request, m, pages);
  }
  // Read-mostly advice: a read map of pages with a copy on another GPU of
  // the node (mapped there, or cached) gets a replica of its own rather
  // than moving them (or failing, when they are mapped there).
  bool replica = !prefetch && !m.write && AllReadMostly(pages);
  if (replica) {
    replica = std::any_of(pages.begin(), pages.end(), [&](proto::PageAddr p) {
      const std::optional<uint32_t> on = tier_->table().GpuOf(p);
      return on && *on != m.gpu;
    });
  }
  // A zero-copy map uses the host copy, a tier map a GPU copy: both live
  // on one page, one's writes would be lost to the other. As a zero-copy
  // map waits for the tier maps of its pages (FinishZeroCopyMap), a tier
  // map waits for the zero-copy ones.
  for (const auto& [cfd, c] : clients_) {
    for (const GpuMapping& g : c.gpu_maps) {
      if (g.zero_copy && !g.lost && g.first < m.address + m.length && m.address < g.end) {
        return fail(FailedPrecondition(
            "pages at " + Hex(std::max(g.first, m.address)) + " are mapped zero-copy (accessed-by) "
            "on gpu " + std::to_string(g.gpu) + "; a map into GPU memory must wait for its unmap"));
      }
    }
  }
  // The bytes the GPU gets are the node's current ones, and a copy kept on
  // the GPU stays trusted only while no local process can write the page:
  // - A clean GPU copy of a page local processes could write (held
  //   Modified, not hidden since an earlier map or prefetch) may be stale:
  //   it is evicted and copied afresh.
  // - Before anything is copied, local processes lose the right to write
  //   the pages (a write map: any access), so that no write lands between
  //   the copy and the hiding unseen: a later write faults (RevealToCpu)
  //   and the next map copies that page again. A replica is not kept past
  //   its map and hides nothing. Hidden this way, a read map's clean copy
  //   is reused by the next map of the same pages.
  // - A backend's own copy (kmod) is written back after the hiding, which
  //   for kmod stops writes to it.
  std::vector<proto::PageAddr> writable;
  std::vector<proto::PageAddr> hide;
  for (proto::PageAddr p : pages) {
    const bool modified = agent_.StateOf(p) == PageState::kModified;
    const bool hidden = gpu_hidden_.count(p) != 0;
    if (modified && !tier_->table().IsDirty(p) && !hidden) writable.push_back(p);
    if (m.write != 0 && !prefetch) {
      hide.push_back(p);
    } else if (!replica && modified && !hidden) {
      hide.push_back(p);
    }
  }
  HideFromCpu(hide, /*writes_only=*/m.write == 0 || prefetch);
  if (backend_) {
    for (proto::PageAddr p : pages) {
      if (Status st = backend_->WriteBack(p); !st.ok()) return fail(st);
    }
  }
  std::vector<HeldSlot> own_slots;
  if (!replica) {
    if (Status st = tier_->EvictCopies(writable); !st.ok()) return fail(st);
  }
  Result<DeviceRun> run =
      replica ? tier_->MapReplicaRun(store->base(), pages, m.gpu, &own_slots)
              : tier_->MapRun(store->base(), pages, m.gpu, m.write != 0 && !prefetch, NowMs());
  if (!run.ok()) return fail(run.status());
  if (prefetch) {
    // Placed, clean, not pinned: eviction may take the pages again. Those
    // local processes may write were write-protected above, so that a
    // local write is seen (RevealToCpu) before a map trusts the GPU copy.
    if (Status st = tier_->Unpin(pages); !st.ok()) return fail(st);
    ++stats_.gpu_prefetches;
    ReplyToClient(fd, request, proto::ToReply(Status::Ok()));
    LeavePages();
    return;
  }
  Result<ArenaExport> exported = device_->ExportArena(run->arena);
  if (!exported.ok()) {
    if (replica) {
      tier_->Release(own_slots).IgnoreError();  // taken just above
    } else {
      tier_->Unpin(pages).IgnoreError();  // pinned just above
    }
    return fail(exported.status());
  }
  GpuMapping g{store->base(), m.address, m.address + m.length, ps, m.gpu, m.write != 0};
  g.replica = replica;
  g.held = std::move(own_slots);
  if (replica) ++stats_.gpu_replica_maps;
  for (proto::PageAddr p : pages) {
    GpuPins& pins = gpu_pins_[p];
    ++(g.write ? pins.writes : pins.reads);
  }
  clients_.at(fd).gpu_maps.push_back(g);
  ++stats_.gpu_maps;
  proto::GpuMapReply reply;
  reply.gpu = m.gpu;
  reply.kind = exported->fd >= 0 ? proto::DeviceKind::kEmulated : proto::DeviceKind::kCuda;
  reply.arena = run->arena;
  reply.arena_bytes = run->arena_bytes;
  reply.offset = run->offset;
  reply.length = run->bytes;
  reply.ipc_handle = exported->ipc_handle;
  ReplyToClient(fd, request, reply, exported->fd);
  LeavePages();  // admitting the pages may have gone past the host budget
}

void NodeDaemon::FinishZeroCopyMap(int fd, uint64_t request, const proto::GpuMap& m,
                                   const std::vector<proto::PageAddr>& pages) {
  auto fail = [&](const Status& st) {
    ++stats_.gpu_maps_failed;
    ReplyToClient(fd, request, proto::ToReply(st));
  };
  for (proto::PageAddr p : pages) {
    if (tier_->table().PinsOf(p) != 0) {
      return fail(FailedPrecondition("page " + Hex(p) +
                                     " is mapped into GPU memory by another map; a zero-copy "
                                     "(accessed-by) map of it must wait for its unmap"));
    }
  }
  // The host copy must be the current one, in local page tables: a
  // backend's own copy (kmod) and a dirty GPU copy written back, hidden
  // pages shown again. A write map's GPU copies would go stale: dropped.
  for (proto::PageAddr p : pages) {
    if (backend_) {
      if (Status st = backend_->WriteBack(p); !st.ok()) return fail(st);
    }
  }
  if (Status st = tier_->WriteBack(pages); !st.ok()) return fail(st);
  if (m.write) {
    if (Status st = tier_->EvictCopies(pages); !st.ok()) return fail(st);
  }
  for (proto::PageAddr p : pages) {
    if (gpu_hidden_.count(p) == 0) continue;
    if (Status st = RevealToCpu(p); !st.ok()) return fail(st);
  }
  const PageStore* store = StoreOf(m.address);
  GpuMapping g{store->base(), m.address, m.address + m.length, store->page_size(), m.gpu,
               m.write != 0};
  g.zero_copy = true;
  for (proto::PageAddr p : pages) {
    GpuPins& pins = gpu_pins_[p];
    ++(g.write ? pins.writes : pins.reads);
  }
  clients_.at(fd).gpu_maps.push_back(g);
  ++stats_.gpu_maps;
  ++stats_.gpu_zero_copy_maps;
  proto::GpuMapReply reply;
  reply.gpu = m.gpu;
  reply.kind = device_->name() == "cuda" ? proto::DeviceKind::kCudaHost
                                         : proto::DeviceKind::kEmulatedHost;
  reply.arena = m.address;
  reply.arena_bytes = m.length;
  reply.offset = 0;
  reply.length = m.length;
  ReplyToClient(fd, request, reply);
}

void NodeDaemon::HideFromCpu(std::span<const proto::PageAddr> pages, bool writes_only) {
  if (!backend_) return;  // no local mappings: the daemon's own accesses write back
  for (proto::PageAddr p : pages) {
    const bool read_only = writes_only && !LeaseLapsed(p);
    Status st = read_only ? backend_->MapRead(p) : backend_->Unmap(p);
    if (!st.ok()) {
      LogError("GPU tier: hiding page " + Hex(p) + " from local processes: " + st.ToString());
      continue;
    }
    if (read_only) fenced_pages_.erase(p);  // mapped again (read-only)
    gpu_hidden_.insert(p);
  }
}

Status NodeDaemon::RevealToCpu(proto::PageAddr page) {
  if (gpu_hidden_.erase(page) != 0 && tier_) DSVM_RETURN_IF_ERROR(tier_->WriteBack(std::span<const proto::PageAddr>(&page, 1)));
  if (LeaseLapsed(page)) {  // mapped at its next fault once the lease is back
    fenced_pages_.insert(page);
    return backend_->Unmap(page);
  }
  fenced_pages_.erase(page);
  switch (agent_.StateOf(page)) {
    case PageState::kModified: return backend_->MapWrite(page);
    case PageState::kShared: return backend_->MapRead(page);
    default: return Status::Ok();  // the agent fetches it as for any miss
  }
}

void NodeDaemon::ReleaseGpuMap(const GpuMapping& g) {
  ++stats_.gpu_unmaps;
  if (g.lost || g.replica) {  // slots of its own (a replica's, or kept for a lost map)
    Status st = tier_->Release(g.held);
    if (!st.ok()) LogError("GPU tier: freeing a map's own slots: " + st.ToString());
    if (g.lost) return;  // its pages are gone
  }
  std::vector<proto::PageAddr> pages;
  for (proto::PageAddr p = g.first; p < g.end; p += g.page_size) pages.push_back(p);
  if (tier_ && StoreOf(g.first) != nullptr && !g.zero_copy && !g.replica) {
    Status st = tier_->Unpin(pages);
    if (!st.ok()) LogError("GPU tier: unpinning a gpu map: " + st.ToString());
  }
  std::vector<proto::Message> replay;
  for (proto::PageAddr p : pages) {
    auto it = gpu_pins_.find(p);
    if (it == gpu_pins_.end()) continue;  // dropped meanwhile (DropEverything)
    --(g.write ? it->second.writes : it->second.reads);
    if (it->second.reads + it->second.writes != 0) continue;
    gpu_pins_.erase(it);
    if (auto d = deferred_.find(p); d != deferred_.end()) {
      for (proto::Message& m : d->second) replay.push_back(std::move(m));
      deferred_.erase(d);
    }
  }
  // A dirty GPU copy stays dirty: written back when another node asks
  // (these very messages, perhaps), on eviction, or when a local process
  // touches the page (hidden again here: one may have touched it during the
  // map and seen the bytes of then).
  if (g.write && tier_ && !g.zero_copy) {
    std::vector<proto::PageAddr> dirty;
    for (proto::PageAddr p : pages) {
      if (tier_->table().IsDirty(p)) dirty.push_back(p);
    }
    HideFromCpu(dirty);
  }
  for (proto::Message& m : replay) HandleDirectoryMessage(std::move(m));
}

void NodeDaemon::OnClientListenReadable() {
  for (;;) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (clients_.size() >= kMaxClients ||
        ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      LogWarning("refusing a client: too many clients, or no credentials");
      ::close(fd);
      continue;
    }
    Client c;
    c.fd = UniqueFd(fd);
    c.serial = ++next_client_serial_;
    c.pid = cred.pid;
    c.uid = cred.uid;
    c.gid = cred.gid;
    clients_.emplace(fd, std::move(c));
    ++stats_.clients;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
  }
}

void NodeDaemon::CloseClient(int fd) {
  auto it = clients_.find(fd);
  if (it == clients_.end()) return;
  for (auto& [base, mapping] : it->second.mappings) backend_->RemoveMapping(mapping).IgnoreError();
  // Its gpu maps end with it (exit, crash or dsvm_finalize alike).
  const std::vector<GpuMapping> maps = std::move(it->second.gpu_maps);
  it->second.gpu_maps.clear();
  for (const GpuMapping& g : maps) ReleaseGpuMap(g);
  it = clients_.find(fd);
  if (it == clients_.end()) return;
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
  clients_.erase(it);  // closes the socket
  DropUnmappedDeleted();
}

void NodeDaemon::ReplyToClient(int fd, uint64_t request_id, const proto::Message& m,
                               int attach_fd) {
  std::vector<uint8_t> bytes = proto::Encode(m, request_id);
  std::vector<int> fds;
  if (attach_fd >= 0) fds.push_back(attach_fd);
  Status st = SendFds(fd, bytes, fds);
  if (!st.ok()) {
    LogWarning("answering client: " + st.ToString());
    CloseClient(fd);
  }
}

bool NodeDaemon::IsClient(int fd, uint64_t serial) const {
  auto it = clients_.find(fd);
  return it != clients_.end() && it->second.serial == serial;
}

Status NodeDaemon::CheckOpenedBy(const Client& client, proto::PageAddr address) const {
  const PageStore* store = StoreOf(address);
  if (store == nullptr) return Status::Ok();
  auto it = client.opened.find(store->base());
  if (it != client.opened.end() && it->second == region_ids_.at(store->base())) {
    return Status::Ok();
  }
  return PermissionDenied("process " + std::to_string(client.pid) + " (uid " +
                          std::to_string(client.uid) + ") has not opened the region at " +
                          Hex(store->base()) + " through this daemon");
}

void NodeDaemon::ForwardedReply(const Forwarded& f, proto::Message m) {
  if (!IsClient(f.client_fd, f.client_serial)) return;  // the client left meanwhile
  if (auto* r = std::get_if<proto::RegionReply>(&m)) {
    // Regions deleted meanwhile may still have stores here where the new one
    // lies: drop them first.
    std::vector<proto::PageAddr> stale;
    for (const auto& [base, store] : stores_) {
      if (base < r->base + r->size && r->base < base + store->size() &&
          region_ids_.at(base) != r->region) {
        stale.push_back(base);
      }
    }
    for (proto::PageAddr base : stale) {
      Status gone = DropRegion(base, "deleted; region '" + r->name + "' took its addresses");
      if (!gone.ok()) return ReplyToClient(f.client_fd, f.client_request, proto::ToReply(gone));
    }
    if (StoreOf(r->base) == nullptr) {
      Status st = OpenRegion(*r);
      if (!st.ok()) return ReplyToClient(f.client_fd, f.client_request, proto::ToReply(st));
    }
    const PageStore& store = *StoreOf(r->base);
    clients_.at(f.client_fd).opened[r->base] = r->region;
    return ReplyToClient(f.client_fd, f.client_request, m,
                         backend_ ? backend_->client_map_fd(store) : store.fd());
  }
  ReplyToClient(f.client_fd, f.client_request, m);
}

void NodeDaemon::OnClientReadable(int fd) {
  auto it = clients_.find(fd);
  if (it == clients_.end()) return;
  std::vector<uint8_t> buf(proto::kHeaderSize + proto::kMaxControlPayload);
  auto got = ReceiveFds(fd, buf);
  if (!got.ok()) {
    // Level-triggered epoll said readable: an error here is end of stream or
    // a refused record, never "nothing yet". Left open, a closed socket
    // would stay readable and spin the loop.
    CloseClient(fd);
    return;
  }
  auto frame = proto::Decode(std::span<const uint8_t>(buf.data(), got->bytes));
  if (!frame.ok()) {
    LogWarning("closing client " + std::to_string(it->second.pid) + ": " + frame.status().ToString());
    return CloseClient(fd);
  }
  const uint64_t rid = frame->header.request_id;
  Client& client = it->second;
  // Requests that name a region's pages: only for regions this process
  // opened (the coordinator checked who may; the daemon's socket is open
  // to every local user).
  const std::optional<proto::PageAddr> names = std::visit(
      [](const auto& m) -> std::optional<proto::PageAddr> {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, proto::MapRegion>) return m.base;
        if constexpr (std::is_same_v<T, proto::Prefetch> || std::is_same_v<T, proto::Advise> ||
                      std::is_same_v<T, proto::GpuMap> || std::is_same_v<T, proto::GpuPrefetch>) {
          return m.address;
        }
        return std::nullopt;
      },
      frame->message);
  if (names) {
    if (Status st = CheckOpenedBy(client, *names); !st.ok()) {
      return ReplyToClient(fd, rid, proto::ToReply(st));
    }
  }
  std::visit(
      [&](auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, proto::ClientHello>) {
          if (m.abi != proto::kClientAbi) {
            return ReplyToClient(fd, rid, proto::ToReply(InvalidArgument(
                                              "client ABI " + std::to_string(m.abi) + ", daemon speaks " +
                                              std::to_string(proto::kClientAbi))));
          }
          ReplyToClient(fd, rid, proto::ClientHelloReply{id_, window_base_, window_size_});
        } else if constexpr (std::is_same_v<T, proto::RegionCreate> ||
                             std::is_same_v<T, proto::RegionOpen> ||
                             std::is_same_v<T, proto::RegionDelete>) {
          if (!control().is_open() || forwarded_.size() >= kMaxForwarded) {
            return ReplyToClient(fd, rid, proto::ToReply(Unavailable("coordinator not reachable")));
          }
          // The coordinator decides who may open a region by these, never
          // by what the process claims.
          m.creds = proto::Credentials{1, client.uid, client.gid};
          const uint64_t forward = control().NextRequestId();
          forwarded_[forward] = Forwarded{fd, client.serial, rid};
          control().Send(m, forward).IgnoreError();
        } else if constexpr (std::is_same_v<T, proto::MapRegion>) {
          PageStore* store = StoreOf(m.base);
          if (store == nullptr || store->base() != m.base || !backend_ || got->fds.empty()) {
            return ReplyToClient(fd, rid, proto::ToReply(InvalidArgument(
                                              "MapRegion needs an open region's base and a fault fd")));
          }
          if (client.mappings.count(m.base)) {
            return ReplyToClient(fd, rid, proto::ToReply(AlreadyExists("region mapped already")));
          }
          MappingRequest req;
          req.region = m.base;
          req.pid = client.pid;
          req.fault_fd = std::move(got->fds[0]);
          if (got->fds.size() > 1) req.pidfd = std::move(got->fds[1]);
          auto mapping = backend_->AddMapping(std::move(req));
          if (!mapping.ok()) return ReplyToClient(fd, rid, proto::ToReply(mapping.status()));
          client.mappings[m.base] = *mapping;
          ReplyToClient(fd, rid, proto::ToReply(Status::Ok()));
        } else if constexpr (std::is_same_v<T, proto::UnmapRegion>) {
          auto mp = client.mappings.find(m.base);
          if (mp == client.mappings.end()) {
            return ReplyToClient(fd, rid, proto::ToReply(NotFound("region not mapped by this client")));
          }
          backend_->RemoveMapping(mp->second).IgnoreError();
          client.mappings.erase(mp);
          DropUnmappedDeleted();
          ReplyToClient(fd, rid, proto::ToReply(Status::Ok()));
        } else if constexpr (std::is_same_v<T, proto::Prefetch>) {
          Prefetch p;
          Status st = CheckClientRange(m.address, m.length, &p.next, &p.end, &p.page_size);
          if (!st.ok()) return ReplyToClient(fd, rid, proto::ToReply(st));
          p.client_fd = fd;
          p.client_serial = client.serial;
          p.client_request = rid;
          p.write = m.write != 0;
          StartPrefetch(std::move(p));
        } else if constexpr (std::is_same_v<T, proto::Advise>) {
          ReplyToClient(fd, rid, proto::ToReply(SetAdvice(m)));
        } else if constexpr (std::is_same_v<T, proto::GpuMap>) {
          StartGpuMap(fd, rid, m, 0);
        } else if constexpr (std::is_same_v<T, proto::GpuPrefetch>) {
          StartGpuMap(fd, rid, proto::GpuMap{m.address, m.length, m.gpu, m.write}, 0,
                      /*prefetch=*/true);
        } else if constexpr (std::is_same_v<T, proto::GpuUnmap>) {
          auto g = std::find_if(client.gpu_maps.begin(), client.gpu_maps.end(), [&](const GpuMapping& x) {
            return x.first == m.address && x.end - x.first == m.length;
          });
          if (g == client.gpu_maps.end()) {
            return ReplyToClient(fd, rid, proto::ToReply(InvalidArgument(
                                              "this process has no gpu map of exactly " +
                                              std::to_string(m.length) + " bytes at " + Hex(m.address))));
          }
          const GpuMapping done = *g;
          client.gpu_maps.erase(g);
          ReleaseGpuMap(done);
          ReplyToClient(fd, rid,
                        proto::ToReply(done.lost ? DataLoss(done.lost_why) : Status::Ok()));
        } else if constexpr (std::is_same_v<T, proto::NodeStats>) {
          ReplyToClient(fd, rid,
                        proto::NodeStatsReply{id_, static_cast<uint32_t>(clients_.size()), Counters()});
        } else {
          LogWarning(std::string("closing client: unexpected ") + proto::TypeName(T::kType));
          CloseClient(fd);
        }
      },
      frame->message);
}

}  // namespace dsvm::node
