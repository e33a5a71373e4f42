// RegionFollower: a follower shard's link to shard 0's region table.
//
// Shard 0 decides regions and node ids; every other shard follows its
// region table (PROTOCOL.md, Shards). This keeps one connection to shard 0,
// on a thread of its own with blocking I/O: connect, authenticate (the
// cluster secret, as any tool), RegionWatch, then read until the connection
// fails. It gathers each snapshot whole and hands it, and every change after
// it, to the CoordinatorService on the io_context's thread
// (boost::asio::post): the service has one owner, that thread, and is never
// touched here. On any failure it tells the service (its table may now lag
// behind), logs once per outage and reconnects every kRetryMs.
//
// Lock order: mu_ only (a leaf).
#ifndef DSVM_COORDINATOR_NET_REGION_FOLLOWER_H_
#define DSVM_COORDINATOR_NET_REGION_FOLLOWER_H_

#include <utility>  // before Asio: Boost 1.74 awaitable.hpp needs std::exchange under C++20
#include <boost/asio.hpp>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "coordinator/service/coordinator_service.h"
#include "proto/auth.h"

namespace dsvm::coordinator {

class RegionFollower {
 public:
  static constexpr int kRetryMs = 200;            // between connection attempts
  static constexpr int kPollMs = 100;             // how soon Stop() is noticed while reading
  static constexpr int kConnectTimeoutMs = 1000;  // connect, and each handshake step

  // `authority`: shard 0's "host:port". `secret` (nullptr: none, --insecure)
  // must outlive this. Handlers posted to `io` call `service`; both must
  // outlive this, and `io` must not run after it is destroyed.
  RegionFollower(boost::asio::io_context& io, CoordinatorService& service, std::string authority,
                 const proto::ClusterSecret* secret);
  ~RegionFollower();  // Stop()
  RegionFollower(const RegionFollower&) = delete;
  RegionFollower& operator=(const RegionFollower&) = delete;

  void Start();
  // Ends the thread and joins it. Returns within about kPollMs while reading,
  // or the connect and handshake timeouts (3 * kConnectTimeoutMs) while
  // connecting. Idempotent.
  void Stop();

 private:
  void Run();
  // One connection's life, until it fails (the Status says why) or Stop().
  Status Follow();
  // Runs `change` on the io_context's thread; a failure there asks for a
  // fresh snapshot (the next Follow loop turn reconnects).
  void Post(std::function<Status(CoordinatorService&)> change);
  // Sleeps for `ms` or until Stop(). False: stopping.
  bool SleepUnlessStopped(int ms);

  boost::asio::io_context& io_;
  CoordinatorService& service_;  // only on io_'s thread
  const std::string authority_;
  const proto::ClusterSecret* secret_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> resync_{false};  // set on io_'s thread, read by the follower thread
  bool outage_logged_ = false;       // follower thread only
  std::mutex mu_;
  std::condition_variable stopped_;  // with mu_: wakes the retry sleep at Stop()
};

}  // namespace dsvm::coordinator

#endif  // DSVM_COORDINATOR_NET_REGION_FOLLOWER_H_
