#include "node/daemon/node_daemon.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <string>

#include "node/fault/fd_passing.h"
#include "proto/log.h"
#include "proto/text.h"

namespace dsvm::node {

namespace {

constexpr size_t kMaxClients = 1024;
constexpr size_t kMaxForwarded = 4096;
constexpr size_t kFaultBatch = 64;

}  // namespace

// ---------------------------------------------------------------------------
// Client processes: their faults and the client plane

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
  if (tier_job_ && (TierMayTouch(e.page) || gpu_hidden_.count(e.page) != 0)) {
    // A GPU map's copies may be moving its bytes, or showing it needs the
    // tier: it waits for them (EndTierJob).
    faults_held_for_job_.push_back(e);
    ++stats_.held_for_gpu_copies;
    return;
  }
  ++stats_.client_faults;
  if (TakenFromCpu(e.page)) {
    if (Status st = RevealToCpu(e.page); !st.ok()) {
      if (gpu_hidden_.count(e.page) == 0) {
        // The map failed: said, and the fault goes on as any other.
        LogError("revealing page " + Hex(e.page) + ": " + st.ToString());
      } else if (tier_->failure().ok()) {
        // A store refused the write-back (the GPU copy is kept): the
        // access waits, as a remote reader's does, and is tried again.
        if (stats_.faults_held_for_write_back++ == 0) {
          LogWarning("a client's access to page " + Hex(e.page) + " waits: " + st.ToString() +
                     " (faults_held_for_write_back counts these; logged once)");
        }
        held_for_write_back_.push_back(e);
        return;
      } else {
        // The device failed: the page's current bytes are lost to this
        // node, and the access fails (SIGBUS) rather than fault for ever.
        ++stats_.accesses_failed;
        LogWarning("a client's access to page " + Hex(e.page) + " fails (SIGBUS): " +
                   st.ToString());
        st = backend_->Resolve(e.token, Resolution::kError);
        if (!st.ok() && st.code() != StatusCode::kNotFound) {
          LogWarning("resolving a fault: " + st.ToString());
        }
        return;
      }
    }
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
  if (agent_.Fault(e.page, e.write, w, NowMs(), &acts, AsksHolder(e.page, e.write)) ==
      FaultResult::kHit) {
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
    auto it = clients_.find(fd);
    if (tier_job_ && it != clients_.end()) {
      // Its maps' pins go with it, which needs the tier: after the copies.
      after_tier_job_.push_back([this, fd, serial = it->second.serial] {
        if (!IsClient(fd, serial)) return;
        ++stats_.clients_closed_after_gpu_copies;
        CloseClient(fd);
      });
      return;
    }
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
