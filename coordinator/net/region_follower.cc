#include "coordinator/net/region_follower.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <vector>

#include "proto/log.h"

namespace dsvm::coordinator {
namespace {

// More regions than any address window holds (16 TiB of 2 MiB granules is
// 2^23): a snapshot longer than this comes from a broken peer.
constexpr size_t kMaxSnapshotRegions = size_t{1} << 24;

// A tool connection carries no heartbeats: TCP keepalive finds a shard 0
// whose host vanished (about 11 s) so the follower reconnects.
void KeepAlive(int fd) {
  int on = 1, idle = 5, interval = 2, count = 3;
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
}

}  // namespace

RegionFollower::RegionFollower(boost::asio::io_context& io, CoordinatorService& service,
                               std::string authority, const proto::ClusterSecret* secret)
    : io_(io), service_(service), authority_(std::move(authority)), secret_(secret) {}

RegionFollower::~RegionFollower() { Stop(); }

void RegionFollower::Start() {
  DSVM_CHECK(!thread_.joinable());
  thread_ = std::thread([this] { Run(); });
}

void RegionFollower::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  stopped_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool RegionFollower::SleepUnlessStopped(int ms) {
  std::unique_lock<std::mutex> lock(mu_);
  return !stopped_.wait_for(lock, std::chrono::milliseconds(ms), [this] { return stop_.load(); });
}

void RegionFollower::Post(std::function<Status(CoordinatorService&)> change) {
  boost::asio::post(io_, [this, change = std::move(change)] {
    Status st = change(service_);
    if (!st.ok()) {
      LogError("applying shard 0's region table: " + st.ToString() + "; asking for a fresh snapshot");
      resync_ = true;
    }
  });
}

void RegionFollower::Run() {
  while (!stop_) {
    Status why = Follow();
    if (stop_) break;
    // Whatever shard 0 changes from now on is missed until the next snapshot.
    Post([](CoordinatorService& s) {
      s.OnRegionAuthorityLost();
      return Status::Ok();
    });
    if (!outage_logged_) {
      LogWarning("region table of shard 0 at " + authority_ + ": " + why.ToString() +
                 "; retrying every " + std::to_string(kRetryMs) + " ms");
      outage_logged_ = true;
    }
    if (!SleepUnlessStopped(kRetryMs)) break;
  }
}

Status RegionFollower::Follow() {
  resync_ = false;
  DSVM_ASSIGN_OR_RETURN(proto::FramedSocket sock,
                        proto::ConnectToCoordinator(authority_, secret_, kConnectTimeoutMs));
  KeepAlive(sock.fd());
  const uint64_t watch_id = sock.NextRequestId();
  DSVM_RETURN_IF_ERROR(sock.Send(proto::RegionWatch{}, watch_id));
  std::vector<proto::RegionCreated> snapshot;
  bool synced = false;
  while (!stop_) {
    if (resync_) return Unavailable("this shard could not apply a change; resyncing");
    pollfd p{sock.fd(), POLLIN, 0};
    const int pr = ::poll(&p, 1, kPollMs);
    if (pr < 0 && errno != EINTR) return IoError(std::string("poll: ") + std::strerror(errno));
    if (pr <= 0) continue;
    DSVM_RETURN_IF_ERROR(sock.ReadAvailable());
    for (;;) {
      DSVM_ASSIGN_OR_RETURN(std::optional<proto::Frame> frame, sock.NextFrame());
      if (!frame.has_value()) break;
      const uint64_t rid = frame->header.request_id;
      // Before the marker, only the snapshot answering this watch; after
      // it, only unsolicited changes.
      if (rid != (synced ? 0 : watch_id)) {
        return InvalidArgument(std::string(proto::TypeName(frame->header.type)) +
                               " with request id " + std::to_string(rid) + " on the region watch");
      }
      proto::Message& m = frame->message;
      if (auto* st = std::get_if<proto::StatusReply>(&m)) {
        Status refused = proto::FromReply(*st);
        return refused.ok() ? InvalidArgument("RegionWatch answered OK without a snapshot")
                            : refused;
      } else if (auto* created = std::get_if<proto::RegionCreated>(&m)) {
        if (synced) {
          Post([c = *created](CoordinatorService& s) { return s.OnRegionCreated(c); });
        } else if (snapshot.size() == kMaxSnapshotRegions) {
          return ResourceExhausted("region snapshot over " + std::to_string(kMaxSnapshotRegions) +
                                   " regions");
        } else {
          snapshot.push_back(std::move(*created));
        }
      } else if (auto* done = std::get_if<proto::RegionSnapshotDone>(&m); done != nullptr && !synced) {
        if (done->regions != snapshot.size()) {
          return InvalidArgument("region snapshot of " + std::to_string(snapshot.size()) +
                                 " regions ends saying " + std::to_string(done->regions));
        }
        Post([regions = std::move(snapshot), next = done->next_region](CoordinatorService& s) {
          return s.OnRegionSnapshot(regions, next);
        });
        snapshot.clear();
        synced = true;
        if (outage_logged_) LogInfo("region table of shard 0 at " + authority_ + " reached again");
        outage_logged_ = false;
      } else if (auto* deleted = std::get_if<proto::RegionDeleted>(&m); deleted != nullptr && synced) {
        Post([d = *deleted](CoordinatorService& s) { return s.OnRegionDeleted(d); });
      } else {
        return InvalidArgument(std::string(proto::TypeName(frame->header.type)) +
                               " is not a message of the region watch here");
      }
    }
  }
  return Status::Ok();
}

}  // namespace dsvm::coordinator
